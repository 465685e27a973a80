/* USDT probes written with Debian's <sys/sdt.h> (systemtap-sdt-dev): the
 * DTRACE_PROBEn and STAP_PROBEn macros, which emit a plain 1-byte nop.
 * Runs N rounds (argv[1], default 10) and prints a checksum. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/sdt.h>

long g_total;

__attribute__((noinline)) long step(long i, int k)
{
    long v = i * 7 - k;
    DTRACE_PROBE3(sdtprov, step, i, k, v);
    STAP_PROBE2(sdtprov, neg, -i, (unsigned char)(i * 37));
    g_total += v;
    return v;
}

__attribute__((noinline)) double real(double d, float f)
{
    STAP_PROBE2(sdtprov, real, d, f);
    return d + f;
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 10;
    long sum = 0;
    double fsum = 0;
    for (int i = 0; i < n; i++) {
        sum += step(i, i % 3);
        fsum += real(i * 0.25 - 1e10, (float)i * -0.125f);
    }
    DTRACE_PROBE(sdtprov, done);
    printf("sum %ld total %ld fsum %.3f\n", sum, g_total, fsum);
    return 0;
}

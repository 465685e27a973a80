/* Floating-point USDT arguments (8f and 4f) in the forms a note can give them:
 *   ptfloat:gpr   through ptprobe_sdt.h ("nri": the bits travel in a general register)
 *   ptfloat:mem   through ptprobe_sdt.h with "nor" operands (memory when the compiler wants)
 *   ptfloat:xmm   a hand-written note naming xmm registers ("8f@%xmm0 4f@%xmm1"):
 *                 the site keeps the values in xmm registers, as a compiler would.
 * Round i passes d = i * 0.75 - 1e10 and f = i * -0.375 + 2 to each. */
#include <stdio.h>
#include <stdlib.h>
#define PTPROBE_SDT_NOP PTPROBE_SDT_NOP_5
#include "ptprobe_sdt.h"

__attribute__((noinline)) double gpr(double d, float f)
{
    PTPROBE_SDT_PROBE(ptfloat, gpr, d, f);
    return d + f;
}

__attribute__((noinline)) double xmm(double d, float f)
{
    __asm__ __volatile__(
        "990:\tnop\n"
        "\t.pushsection .note.stapsdt, \"?\", @note\n"
        "\t.balign 4\n"
        "\t.4byte 992f - 991f, 994f - 993f, 3\n"
        "991:\t.asciz \"stapsdt\"\n"
        "992:\t.balign 4\n"
        "993:\t.8byte 990b\n"
        "\t.8byte _.stapsdt.base\n"
        "\t.8byte 0\n"
        "\t.asciz \"ptfloat\"\n"
        "\t.asciz \"xmm\"\n"
        "\t.asciz \"8f@%[d] 4f@%[f] -4@$-3\"\n"
        "994:\t.balign 4\n"
        "\t.popsection\n"
        ".ifndef _.stapsdt.base\n"
        "\t.pushsection .stapsdt.base, \"aG\", @progbits, .stapsdt.base, comdat\n"
        "\t.weak _.stapsdt.base\n"
        "\t.hidden _.stapsdt.base\n"
        "_.stapsdt.base:\n"
        "\t.space 1\n"
        "\t.size _.stapsdt.base, 1\n"
        "\t.popsection\n"
        ".endif\n"
        : : [d] "x" (d), [f] "x" (f));
    return d * 2 + f;
}

#undef PTPROBE_SDT_ARG_CONSTRAINT
#define PTPROBE_SDT_ARG_CONSTRAINT "nor"
__attribute__((noinline)) double mem(double d, float f)
{
    volatile double vd = d;
    volatile float vf = f;
    PTPROBE_SDT_PROBE(ptfloat, mem, vd, vf);
    return vd - vf;
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 4;
    double sum = 0;
    for (int i = 0; i < n; i++) {
        double d = i * 0.75 - 1e10;
        float f = (float)i * -0.375f + 2.0f;
        sum += gpr(d, f) + xmm(d, f) + mem(d, f);
    }
    printf("rounds %d sum %.4f\n", n, sum);
    return 0;
}

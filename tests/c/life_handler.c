/* Probes whose handlers fail: N passes of life_nop5(i), life_int3(i) and the USDT
 * probe life:deref (a 5-byte NOP site) whose one argument is the long that a pointer
 * points at, named as a memory operand ("-8@(%reg)"). On odd passes the pointer is
 * BAD (an unmapped address), so a tracer that evaluates the argument faults; the
 * program itself never reads through it.
 *
 *   life_handler N
 *
 * Prints "pass I sum S" after each pass and "handler done ok=1" at the end; exit 0
 * (1 if a site returned a wrong value).
 */
#include <stdio.h>
#include <stdlib.h>
#define PTPROBE_SDT_NOP PTPROBE_SDT_NOP_5
#define PTPROBE_SDT_ARG_CONSTRAINT "m"
#include "ptprobe_sdt.h"

long life_nop5(long);
long life_int3(long);

#define BAD ((long *)0x10)

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 10;
    long value = 4242, sum = 0;
    long *volatile pointers[2] = {&value, BAD};
    int ok = 1;
    for (long i = 0; i < n; i++) {
        long *p = pointers[i & 1];
        PTPROBE_SDT_PROBE(life, deref, *p);
        long a = life_nop5(i), b = life_int3(i);
        if (a != i + 1 || b != i + 2)
            ok = 0;
        sum += a + b;
        printf("pass %ld sum %ld\n", i, sum);
    }
    printf("handler done ok=%d\n", ok);
    return ok ? 0 : 1;
}

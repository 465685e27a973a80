/* act_fault.c - a USDT probe whose memory operands the program never reads, for
 * arguments that cannot be read.
 *
 *   act_fault N ADDRESS
 *
 * Calls the probe act:pair(*good, *bad, i) for i in 0..N-1: good points at a
 * variable holding 42, bad is ADDRESS (hex, e.g. 0x10: unmapped; "good": the
 * same as good). The operands of *good and *bad are
 * memory operands based on registers other than rsp, which the program itself
 * never dereferences (the site is a NOP). Prints "done N".
 */
#define PTPROBE_SDT_ARG_CONSTRAINT "m"
#define PTPROBE_SDT_NOP PTPROBE_SDT_NOP_5
#include <stdio.h>
#include <stdlib.h>
#include "ptprobe_sdt.h"

static long forty_two = 42;

__attribute__((noinline)) static void fire(long *good, long *bad, long i)
{
    PTPROBE_SDT_PROBE(act, pair, *good, *bad, i);
}

int main(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    long n = atol(argv[1]);
    long *volatile good = &forty_two;
    long *bad = argv[2][0] == 'g' ? good : (long *)strtoul(argv[2], NULL, 16);
    for (long i = 0; i < n; i++)
        fire(good, bad, i);
    printf("done %ld\n", n);
    return 0;
}

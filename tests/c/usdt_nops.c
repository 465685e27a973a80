/* One USDT probe site per form: build with -DPTPROBE_SDT_NOP=PTPROBE_SDT_NOP_5
 * (or _1, _1_5, _1_10).  Runs N rounds (argv[1], default 10), prints a checksum. */
#include <stdio.h>
#include <stdlib.h>
#include "ptprobe_sdt.h"

__attribute__((noinline)) long tick(long i, int neg)
{
    long r = i * i + neg;
    PTPROBE_SDT_PROBE(ptnops, tick, i, neg, r);
    return r;
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 10;
    long sum = 0;
    for (long i = 0; i < n; i++)
        sum = sum * 3 + tick(i, -(int)i - 1);
    PTPROBE_SDT_PROBE(ptnops, end, n);
    printf("rounds %d sum %ld\n", n, sum);
    return 0;
}

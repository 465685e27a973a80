/* One USDT probe in an always-inline function that three callers inline at
 * -O2: three notes, three sites.  Each round (N = argv[1], default 10) calls
 * one() once, two() twice and three() three times; the probe's first argument
 * says which caller's copy fired. */
#include <stdio.h>
#include <stdlib.h>
#define PTPROBE_SDT_NOP PTPROBE_SDT_NOP_5
#include "ptprobe_sdt.h"

static inline __attribute__((always_inline)) long traced(int who, long x)
{
    long r = x * who + 1;
    PTPROBE_SDT_PROBE(ptinline, traced, who, x, r);
    return r;
}

__attribute__((noinline)) long one(long x) { return traced(1, x) + 3; }
__attribute__((noinline)) long two(long x) { return traced(2, x) ^ 5; }
__attribute__((noinline)) long three(long x) { return traced(3, x) - 7; }

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 10;
    long sum = 0;
    for (long i = 0; i < n; i++) {
        sum += one(i);
        for (int k = 0; k < 2; k++)
            sum += two(i + k);
        for (int k = 0; k < 3; k++)
            sum += three(i - k);
    }
    printf("rounds %d sum %ld\n", n, sum);
    return 0;
}

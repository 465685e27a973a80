/* Target of tools/bench_returns.py.
 *
 *   calls N       calls target(i) N times; prints "elapsed NS" (the loop, CLOCK_MONOTONIC)
 *   stack K D     K times: recurse(D) down to leaf(); prints "elapsed NS"
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

volatile long sink;

__attribute__((noipa)) long target(long x) { return x + 1; }
__attribute__((noipa)) long leaf(long x) { return x + 2; }

__attribute__((noipa)) long recurse(long depth)
{
    long r = depth <= 1 ? leaf(depth) : recurse(depth - 1);
    sink = r;
    return r + 1;
}

static long long now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    long long start = now();
    if (argc > 2 && strcmp(argv[1], "calls") == 0) {
        long n = atol(argv[2]);
        for (long i = 0; i < n; i++)
            sink = target(i);
    } else if (argc > 3 && strcmp(argv[1], "stack") == 0) {
        long k = atol(argv[2]), d = atol(argv[3]);
        for (long i = 0; i < k; i++)
            sink = recurse(d);
    } else {
        return 2;
    }
    printf("elapsed %lld\n", now() - start);
    return 0;
}

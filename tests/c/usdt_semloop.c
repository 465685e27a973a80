/* A loop with a semaphore-guarded USDT probe (semloop:tick) that links against
 * libusdtsem.so (usdt_semlib.c) and calls its semlib_step() every round.
 *
 * With an argument N: N rounds, then one line
 *     "rounds N expensive E libexpensive L"
 * Without: prints "ready PID", then forever: a round, a short nanosleep, and
 * every 16 rounds a line "progress ROUND E L" (E, L: expensive() calls so far in
 * the program and in the library). */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#define PTPROBE_SDT_NOP PTPROBE_SDT_NOP_5
#include "ptprobe_sdt.h"

long semlib_step(long i);
extern long semlib_expensive_calls;

PTPROBE_SDT_SEMAPHORE(semloop, tick);

long expensive_calls;

static __attribute__((noinline)) long expensive(long x)
{
    expensive_calls++;
    return x * x - 3;
}

static __attribute__((noinline)) void round_(long i)
{
    if (PTPROBE_SDT_ENABLED(semloop, tick)) {
        long e = expensive(i);
        PTPROBE_SDT_PROBE_SEM(semloop, tick, i, e);
    }
    semlib_step(i);
}

int main(int argc, char **argv)
{
    if (argc > 1) {
        long n = atol(argv[1]);
        for (long i = 0; i < n; i++)
            round_(i);
        printf("rounds %ld expensive %ld libexpensive %ld\n", n, expensive_calls,
               semlib_expensive_calls);
        return 0;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready %d\n", (int)getpid());
    struct timespec pause = {0, 200000};
    for (long i = 1;; i++) {
        round_(i);
        nanosleep(&pause, NULL);
        if (i % 16 == 0)
            printf("progress %ld %ld %ld\n", i, expensive_calls, semlib_expensive_calls);
    }
}

/* A shared library (build as libusdtsem.so) with a semaphore-guarded probe,
 * semlib:work, whose argument costs a call to expensive() that runs only while
 * a tracer has the semaphore up, and an unguarded probe, semlib:call (a
 * nop1+nop10 site). */
#define PTPROBE_SDT_NOP PTPROBE_SDT_NOP_1_10
#include "ptprobe_sdt.h"

PTPROBE_SDT_SEMAPHORE(semlib, work);

long semlib_expensive_calls;

static __attribute__((noinline)) long expensive(long x)
{
    semlib_expensive_calls++;
    return x * 1000 + 7;
}

long semlib_step(long i)
{
    PTPROBE_SDT_PROBE(semlib, call, i);
    if (PTPROBE_SDT_ENABLED(semlib, work)) {
        long e = expensive(i);
        PTPROBE_SDT_PROBE_SEM_NOP(PTPROBE_SDT_NOP_5, semlib, work, i, e);
    }
    return i + 1;
}

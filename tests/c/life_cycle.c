/* Threads that pass three kinds of probe site over and over, checking everything,
 * while a tracer attaches and detaches again and again. Link with fast_regcheck.c
 * and life_sites.c.
 *
 *   life_cycle THREADS
 *
 * Each thread, in a loop: probe_regs() (the nop5 site regs_site, every register
 * checked around it), life_int3() (an int3 site run out of line, result checked) and,
 * while its semaphore is up, the USDT probe life:cycle (a nop1+nop5 site; arguments:
 * thread number, pass number). Prints "ready PID" once the threads run. On a
 * mismatch prints "FAIL ..." and exits 3. Commands on stdin, one byte each:
 *   q   (or end of input) stop, print "done passes=P enabled=E sem=S", exit 0
 *       (P passes in all, E of them with the semaphore up, S its value now)
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fast_regcheck.h"
#define PTPROBE_SDT_NOP PTPROBE_SDT_NOP_1_5
#include "ptprobe_sdt.h"

long life_int3(long);

PTPROBE_SDT_SEMAPHORE(life, cycle);

static volatile int stopping;
static uint64_t passes[64], enabled[64];

static void fail(const char *what, uint64_t seed, const char *msg)
{
    dprintf(1, "FAIL %s seed=%#llx:%s\n", what, (unsigned long long)seed, msg);
    _exit(3);
}

static void *hammer(void *arg)
{
    long k = (long)arg;
    uint64_t i = 0;
    char msg[1024];
    while (!stopping) {
        uint64_t seed = ((uint64_t)k << 56) ^ (i * 0x9e3779b97f4a7c15ULL);
        uint64_t out[PROBE_OUT_WORDS];
        memset(out, 0, sizeof out);
        probe_regs(seed, out);
        if (check_regs(seed, out, 0, msg, sizeof msg))
            fail("regs", seed, msg);
        long x = (long)(seed >> 1);
        if (life_int3(x) != x + 2)
            fail("int3", seed, " wrong result");
        if (PTPROBE_SDT_ENABLED(life, cycle)) {
            enabled[k]++;
            PTPROBE_SDT_PROBE_SEM(life, cycle, k, i);
        }
        passes[k] = ++i;
    }
    return NULL;
}

int main(int argc, char **argv)
{
    long nthreads = argc > 1 ? atol(argv[1]) : 4;
    if (nthreads < 1 || nthreads > 63)
        return 2;
    pthread_t threads[64];
    for (long k = 0; k < nthreads; k++)
        pthread_create(&threads[k], NULL, hammer, (void *)(k + 1));
    dprintf(1, "ready %d\n", (int)getpid());
    for (;;) {
        char c;
        if (read(0, &c, 1) != 1 || c == 'q')
            break;
    }
    stopping = 1;
    uint64_t total = 0, on = 0;
    for (long k = 0; k < nthreads; k++) {
        pthread_join(threads[k], NULL);
        total += passes[k + 1];
        on += enabled[k + 1];
    }
    dprintf(1, "done passes=%llu enabled=%llu sem=%d\n", (unsigned long long)total,
            (unsigned long long)on, *(volatile unsigned short *)&life_cycle_semaphore);
    return 0;
}

/* A shared library with USDT probes, one of them guarded by a semaphore
 * (built by tests/test_elf.py with -shared -fPIC). */
#define PTPROBE_SDT_NOP PTPROBE_SDT_NOP_5
#include "ptprobe_sdt.h"

PTPROBE_SDT_SEMAPHORE(ptlib, ready);

static int calls;

int ptlib_work(int x, long y)
{
    calls++;
    PTPROBE_SDT_PROBE_NOP(PTPROBE_SDT_NOP_1, ptlib, plain, x, calls);
    if (PTPROBE_SDT_ENABLED(ptlib, ready))
        PTPROBE_SDT_PROBE_SEM(ptlib, ready, x, y, &calls);
    return x + (int)y + calls;
}

/* A plugin (build as liblifeplug.so) that life_dlopen.c loads with dlopen.
 *
 *   long plug_work(long i)     calls plug_func(i) and, while the semaphore of the USDT
 *                              probe lifeplug:work is up, counts the pass in
 *                              plug_enabled and passes the probe (a 5-byte NOP site)
 *   long plug_func(long x)     3 * x + 1 (a function probe, an int3 site)
 *   int plug_semaphore(void)   the semaphore's value
 */
#define PTPROBE_SDT_NOP PTPROBE_SDT_NOP_5
#include "ptprobe_sdt.h"

PTPROBE_SDT_SEMAPHORE(lifeplug, work);

long plug_enabled;

__attribute__((noipa)) long plug_func(long x)
{
    return 3 * x + 1;
}

long plug_work(long i)
{
    long r = plug_func(i);
    if (PTPROBE_SDT_ENABLED(lifeplug, work)) {
        plug_enabled++;
        PTPROBE_SDT_PROBE_SEM(lifeplug, work, i, r);
    }
    return r;
}

int plug_semaphore(void)
{
    return *(volatile unsigned short *)&lifeplug_work_semaphore;
}

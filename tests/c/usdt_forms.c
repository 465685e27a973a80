/* USDT probes in every site form, argument count and argument type that
 * ptprobe_sdt.h supports.  Built by tests/test_elf.py; also usable as a live
 * target: it runs each probe once (or N times with argv[1]). */
#include <stdint.h>
#include <stdlib.h>
#include "ptprobe_sdt.h"

PTPROBE_SDT_SEMAPHORE(ptforms, guarded);

int8_t g_s8 = -5;
uint16_t g_u16 = 65535;
int32_t g_s32 = -100000;
uint64_t g_u64 = 0xfedcba9876543210ULL;
double g_double = 2.5;
float g_float = -1.25f;
char g_text[] = "hello";

__attribute__((noinline)) void forms(long a, unsigned b, short c, unsigned char d)
{
    PTPROBE_SDT_PROBE_NOP(PTPROBE_SDT_NOP_1, ptforms, nop1, a);
    PTPROBE_SDT_PROBE_NOP(PTPROBE_SDT_NOP_5, ptforms, nop5, a, b);
    PTPROBE_SDT_PROBE_NOP(PTPROBE_SDT_NOP_1_5, ptforms, nop1_nop5, a, b, c);
    PTPROBE_SDT_PROBE_NOP(PTPROBE_SDT_NOP_1_10, ptforms, nop1_nop10, a, b, c, d);
    PTPROBE_SDT_PROBE(ptforms, default_form);
}

__attribute__((noinline)) void types(void)
{
    PTPROBE_SDT_PROBE(ptforms, types, g_s8, g_u16, g_s32, g_u64, g_double, g_float, g_text,
                      (void *)&g_s32);
    PTPROBE_SDT_PROBE(ptforms, constants, 42, -7, 0xffffffffu, (unsigned char)200, (long long)-1);
}

__attribute__((noinline)) void many(int n)
{
    PTPROBE_SDT_PROBE(ptforms, twelve, n, n + 1, n + 2, n + 3, n + 4, n + 5, n + 6, n + 7,
                      n + 8, n + 9, n + 10, n + 11);
}

__attribute__((noinline)) void guarded(int n)
{
    if (PTPROBE_SDT_ENABLED(ptforms, guarded))
        PTPROBE_SDT_PROBE_SEM(ptforms, guarded, n);
}

int main(int argc, char **argv)
{
    int count = argc > 1 ? atoi(argv[1]) : 1;
    for (int i = 0; i < count; i++) {
        forms(-3, 4000000000u, -2, 250);
        types();
        many(i);
        guarded(i);
    }
    return 0;
}

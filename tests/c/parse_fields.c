/* USDT arguments that are fields of globals, with memory operands allowed
 * ("nor"): gcc 12 prints them as NUM+SYM(%rip) in a PIE (40+CheckpointStats,
 * as in PostgreSQL 15) and as SYM+NUM(%rip) without PIE. Read by
 * tests/test_usdt_parse.py, which evaluates the arguments from the file. */
#define PTPROBE_SDT_ARG_CONSTRAINT "nor"
#include "ptprobe_sdt.h"

struct stats {
    long counts[5];
    int written;
    short level;
    int synced;
};

struct stats CheckpointStats = { { 1, 2, 3, 4, 5 }, -123, -2, 456 };
static struct { int x; short t1; } t1_holder = { 7, -9 };
int table[8] = { 10, 11, 12, 13, 14, 15, 16, 17 };

__attribute__((noinline)) void checkpoint_done(void)
{
    PTPROBE_SDT_PROBE(ptfields, checkpoint_done, CheckpointStats.written, CheckpointStats.level,
                      CheckpointStats.synced, CheckpointStats.counts[0], t1_holder.t1, table[3]);
}

int main(int argc, char **argv)
{
    (void)argv;
    if (argc > 5)           /* never: keeps t1_holder a variable, not a constant */
        t1_holder.t1 = (short)argc;
    checkpoint_done();
    return 0;
}

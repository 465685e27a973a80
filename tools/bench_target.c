/* bench_target.c - the loops tools/bench.py measures (built non-PIE at run time).
 *
 *   bench_target MODE N [THREADS [WARMUP [OUTFILE [BUSY]]]]
 *
 * Each of THREADS worker threads (default 1) calls the probe site WARMUP times
 * (default 0), waits at a barrier, then calls it N times.  The target times the
 * measured phase itself (CLOCK_MONOTONIC through the vDSO, no syscall), from
 * the first worker's start after the barrier to the last worker's end, and
 * writes one line
 *
 *     mode=MODE threads=T iterations=N*T ns=ELAPSED
 *
 * to OUTFILE (default stdout).  Warm-up and thread creation stay outside the
 * measured time, so a tracer's start-up cost does not count.  THREADS 0 makes
 * a single-threaded program: the main thread runs the loop (reported as T=1).
 *
 * BUSY (default 0) more threads never call the site: they count loop rounds
 * from their start to the end, and the line gets "busy_ops=R busy_ns=T", the
 * rounds they made in the T nanoseconds of the measured phase (as the main
 * thread sees it): what a program's threads that hit no probe get done.
 *
 * MODE names the probe site.  Every site is a global label (probe it as
 * "uprobe:PATH:LABEL"; the kernel takes its file offset) at the first byte of
 * a tiny function written in assembly, so its bytes are exactly known:
 *
 *     nop1         site_nop1:        90                            (int3, emulated)
 *     push         site_push:        55  (push %rbp; function entry, no nop-mcount)
 *     ret          site_ret:         c3  (executed out of line under int3)
 *     nop5         site_nop5:        0f 1f 44 00 00                (jmp-capable)
 *     usdt_nop     site_usdt_nop:    90  (USDT default form)
 *     usdt_nop1_5  site_usdt_nop1_5: 90 0f 1f 44 00 00             (jmp over note+1)
 *     usdt_nop1_10 site_usdt_nop1_10: 90 66 2e 0f 1f 84 00 00 00 00 00
 *     syscall      no site: syscall(SYS_getpgid, 0) per iteration
 *     fair         no timing: THREADS threads (up to 64) call site_nop5 until N
 *                  seconds have passed, each counting its calls, then the target
 *                  writes "mode=fair threads=T seconds=N counts=C1,C2,..." (the
 *                  per-thread progress tools/bench.py reports as fairness)
 *     many         no loop: the binary holds many_nop5_0 .. many_nop5_999 (nop5
 *                  sites) and many_insn_0 .. many_insn_999 (mov %rdi,%rax, a
 *                  non-NOP instruction: int3 out of line), and usdt_many: 1000
 *                  USDT sites benchmany:site (nop5 form, one note each); each
 *                  site runs N times.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define SITE_FN(name, bytes)                                  \
    __asm__(".text\n"                                         \
            ".globl bench_" #name "\n"                        \
            ".type bench_" #name ", @function\n"              \
            "bench_" #name ":\n"                              \
            ".globl site_" #name "\n"                         \
            "site_" #name ":\n"                               \
            bytes "\n"                                        \
            ".size bench_" #name ", .-bench_" #name "\n");    \
    void bench_##name(void)

SITE_FN(nop1, "    nop\n    ret");
SITE_FN(push, "    push %rbp\n    mov %rsp, %rbp\n    pop %rbp\n    ret");
/* the probed ret is the function's only instruction */
SITE_FN(ret, "    ret");
SITE_FN(nop5, "    .byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n    ret");
SITE_FN(usdt_nop, "    nop\n    ret");
SITE_FN(usdt_nop1_5, "    .byte 0x90, 0x0f, 0x1f, 0x44, 0x00, 0x00\n    ret");
SITE_FN(usdt_nop1_10, "    .byte 0x90, 0x66, 0x2e, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00\n    ret");

/* 1000 nop5 sites and 1000 non-NOP sites, each a function of its own. */
void many_first_nop5(void);
void many_first_insn(void);
__asm__(".text\n"
        ".altmacro\n"
        ".macro bench_many_site kind, n, code\n"
        ".globl many_\\kind\\()_\\n\n"
        ".type many_\\kind\\()_\\n, @function\n"
        "many_\\kind\\()_\\n:\n"
        "    \\code\n"
        "    ret\n"
        ".size many_\\kind\\()_\\n, .-many_\\kind\\()_\\n\n"
        ".endm\n"
        ".globl many_first_nop5\n"
        "many_first_nop5:\n"
        ".set bench_i, 0\n"
        ".rept 1000\n"
        "    bench_many_site nop5, %bench_i, <.byte 0x0f,0x1f,0x44,0x00,0x00>\n"
        "    .set bench_i, bench_i + 1\n"
        ".endr\n"
        ".globl many_first_insn\n"
        "many_first_insn:\n"
        ".set bench_i, 0\n"
        ".rept 1000\n"
        "    bench_many_site insn, %bench_i, <mov %rdi,%rax>\n"
        "    .set bench_i, bench_i + 1\n"
        ".endr\n"
        ".noaltmacro\n");

/* 1000 USDT probe sites benchmany:site (nop5 form), all in usdt_many: one
 * "usdt:PATH:benchmany:site" probe arms them in one batch.  Each note is
 * owner "stapsdt", type 3: location, base, semaphore (0), provider, name, args. */
void usdt_many(void);
__asm__(".pushsection .stapsdt.base, \"a\", \"progbits\"\n"
        ".weak _.stapsdt.base\n"
        ".hidden _.stapsdt.base\n"
        "_.stapsdt.base: .space 1\n"
        ".size _.stapsdt.base, 1\n"
        ".popsection\n"
        ".text\n"
        ".globl usdt_many\n"
        ".type usdt_many, @function\n"
        "usdt_many:\n"
        ".rept 1000\n"
        "990: .byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n"
        ".pushsection .note.stapsdt, \"\", \"note\"\n"
        ".balign 4\n"
        ".4byte 992f - 991f, 994f - 993f, 3\n"
        "991: .asciz \"stapsdt\"\n"
        "992: .balign 4\n"
        "993: .8byte 990b, _.stapsdt.base, 0\n"
        ".asciz \"benchmany\"\n"
        ".asciz \"site\"\n"
        ".asciz \"\"\n"
        "994: .balign 4\n"
        ".popsection\n"
        ".endr\n"
        "    ret\n"
        ".size usdt_many, .-usdt_many\n");

static void do_syscall(void)
{
    syscall(SYS_getpgid, 0);
}

struct mode {
    const char *name;
    void (*fn)(void);
};

static const struct mode modes[] = {
    {"nop1", bench_nop1},
    {"push", bench_push},
    {"ret", bench_ret},
    {"nop5", bench_nop5},
    {"usdt_nop", bench_usdt_nop},
    {"usdt_nop1_5", bench_usdt_nop1_5},
    {"usdt_nop1_10", bench_usdt_nop1_10},
    {"syscall", do_syscall},
    {NULL, NULL},
};

static void (*volatile site_fn)(void);
static long iterations, warmup;
static pthread_barrier_t start_line;

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int threaded = 1;     /* 0: THREADS was 0, the main thread runs the loop itself */

/* the busy threads' round counters, one cache line each */
static struct {
    volatile unsigned long rounds;
    char pad[56];
} busy_counts[64] __attribute__((aligned(64)));
static volatile int busy_stop;

static void *busy(void *arg)
{
    volatile unsigned long *rounds = &busy_counts[(long)arg].rounds;
    while (!busy_stop)
        (*rounds)++;
    return NULL;
}

static unsigned long busy_total(int n)
{
    unsigned long total = 0;
    for (int i = 0; i < n; i++)
        total += busy_counts[i].rounds;
    return total;
}

struct span {
    long long start, end;
};

/* Each worker times its own measured phase; the result spans the earliest
 * start to the latest end (the main thread may wake from the barrier late). */
static void *worker(void *arg)
{
    struct span *span = arg;
    void (*fn)(void) = site_fn;
    for (long i = 0; i < warmup; i++)
        fn();
    if (threaded)
        pthread_barrier_wait(&start_line);
    span->start = now_ns();
    for (long i = 0; i < iterations; i++)
        fn();
    span->end = now_ns();
    return NULL;
}

static volatile int fair_stop;
static volatile long fair_counts[64];

static void *fair_worker(void *arg)
{
    long k = (long)arg;
    while (!fair_stop) {
        bench_nop5();
        fair_counts[k]++;
    }
    return NULL;
}

static int run_fair(long seconds, int threads, const char *outfile)
{
    pthread_t tids[64];
    if (threads < 1 || threads > 64 || seconds < 0) {
        fprintf(stderr, "fair: 1 to 64 threads\n");
        return 2;
    }
    for (long k = 0; k < threads; k++)
        if (pthread_create(&tids[k], NULL, fair_worker, (void *)k) != 0) {
            perror("pthread_create");
            return 1;
        }
    sleep((unsigned)seconds);
    fair_stop = 1;
    for (int k = 0; k < threads; k++)
        pthread_join(tids[k], NULL);
    FILE *out = strcmp(outfile, "-") == 0 ? stdout : fopen(outfile, "w");
    if (out == NULL) {
        perror(outfile);
        return 1;
    }
    fprintf(out, "mode=fair threads=%d seconds=%ld counts=", threads, seconds);
    for (int k = 0; k < threads; k++)
        fprintf(out, "%s%ld", k ? "," : "", fair_counts[k]);
    fprintf(out, "\n");
    fclose(out);
    return 0;
}

static int run_many(long n)
{
    /* every function is ".byte/insn; ret": 6 bytes (nop5) or 4 bytes (mov) apart */
    char *p = (char *)many_first_nop5;
    for (long r = 0; r < n; r++) {
        char *q = p;
        for (int i = 0; i < 1000; i++, q += 6)
            ((void (*)(void))q)();
        q = (char *)many_first_insn;
        for (int i = 0; i < 1000; i++, q += 4)
            ((void (*)(void))q)();
        usdt_many();
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODE N [THREADS [WARMUP [OUTFILE]]]\n", argv[0]);
        return 2;
    }
    const char *mode = argv[1];
    iterations = strtol(argv[2], NULL, 0);
    int threads = argc > 3 ? atoi(argv[3]) : 1;
    warmup = argc > 4 ? strtol(argv[4], NULL, 0) : 0;
    const char *outfile = argc > 5 ? argv[5] : "-";
    int busies = argc > 6 ? atoi(argv[6]) : 0;
    if (strcmp(mode, "many") == 0)
        return run_many(iterations);
    if (strcmp(mode, "fair") == 0)
        return run_fair(iterations, threads, outfile);
    for (const struct mode *m = modes; m->name; m++)
        if (strcmp(m->name, mode) == 0)
            site_fn = m->fn;
    if (site_fn == NULL || threads < 0 || threads > 64 || iterations < 0 || busies < 0 || busies > 64) {
        fprintf(stderr, "%s: bad mode, count or thread count\n", argv[0]);
        return 2;
    }
    pthread_t tids[64], busy_tids[64];
    struct span spans[64];
    long long first = 0, last = 0, busy_start = 0, busy_end = 0;
    unsigned long busy_before = 0, busy_after = 0;
    for (int i = 0; i < busies; i++)
        if (pthread_create(&busy_tids[i], NULL, busy, (void *)(long)i) != 0) {
            perror("pthread_create");
            return 1;
        }
    if (threads == 0 && busies) {
        fprintf(stderr, "%s: BUSY threads need THREADS > 0\n", argv[0]);
        return 2;
    }
    if (threads == 0) {
        threaded = 0;
        threads = 1;
        worker(&spans[0]);
        first = spans[0].start;
        last = spans[0].end;
        goto report;
    }
    pthread_barrier_init(&start_line, NULL, (unsigned)threads + 1);
    for (int i = 0; i < threads; i++)
        if (pthread_create(&tids[i], NULL, worker, &spans[i]) != 0) {
            perror("pthread_create");
            return 1;
        }
    pthread_barrier_wait(&start_line);
    busy_start = now_ns();
    busy_before = busy_total(busies);
    for (int i = 0; i < threads; i++) {
        pthread_join(tids[i], NULL);
        if (i == 0 || spans[i].start < first)
            first = spans[i].start;
        if (i == 0 || spans[i].end > last)
            last = spans[i].end;
    }
    busy_after = busy_total(busies);
    busy_end = now_ns();
report:;
    busy_stop = 1;
    for (int i = 0; i < busies; i++)
        pthread_join(busy_tids[i], NULL);
    long long elapsed = last - first;
    FILE *out = strcmp(outfile, "-") == 0 ? stdout : fopen(outfile, "w");
    if (out == NULL) {
        perror(outfile);
        return 1;
    }
    fprintf(out, "mode=%s threads=%d iterations=%ld ns=%lld", mode, threads, iterations * threads, elapsed);
    if (busies)
        fprintf(out, " busy=%d busy_ops=%lu busy_ns=%lld", busies, busy_after - busy_before, busy_end - busy_start);
    fprintf(out, "\n");
    fclose(out);
    return 0;
}

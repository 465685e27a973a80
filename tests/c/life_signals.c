/* Signals a traced program takes, one mode per run. Every mode passes life_nop5 and
 * life_int3 before and after its signal business (and in its handlers).
 *
 *   life_signals stop     prints "stopping", raise(SIGSTOP); once continued prints
 *                         "continued", exits 0
 *   life_signals rt N     real-time signals with values: (1) with them blocked,
 *                         queues N SIGRTMIN+1 then N SIGRTMIN+2 to itself (values
 *                         0..N-1), unblocks: all of +1 must arrive in order, then all
 *                         of +2; (2) a second thread queues N SIGRTMIN+3 to the main
 *                         thread, which passes the sites in a loop meanwhile: all must
 *                         arrive, in order. The handler passes the sites too. Prints
 *                         "rt received=R ok=1" (R signals), exits 0 (1 if not ok)
 *   life_signals segv N   N times: writes to a PROT_NONE guard page; the SIGSEGV
 *                         handler checks si_addr, makes the page writable and returns,
 *                         so the write completes; the page is protected again. Prints
 *                         "segv handled=H ok=1", exits 0 (1 if not ok)
 *   life_signals kill     kill(getpid(), SIGKILL)
 *   life_signals abort    abort()
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

long life_nop5(long);
long life_int3(long);

static volatile sig_atomic_t bad;

static void sites(long x)
{
    if (life_nop5(x) != x + 1 || life_int3(x) != x + 2)
        bad = 1;
}

/* ---- real-time signals */

#define RT_MAX 256
static volatile int rt_sig[3 * RT_MAX], rt_val[3 * RT_MAX];
static volatile int rt_count;

static void rt_handler(int sig, siginfo_t *info, void *ctx)
{
    (void)ctx;
    sites(sig);
    int k = rt_count;
    if (k < 3 * RT_MAX) {
        rt_sig[k] = sig;
        rt_val[k] = info->si_value.sival_int;
        rt_count = k + 1;
    }
}

static pthread_t main_thread;
static int rt_n;

static void *rt_sender(void *arg)
{
    (void)arg;
    for (int i = 0; i < rt_n; i++) {
        union sigval v = {.sival_int = 2000 + i};
        while (pthread_sigqueue(main_thread, SIGRTMIN + 3, v) != 0)
            sched_yield();    /* EAGAIN: the queue is full for a moment */
    }
    return NULL;
}

static int rt_mode(int n)
{
    if (n > RT_MAX)
        n = RT_MAX;
    rt_n = n;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = rt_handler;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    for (int s = 1; s <= 3; s++)        /* one handler at a time: delivery order = run order */
        sigaddset(&sa.sa_mask, SIGRTMIN + s);
    for (int s = 1; s <= 3; s++)
        sigaction(SIGRTMIN + s, &sa, NULL);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGRTMIN + 1);
    sigaddset(&set, SIGRTMIN + 2);
    sigprocmask(SIG_BLOCK, &set, NULL);
    for (int s = 2; s >= 1; s--)        /* queue +2 first: delivery is by number */
        for (int i = 0; i < n; i++) {
            union sigval v = {.sival_int = 1000 * s + i};
            if (sigqueue(getpid(), SIGRTMIN + s, v) != 0) {
                perror("sigqueue");
                return 1;
            }
        }
    sites(1);
    sigprocmask(SIG_UNBLOCK, &set, NULL);
    sites(2);
    int ok = rt_count == 2 * n;
    for (int i = 0; ok && i < 2 * n; i++) {
        int s = i < n ? 1 : 2;
        if (rt_sig[i] != SIGRTMIN + s || rt_val[i] != 1000 * s + i % n) {
            dprintf(1, "rt phase 1: signal %d is %d value %d\n", i, rt_sig[i], rt_val[i]);
            ok = 0;
        }
    }
    main_thread = pthread_self();
    pthread_t t;
    pthread_create(&t, NULL, rt_sender, NULL);
    for (long i = 0; rt_count < 3 * n; i++)
        sites(i);
    pthread_join(t, NULL);
    for (int i = 2 * n; ok && i < 3 * n; i++) {
        if (rt_sig[i] != SIGRTMIN + 3 || rt_val[i] != 2000 + i - 2 * n) {
            dprintf(1, "rt phase 2: signal %d is %d value %d\n", i, rt_sig[i], rt_val[i]);
            ok = 0;
        }
    }
    ok = ok && !bad && rt_count == 3 * n;
    dprintf(1, "rt received=%d ok=%d\n", (int)rt_count, ok);
    return ok ? 0 : 1;
}

/* ---- SIGSEGV on purpose */

static char *guard;
static long pagesize;
static volatile int segv_handled, segv_wrong;

static void segv_handler(int sig, siginfo_t *info, void *ctx)
{
    (void)sig;
    (void)ctx;
    sites(7);
    char *addr = (char *)info->si_addr;
    if (addr < guard || addr >= guard + pagesize) {
        segv_wrong = 1;
        _exit(3);                       /* a fault we did not plan */
    }
    mprotect(guard, pagesize, PROT_READ | PROT_WRITE);
    segv_handled++;
}

static int segv_mode(int n)
{
    pagesize = sysconf(_SC_PAGESIZE);
    char *area = mmap(NULL, 2 * pagesize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (area == MAP_FAILED)
        return 1;
    guard = area + pagesize;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = segv_handler;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &sa, NULL);
    int ok = 1;
    for (int i = 0; i < n; i++) {
        mprotect(guard, pagesize, PROT_NONE);
        sites(i);
        ((volatile char *)guard)[i % pagesize] = (char)(i + 1);
        sites(i);
        if (guard[i % pagesize] != (char)(i + 1))
            ok = 0;
    }
    ok = ok && !bad && !segv_wrong && segv_handled == n;
    dprintf(1, "segv handled=%d ok=%d\n", (int)segv_handled, ok);
    return ok ? 0 : 1;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    const char *mode = argv[1];
    int n = argc > 2 ? atoi(argv[2]) : 10;
    sites(0);
    if (strcmp(mode, "stop") == 0) {
        dprintf(1, "stopping\n");
        raise(SIGSTOP);
        sites(1);
        dprintf(1, "continued\n");
        return bad;
    }
    if (strcmp(mode, "rt") == 0)
        return rt_mode(n);
    if (strcmp(mode, "segv") == 0)
        return segv_mode(n);
    if (strcmp(mode, "kill") == 0) {
        kill(getpid(), SIGKILL);
        return 1;
    }
    if (strcmp(mode, "abort") == 0)
        abort();
    return 2;
}

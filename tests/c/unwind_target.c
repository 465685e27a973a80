/* Stack shapes for tests/test_unwind.py: each mode builds a call chain and stops
 * the process at its deepest point (stop_here: SIGSTOP to the calling thread, sent
 * through libc's syscall()), so that the stopped state can be unwound and compared
 * with gdb's backtrace.
 *
 *   chain          main -> chain1 -> ... -> chain5 -> stop_here
 *   recurse N      main -> recurse (N times) -> stop_here
 *   qsort          main -> qsort (libc) -> ... -> compare_stop -> stop_here
 *   lib            main -> outer_exe -> lib_enter (.so) -> lib_middle (.so)
 *                  -> exe_callback -> stop_here            (built with -DWITH_LIB)
 *   signal         main -> spin_until_signal, interrupted by SIGALRM (10 ms timer) -> on_signal -> stop_here
 *   thread         a second thread: thread_main -> chain1 -> ... -> chain5 -> stop_here
 *   entry          main -> chain1 -> ... -> chain5 -> entry_target (no self-stop: the
 *                  test places a breakpoint at entry_target)
 *
 * With UNWIND_WAIT set in the environment, main first writes "ready" to stdout and
 * reads one byte from stdin, so that a test can attach and place breakpoints before
 * the chain runs.
 *
 * Every function is noinline and does a volatile store after its call, so that no
 * call is a tail call and each function keeps its own frame.
 */
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline))

volatile int sink;

/* SIGSTOP to the calling thread itself (a process-directed kill() may be taken by
 * another thread, and this one would run on until the group stop reaches it). */
NOINLINE void stop_here(void) {
    syscall(SYS_tgkill, getpid(), (pid_t)syscall(SYS_gettid), SIGSTOP);
    sink++;
}

NOINLINE void entry_target(int x) {
    sink += x;
}

static int use_entry_target;

NOINLINE void chain5(int x) {
    if (use_entry_target)
        entry_target(x);
    else
        stop_here();
    sink += x;
}

NOINLINE void chain4(int x) { chain5(x + 1); sink += x; }
NOINLINE void chain3(int x) { chain4(x + 1); sink += x; }
NOINLINE void chain2(int x) { chain3(x + 1); sink += x; }
NOINLINE void chain1(int x) { chain2(x + 1); sink += x; }

NOINLINE void recurse(int n) {
    if (n <= 1)
        stop_here();
    else
        recurse(n - 1);
    sink += n;
}

static int stopped_in_compare;

NOINLINE int compare_stop(const void *a, const void *b) {
    int x = *(const int *)a, y = *(const int *)b;
    if (!stopped_in_compare) {
        stopped_in_compare = 1;
        stop_here();
    }
    sink++;
    return (x > y) - (x < y);
}

#ifdef WITH_LIB
int lib_enter(int x, int (*callback)(int));

NOINLINE int exe_callback(int x) {
    stop_here();
    sink += x;
    return x + 1;
}

NOINLINE int outer_exe(int x) {
    int r = lib_enter(x, exe_callback);
    sink += r;
    return r;
}
#endif

static volatile sig_atomic_t got_signal;

NOINLINE void on_signal(int sig) {
    (void)sig;
    stop_here();
    got_signal = 1;
}

NOINLINE void spin_until_signal(void) {
    while (!got_signal)
        sink++;
}

NOINLINE void *thread_main(void *arg) {
    chain1(1);
    sink++;
    return arg;
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "chain";
    if (getenv("UNWIND_WAIT")) {
        char byte;
        if (write(1, "ready\n", 6) != 6 || read(0, &byte, 1) != 1)
            return 3;
    }
    if (strcmp(mode, "chain") == 0) {
        chain1(1);
    } else if (strcmp(mode, "recurse") == 0) {
        recurse(argc > 2 ? atoi(argv[2]) : 50);
    } else if (strcmp(mode, "qsort") == 0) {
        int values[64];
        for (int i = 0; i < 64; i++)
            values[i] = (i * 37) % 64;
        qsort(values, 64, sizeof values[0], compare_stop);
        sink += values[0];
#ifdef WITH_LIB
    } else if (strcmp(mode, "lib") == 0) {
        outer_exe(1);
#endif
    } else if (strcmp(mode, "signal") == 0) {
        struct itimerval soon = {{0, 0}, {0, 10000}};
        sigset_t alarm_only;
        sigemptyset(&alarm_only);
        sigaddset(&alarm_only, SIGALRM);
        sigprocmask(SIG_UNBLOCK, &alarm_only, NULL);   /* a blocked mask is inherited */
        signal(SIGALRM, on_signal);
        setitimer(ITIMER_REAL, &soon, NULL);
        spin_until_signal();
    } else if (strcmp(mode, "thread") == 0) {
        pthread_t thread;
        if (pthread_create(&thread, NULL, thread_main, NULL) != 0)
            return 2;
        pthread_join(thread, NULL);
    } else if (strcmp(mode, "entry") == 0) {
        use_entry_target = 1;
        chain1(1);
    } else {
        return 2;
    }
    sink++;
    return 0;
}

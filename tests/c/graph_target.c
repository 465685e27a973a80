/* graph_target.c - functions whose calls ptprobe's call graphs record (built with
 * -pg -mfentry -mnop-mcount, or -fpatchable-function-entry=5).
 *
 *   graph_target fib N          fib(N), recursive; prints "fib R"
 *   graph_target threads T N    T threads each call outer(i) N times: outer -> middle -> inner
 *   graph_target longjmp N      N times: jumper() -> deep1 -> deep2 -> deep3 longjmps back
 *                               into jumper, which then returns normally, and calls inner()
 *   graph_target signal N       N times: outer() is interrupted (raise) by a SIGUSR1 handler
 *                               that calls inner() twice
 *   graph_target fork           forker() -> middle(): forks inside; both return normally;
 *                               prints "pid P forked" from each process
 *   graph_target exec           execer() -> exec of itself with "fib 5" (frames pending)
 *   graph_target exit           quitter() calls inner(), then exit(3) inside it
 *   graph_target tail N         N times: tail_a() tail-calls tail_b(), which tail-calls
 *                               tail_c() (at -O2: jmp, the return address shared);
 *                               prints "tail S"
 *   graph_target wait [PACE [dlopen]]
 *                               calls outer() in a loop, printing "progress N" every 100000
 *                               calls, until a byte arrives on stdin; prints "sum S calls N";
 *                               with PACE, sleeps a millisecond after every PACE calls; with
 *                               dlopen, then loads libm.so.6 and prints "dlopen ok"
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include <fcntl.h>
#include <dlfcn.h>

#define NOINLINE __attribute__((noinline))
static volatile long sink;

NOINLINE long fib(long n) { return n < 2 ? n : fib(n - 1) + fib(n - 2); }
NOINLINE long inner(long x) { sink += x; return x + 1; }
NOINLINE long middle(long x) { return inner(x) + inner(x + 1); }
NOINLINE long outer(long x) { return middle(x) * 2; }

static jmp_buf env;
NOINLINE void deep3(long x) { sink += x; longjmp(env, 1); }
NOINLINE void deep2(long x) { deep3(x + 1); sink++; }
NOINLINE void deep1(long x) { deep2(x + 1); sink++; }
NOINLINE long jumper(long x)
{
    if (setjmp(env) == 0)
        deep1(x);
    return inner(x);
}

static void on_usr1(int sig) { (void)sig; inner(1); inner(2); }
NOINLINE long raiser(long x) { raise(SIGUSR1); return x; }
NOINLINE long signalled(long x) { return raiser(x) + 1; }

NOINLINE long forker(long x)
{
    pid_t pid = fork();
    long r = middle(x);
    printf("pid %d forked\n", (int)getpid());
    if (pid > 0)
        waitpid(pid, NULL, 0);
    else
        _exit(0);
    return r;
}

static char *self;
NOINLINE void execer(void)
{
    char *args[] = {self, "fib", "5", NULL};
    execv("/proc/self/exe", args);
}

NOINLINE long tail_c(long x) { sink += x; return x + 3; }
NOINLINE long tail_b(long x) { return tail_c(x * 2); }
NOINLINE long tail_a(long x) { return tail_b(x + 1); }

NOINLINE void quitter(void) { inner(7); fflush(stdout); exit(3); }

static long n_calls;
static void *worker(void *arg)
{
    long sum = 0;
    for (long i = 0; i < n_calls; i++)
        sum += outer(i + (long)arg);
    return (void *)sum;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    self = argv[0];
    if (argc < 2)
        return 2;
    const char *mode = argv[1];
    long n = argc > 2 ? atol(argv[2]) : 1;
    if (!strcmp(mode, "fib")) {
        printf("fib %ld\n", fib(n));
    } else if (!strcmp(mode, "threads")) {
        n_calls = argc > 3 ? atol(argv[3]) : 100;
        pthread_t t[64];
        for (long i = 0; i < n && i < 64; i++)
            pthread_create(&t[i], NULL, worker, (void *)(i * 1000000));
        for (long i = 0; i < n && i < 64; i++)
            pthread_join(t[i], NULL);
        printf("threads done\n");
    } else if (!strcmp(mode, "longjmp")) {
        for (long i = 0; i < n; i++)
            jumper(i);
        printf("longjmp done\n");
    } else if (!strcmp(mode, "signal")) {
        signal(SIGUSR1, on_usr1);
        for (long i = 0; i < n; i++)
            signalled(i);
        printf("signal done\n");
    } else if (!strcmp(mode, "fork")) {
        forker(5);
    } else if (!strcmp(mode, "exec")) {
        execer();
        return 4;
    } else if (!strcmp(mode, "tail")) {
        long sum = 0;
        for (long i = 0; i < n; i++)
            sum += tail_a(i);
        printf("tail %ld\n", sum);
    } else if (!strcmp(mode, "exit")) {
        quitter();
    } else if (!strcmp(mode, "wait")) {
        fcntl(0, F_SETFL, O_NONBLOCK);
        long sum = 0, i = 0;
        char c;
        printf("ready\n");
        long pace = argc > 2 ? atol(argv[2]) : 0;
        while (read(0, &c, 1) != 1) {
            sum += outer(i++);
            if (i % 100000 == 0)
                printf("progress %ld\n", i);
            if (pace > 0 && i % pace == 0)
                usleep(1000);
        }
        printf("sum %ld calls %ld\n", sum, i);
        if (argc > 3 && !strcmp(argv[3], "dlopen"))
            printf(dlopen("libm.so.6", RTLD_NOW) ? "dlopen ok\n" : "dlopen failed\n");
    } else {
        return 2;
    }
    return 0;
}

/* Shapes of calls for tests/test_returns.py; argv[1] picks one:
 *
 *   fib N             fib(N), recursive; prints "fib N = R"
 *   threads T N       T threads, each calls work(k, i) N times (k = thread number 1..T);
 *                     prints "thread k sum S" (work returns k * 1000 + i)
 *   longjmp           deep(2, 1) -> deep(1) -> deep(0) longjmps out of the three, then
 *                     deep(3, 0) returns normally through four frames; prints the results
 *   siglongjmp        the same, deep(0) raises SIGUSR1 whose handler siglongjmps
 *   signal [alt]      leaf(1) raises SIGUSR1; the handler calls leaf(2) (on a sigaltstack
 *                     with "alt"); leaf(x) returns 10 * x; prints both
 *   fork              forker(5) forks inside; the child's forker returns 105, the parent's 5
 *   exit              quitter(7) calls exit(7) from inside
 *   exec PATH         execer(PATH) execs "PATH fib 5" from inside
 *   tail              tail_a(20) tail-calls tail_b(40), which returns 41
 */
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define NOIPA __attribute__((noipa))

/* a store after each recursive call keeps gcc from turning the recursion into a loop */
volatile long sink;

NOIPA long fib(long n)
{
    if (n < 2)
        return n;
    long a = fib(n - 1);
    long b = fib(n - 2);
    sink = a;
    return a + b;
}

NOIPA long work(long k, long i)
{
    return k * 1000 + i;
}

struct job {
    long k, n, sum;
};

static void *run_job(void *arg)
{
    struct job *job = arg;
    for (long i = 0; i < job->n; i++)
        job->sum += work(job->k, i);
    return NULL;
}

static jmp_buf env;
static sigjmp_buf senv;
static int use_signal;

static void jump_out(int sig)
{
    (void)sig;
    siglongjmp(senv, 1);
}

NOIPA int deep(int n, int jump)
{
    if (n == 0) {
        if (jump && use_signal)
            raise(SIGUSR1);
        else if (jump)
            longjmp(env, 1);
        return 0;
    }
    int r = deep(n - 1, jump);
    sink = r;
    return r + 1;
}

static int inner_result;

NOIPA int leaf(int x)
{
    if (x == 1)
        raise(SIGUSR1);
    return 10 * x;
}

static void call_leaf(int sig)
{
    (void)sig;
    inner_result = leaf(2);
}

NOIPA int forker(int x)
{
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    return pid == 0 ? x + 100 : x;
}

NOIPA void quitter(int code)
{
    fflush(stdout);
    exit(code);
}

NOIPA int execer(const char *path)
{
    fflush(stdout);
    execl(path, path, "fib", "5", (char *)NULL);
    return -1;
}

NOIPA long tail_b(long x)
{
    return x + 1;
}

NOIPA long tail_a(long x)
{
    return tail_b(x * 2);
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "fib";
    if (strcmp(mode, "fib") == 0) {
        long n = argc > 2 ? atol(argv[2]) : 20;
        printf("fib %ld = %ld\n", n, fib(n));
    } else if (strcmp(mode, "threads") == 0) {
        int t = atoi(argv[2]);
        long n = atol(argv[3]);
        pthread_t threads[64];
        struct job jobs[64];
        for (int i = 0; i < t; i++) {
            jobs[i] = (struct job){i + 1, n, 0};
            pthread_create(&threads[i], NULL, run_job, &jobs[i]);
        }
        for (int i = 0; i < t; i++) {
            pthread_join(threads[i], NULL);
            printf("thread %ld sum %ld\n", jobs[i].k, jobs[i].sum);
        }
    } else if (strcmp(mode, "longjmp") == 0 || strcmp(mode, "siglongjmp") == 0) {
        use_signal = mode[0] == 's';
        int jumped;
        if (use_signal) {
            signal(SIGUSR1, jump_out);
            jumped = sigsetjmp(senv, 1);
        } else {
            jumped = setjmp(env);
        }
        if (!jumped) {
            deep(2, 1);
            printf("not reached\n");
        }
        printf("jumped %d\n", jumped);
        printf("deep %d\n", deep(3, 0));
    } else if (strcmp(mode, "signal") == 0) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = call_leaf;
        if (argc > 2 && strcmp(argv[2], "alt") == 0) {
            static char altstack[65536];
            stack_t ss = {.ss_sp = altstack, .ss_size = sizeof altstack, .ss_flags = 0};
            sigaltstack(&ss, NULL);
            sa.sa_flags = SA_ONSTACK;
        }
        sigaction(SIGUSR1, &sa, NULL);
        int outer = leaf(1);
        printf("leaf %d %d\n", outer, inner_result);
    } else if (strcmp(mode, "fork") == 0) {
        int r = forker(5);
        if (r == 105) {
            printf("child %d\n", r);
            fflush(stdout);
            _exit(0);
        }
        int status;
        wait(&status);
        printf("parent %d child status %d\n", r, WIFEXITED(status) ? WEXITSTATUS(status) : -1);
    } else if (strcmp(mode, "exit") == 0) {
        printf("quitting\n");
        quitter(7);
    } else if (strcmp(mode, "exec") == 0) {
        printf("exec %d\n", execer(argv[2]));
        return 1;
    } else if (strcmp(mode, "tail") == 0) {
        printf("tail %ld\n", tail_a(20));
    } else {
        return 2;
    }
    return 0;
}

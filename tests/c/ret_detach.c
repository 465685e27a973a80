/* Threads stopped inside a probed function at detach, for tests/test_returns.py.
 *
 * N threads (argv[1]) each call inside() through call_inside(), which passes the
 * address the call returns to; inside() counts itself in, then waits until the
 * program gets SIGUSR1, then checks its own return address against that one.
 * main writes "inside N" to the file argv[2] once all are in, waits for SIGUSR1,
 * lets them go and prints "back N ok" (or what went wrong).
 */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static int entered, go, wrong;

__attribute__((noipa)) long inside(void *expected)
{
    pthread_mutex_lock(&lock);
    entered++;
    pthread_cond_broadcast(&cond);
    while (!go)
        pthread_cond_wait(&cond, &lock);
    if (__builtin_return_address(0) != expected)
        wrong++;
    pthread_mutex_unlock(&lock);
    return 7;
}

/* call_inside(): calls inside(address after the call), returns what it returned */
__asm__(".text\n"
        ".globl call_inside\n"
        ".type call_inside, @function\n"
        "call_inside:\n"
        "    sub $8, %rsp\n"
        "    lea 1f(%rip), %rdi\n"
        "    call inside\n"
        "1:  add $8, %rsp\n"
        "    ret\n"
        ".size call_inside, .-call_inside\n");

long call_inside(void);

static void *thread_main(void *arg)
{
    (void)arg;
    return (void *)call_inside();
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 100;
    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &usr1, NULL);
    pthread_t *threads = calloc(n, sizeof *threads);
    for (int i = 0; i < n; i++)
        if (pthread_create(&threads[i], NULL, thread_main, NULL) != 0)
            return 2;
    pthread_mutex_lock(&lock);
    while (entered < n)
        pthread_cond_wait(&cond, &lock);
    pthread_mutex_unlock(&lock);
    FILE *note = fopen(argv[2], "w");
    fprintf(note, "inside %d\n", n);
    fclose(note);
    int sig;
    sigwait(&usr1, &sig);
    pthread_mutex_lock(&lock);
    go = 1;
    pthread_cond_broadcast(&cond);
    pthread_mutex_unlock(&lock);
    int ok = 0;
    for (int i = 0; i < n; i++) {
        void *result;
        pthread_join(threads[i], &result);
        ok += result == (void *)7;
    }
    printf("back %d ok %d wrong %d\n", n, ok, wrong);
    return ok == n && wrong == 0 ? 0 : 1;
}

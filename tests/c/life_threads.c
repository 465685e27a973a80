/* Many long-lived threads, and two threads that keep creating short-lived ones.
 *
 *   life_threads LONG ROUNDPASSES
 *
 * Starts LONG long-lived threads (each prints "tid T" once it runs) and two spawner
 * threads that create and join short-lived threads in a loop (each short-lived thread
 * passes life_nop5 once), then prints "ready PID" (after every "tid" line). Commands on stdin, one byte each:
 *   g   every long-lived thread passes life_nop5 and life_int3 ROUNDPASSES times; when
 *       all have, the last one prints "round K done" (send the next "g" only then)
 *   q   (or end of input) stop everything, print "done spawned=S failures=F", exit 0
 *       (1 if a site ever returned a wrong value: F > 0)
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

long life_nop5(long);
long life_int3(long);

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static long round_no, finished, nlong, per_round;
static volatile int stopping;
static long failures, spawned, started;

static void check(long got, long want)
{
    if (got != want)
        __atomic_add_fetch(&failures, 1, __ATOMIC_SEQ_CST);
}

static void *long_lived(void *arg)
{
    long k = (long)arg, seen = 0;
    dprintf(1, "tid %ld\n", (long)syscall(SYS_gettid));
    pthread_mutex_lock(&lock);
    started++;
    pthread_cond_broadcast(&cond);
    pthread_mutex_unlock(&lock);
    for (;;) {
        pthread_mutex_lock(&lock);
        while (round_no == seen && !stopping)
            pthread_cond_wait(&cond, &lock);
        if (stopping) {
            pthread_mutex_unlock(&lock);
            return NULL;
        }
        seen = round_no;
        pthread_mutex_unlock(&lock);
        for (long i = 0; i < per_round; i++) {
            long x = k * 1000000 + seen * 1000 + i;
            check(life_nop5(x), x + 1);
            check(life_int3(x), x + 2);
        }
        pthread_mutex_lock(&lock);
        if (++finished % nlong == 0)
            dprintf(1, "round %ld done\n", finished / nlong);
        pthread_mutex_unlock(&lock);
    }
}

static void *short_lived(void *arg)
{
    long x = (long)arg;
    check(life_nop5(x), x + 1);
    return NULL;
}

static void *spawner(void *arg)
{
    (void)arg;
    while (!stopping) {
        pthread_t t;
        long x = __atomic_add_fetch(&spawned, 1, __ATOMIC_SEQ_CST);
        if (pthread_create(&t, NULL, short_lived, (void *)x) == 0)
            pthread_join(t, NULL);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    nlong = argc > 1 ? atol(argv[1]) : 64;
    per_round = argc > 2 ? atol(argv[2]) : 4;
    pthread_t *threads = calloc(nlong + 2, sizeof *threads);
    for (long k = 0; k < nlong; k++)
        pthread_create(&threads[k], NULL, long_lived, (void *)(k + 1));
    pthread_mutex_lock(&lock);
    while (started < nlong)
        pthread_cond_wait(&cond, &lock);
    pthread_mutex_unlock(&lock);
    for (long k = 0; k < 2; k++)
        pthread_create(&threads[nlong + k], NULL, spawner, NULL);
    dprintf(1, "ready %d\n", (int)getpid());
    for (;;) {
        char c;
        ssize_t n = read(0, &c, 1);
        if (n == 1 && c == 'g') {
            pthread_mutex_lock(&lock);
            round_no++;
            pthread_cond_broadcast(&cond);
            pthread_mutex_unlock(&lock);
            continue;
        }
        if (n == 1 && c != 'q')
            continue;
        break;
    }
    pthread_mutex_lock(&lock);
    stopping = 1;
    pthread_cond_broadcast(&cond);
    pthread_mutex_unlock(&lock);
    for (long k = 0; k < nlong + 2; k++)
        pthread_join(threads[k], NULL);
    dprintf(1, "done spawned=%ld failures=%ld\n", spawned, failures);
    return failures ? 1 : 0;
}

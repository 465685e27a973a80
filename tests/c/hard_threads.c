/* THREADS threads call hit() over and over, each counting its calls.
 *
 *   hard_threads THREADS SECONDS
 *
 * Prints "ready" once every thread has made its first call. With SECONDS > 0 the
 * threads stop after that many seconds (or at "q" or the end of stdin when SECONDS
 * is 0), and the program prints "count <k> <calls>" for each thread, then "done",
 * and exits 0. A signal ends it the default way.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_THREADS 256

static volatile int stopping;
static volatile uint64_t calls[MAX_THREADS];
static volatile int started;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

__attribute__((noipa)) uint64_t hit(uint64_t x)
{
    return x * 3 + 1;
}

static void *worker(void *arg)
{
    long k = (long)arg;
    uint64_t x = (uint64_t)k;
    int first = 1;
    while (!stopping) {
        x = hit(x);
        calls[k]++;
        if (first) {
            first = 0;
            pthread_mutex_lock(&lock);
            started++;
            pthread_mutex_unlock(&lock);
        }
    }
    return (void *)(uintptr_t)x;
}

int main(int argc, char **argv)
{
    long nthreads = argc > 1 ? strtol(argv[1], NULL, 0) : 4;
    long seconds = argc > 2 ? strtol(argv[2], NULL, 0) : 0;
    if (nthreads < 1 || nthreads > MAX_THREADS || seconds < 0) {
        fprintf(stderr, "usage: %s THREADS(1-%d) SECONDS\n", argv[0], MAX_THREADS);
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    pthread_t threads[MAX_THREADS];
    for (long k = 0; k < nthreads; k++)
        if (pthread_create(&threads[k], NULL, worker, (void *)k) != 0)
            return 100;
    for (;;) {
        pthread_mutex_lock(&lock);
        int all = started == nthreads;
        pthread_mutex_unlock(&lock);
        if (all)
            break;
        usleep(1000);
    }
    printf("ready\n");
    if (seconds > 0) {
        sleep((unsigned)seconds);
    } else {
        char c;
        while (read(0, &c, 1) == 1 && c != 'q')
            ;
    }
    stopping = 1;
    for (long k = 0; k < nthreads; k++)
        pthread_join(threads[k], NULL);
    for (long k = 0; k < nthreads; k++)
        printf("count %ld %llu\n", k, (unsigned long long)calls[k]);
    printf("done\n");
    return 0;
}

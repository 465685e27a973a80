/* THREADS threads call hit() over and over, each counting its calls.
 *
 *   hard_threads THREADS SECONDS [LEAD]
 *
 * Prints "ready" once every thread has made its first call. The threads stop when
 * the busiest of them has made LEAD calls (LEAD > 0), else after SECONDS seconds
 * (SECONDS > 0), else at "q" or the end of stdin; then the program prints
 * "count <k> <calls>" for each thread, then "done", and exits 0. A signal ends it
 * the default way.
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
    long lead = argc > 3 ? strtol(argv[3], NULL, 0) : 0;
    if (nthreads < 1 || nthreads > MAX_THREADS || seconds < 0 || lead < 0) {
        fprintf(stderr, "usage: %s THREADS(1-%d) SECONDS [LEAD]\n", argv[0], MAX_THREADS);
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
    if (lead > 0) {
        for (;;) {
            uint64_t most = 0;
            for (long k = 0; k < nthreads; k++)
                if (calls[k] > most)
                    most = calls[k];
            if (most >= (uint64_t)lead)
                break;
            usleep(1000);
        }
    } else if (seconds > 0) {
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

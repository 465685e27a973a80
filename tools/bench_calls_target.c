/* bench_calls_target.c - calls to record, for tools/bench_calls.py (built with
 * -pg -mfentry -mnop-mcount: a 5-byte NOP at every function entry).
 *
 *   bench_calls_target THREADS N
 *
 * THREADS threads (0: the main thread alone) each call leaf(i) for i in 0..N-1
 * after a barrier; the time from the first thread's start to the last thread's
 * end (the vDSO's CLOCK_MONOTONIC) is printed as "threads=T calls=C ns=NS".
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static long n_calls;
static pthread_barrier_t barrier;
static long starts[64], ends[64];
static volatile long sink;

__attribute__((noinline)) long leaf(long x)
{
    __asm__ volatile("" ::: "memory");
    return x ^ 5;
}

static long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static void *worker(void *arg)
{
    long sum = 0, me = (long)arg;
    if (me >= 0)
        pthread_barrier_wait(&barrier);
    long start = now_ns();
    for (long i = 0; i < n_calls; i++)
        sum += leaf(i);
    sink += sum;
    if (me >= 0) {
        starts[me] = start;
        ends[me] = now_ns();
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    long threads = atol(argv[1]);
    n_calls = atol(argv[2]);
    long start, end;
    if (threads == 0) {
        start = now_ns();
        worker((void *)-1L);
        end = now_ns();
        threads = 1;
    } else {
        pthread_t t[64];
        if (threads > 64)
            threads = 64;
        pthread_barrier_init(&barrier, NULL, (unsigned)threads);
        for (long i = 0; i < threads; i++)
            pthread_create(&t[i], NULL, worker, (void *)i);
        for (long i = 0; i < threads; i++)
            pthread_join(t[i], NULL);
        start = starts[0];
        end = ends[0];
        for (long i = 1; i < threads; i++) {
            start = starts[i] < start ? starts[i] : start;
            end = ends[i] > end ? ends[i] : end;
        }
    }
    printf("threads=%ld calls=%ld ns=%ld\n", threads, threads * n_calls, end - start);
    return 0;
}

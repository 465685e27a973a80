/* Four threads call compute() ITER times each; main prints per-thread sums and a checksum.
 * compute_nop5 labels a 5-byte NOP inside compute (a jmp-slot site). */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define NTHREADS 4

static long iterations = 1000;
static uint64_t sums[NTHREADS];
static pthread_barrier_t barrier;

__attribute__((noipa)) uint64_t compute(uint64_t x, uint64_t salt)
{
    uint64_t y = x * 0x9e3779b97f4a7c15ULL;
    y ^= salt;
    asm volatile(".globl compute_nop5\ncompute_nop5: .byte 0x0f, 0x1f, 0x44, 0x00, 0x00");
    y += x << 3;
    return y;
}

static void *worker(void *arg)
{
    uint64_t id = (uint64_t)(uintptr_t)arg;
    uint64_t sum = 0;
    pthread_barrier_wait(&barrier);
    for (long i = 0; i < iterations; i++)
        sum = sum * 31 + compute((uint64_t)i + id * 1000003u, id);
    sums[id] = sum;
    return NULL;
}

int main(int argc, char **argv)
{
    pthread_t threads[NTHREADS];
    if (argc > 1)
        iterations = atol(argv[1]);
    pthread_barrier_init(&barrier, NULL, NTHREADS);
    for (uintptr_t i = 0; i < NTHREADS; i++)
        if (pthread_create(&threads[i], NULL, worker, (void *)i) != 0)
            return 100;
    uint64_t checksum = 0;
    for (int i = 0; i < NTHREADS; i++) {
        pthread_join(threads[i], NULL);
        printf("thread %d sum %016llx\n", i, (unsigned long long)sums[i]);
        checksum ^= sums[i] * (uint64_t)(i + 1);
    }
    printf("checksum %016llx\n", (unsigned long long)checksum);
    return 0;
}

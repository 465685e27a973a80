/* place_hitters.c - threads that hit a probe and threads that do not (CPU placement).
 *
 *   place_hitters HITTERS BUSY HIT_MS QUIET_MS
 *
 * HITTERS threads call hit() in a loop for HIT_MS milliseconds, then spin for
 * QUIET_MS more without calling it; BUSY threads spin for HIT_MS + QUIET_MS and
 * never call it. hit_nop5 labels a 5-byte NOP inside hit() (a jmp site). The
 * main thread waits for them all and prints "hits N" (the calls of hit()).
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static long hit_ms, quiet_ms;
static long calls[64];

__attribute__((noipa)) long hit(long x)
{
    asm volatile(".globl hit_nop5\nhit_nop5: .byte 0x0f, 0x1f, 0x44, 0x00, 0x00");
    return x + 1;
}

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void spin_until(long long end)
{
    volatile unsigned long spins = 0;
    while (now_ms() < end)
        for (int i = 0; i < 4096; i++)
            spins++;
}

static void *hitter(void *arg)
{
    long id = (long)(intptr_t)arg, n = 0;
    long long end = now_ms() + hit_ms;
    while (now_ms() < end)
        n = hit(n);
    calls[id] = n;
    spin_until(end + quiet_ms);
    return NULL;
}

static void *busy(void *arg)
{
    (void)arg;
    spin_until(now_ms() + hit_ms + quiet_ms);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 5)
        return 2;
    int hitters = atoi(argv[1]), busies = atoi(argv[2]);
    hit_ms = atol(argv[3]);
    quiet_ms = atol(argv[4]);
    if (hitters < 0 || busies < 0 || hitters + busies > 64)
        return 2;
    pthread_t threads[64];
    for (int i = 0; i < hitters + busies; i++)
        if (pthread_create(&threads[i], NULL, i < hitters ? hitter : busy, (void *)(intptr_t)i) != 0)
            return 100;
    long total = 0;
    for (int i = 0; i < hitters + busies; i++)
        pthread_join(threads[i], NULL);
    for (int i = 0; i < hitters; i++)
        total += calls[i];
    printf("hits %ld\n", total);
    return 0;
}

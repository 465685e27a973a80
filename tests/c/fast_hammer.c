/* Threads that pass the nop5 site regs_site (fast_regcheck.c) over and over and check
 * every register around it each time, while a tracer attaches and detaches.
 *
 *   fast_hammer THREADS EVERY
 *
 * Prints "ready" once the threads run; each thread prints "t<k> <iterations>" every
 * EVERY passes. On a register mismatch it prints "FAIL ..." and the process exits 3.
 * Commands on stdin, one byte each:
 *   g   the main thread passes the site once and prints "ok <count>"
 *   q   (or end of input) stop the threads, print "done <total passes>", exit 0
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fast_regcheck.h"

static volatile int stopping;
static long every = 1000;
static uint64_t passes[64];

static void say(const char *text)
{
    size_t len = strlen(text);
    while (len) {
        ssize_t n = write(1, text, len);
        if (n <= 0)
            return;
        text += n;
        len -= (size_t)n;
    }
}

static int pass_once(uint64_t seed)
{
    uint64_t out[PROBE_OUT_WORDS];
    char msg[1024], line[1200];
    memset(out, 0, sizeof out);
    probe_regs(seed, out);
    if (check_regs(seed, out, 0, msg, sizeof msg)) {
        snprintf(line, sizeof line, "FAIL seed=%#llx:%s\n", (unsigned long long)seed, msg);
        say(line);
        _exit(3);
    }
    return 0;
}

static void *hammer(void *arg)
{
    long k = (long)arg;
    uint64_t i = 0;
    char line[64];
    while (!stopping) {
        pass_once(((uint64_t)k << 56) ^ (i * 0x9e3779b97f4a7c15ULL));
        i++;
        passes[k] = i;
        if (i % (uint64_t)every == 0) {
            snprintf(line, sizeof line, "t%ld %llu\n", k, (unsigned long long)i);
            say(line);
        }
    }
    return NULL;
}

int main(int argc, char **argv)
{
    long nthreads = argc > 1 ? strtol(argv[1], NULL, 0) : 2;
    every = argc > 2 ? strtol(argv[2], NULL, 0) : 1000;
    if (nthreads < 0 || nthreads > 63 || every <= 0) {
        fprintf(stderr, "usage: %s THREADS(0-63) EVERY\n", argv[0]);
        return 2;
    }
    pthread_t threads[64];
    for (long k = 0; k < nthreads; k++)
        pthread_create(&threads[k], NULL, hammer, (void *)(k + 1));
    say("ready\n");
    uint64_t mine = 0;
    char line[64];
    for (;;) {
        char c;
        ssize_t n = read(0, &c, 1);
        if (n == 1 && c == 'g') {
            pass_once(0x5eed0000ULL + mine);
            mine++;
            snprintf(line, sizeof line, "ok %llu\n", (unsigned long long)mine);
            say(line);
            continue;
        }
        if (n == 1 && c != 'q')
            continue;
        break;
    }
    stopping = 1;
    uint64_t total = mine;
    for (long k = 0; k < nthreads; k++) {
        pthread_join(threads[k], NULL);
        total += passes[k + 1];
    }
    snprintf(line, sizeof line, "done %llu\n", (unsigned long long)total);
    say(line);
    return 0;
}

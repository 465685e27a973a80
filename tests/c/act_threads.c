/* act_threads.c - threads calling probed functions, for in-program counting and
 * recording.
 *
 *   act_threads THREADS N [wait]
 *
 * Each of THREADS threads (0: the main thread alone) calls, for i in 0..N-1,
 * work6(t, i, 2*i, -i, i*i, ~i) (t: the thread's number) and flags_probe(i, 7)
 * and flags_probe(7, i), whose nop5 site flags_site sits between a compare and
 * the setcc that reads the flags. Prints "mismatches K" (flags_probe results
 * that are wrong: a site that lost the flags) and "sum S"; exits 1 if K != 0.
 * With "wait", prints "ready" and waits for a byte on stdin first.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static long n_calls;
static long mismatches;

__attribute__((noinline)) long work6(long t, long i, long a, long b, long c, long d)
{
    __asm__ volatile("" ::: "memory");
    return t + i + a + b + c + d;
}

long flags_probe(long a, long b);      /* a < b, signed, with a nop5 between cmp and setl */
__asm__(".text\n"
        ".globl flags_probe\n"
        ".type flags_probe, @function\n"
        "flags_probe:\n"
        "    cmp %rsi, %rdi\n"
        ".globl flags_site\n"
        "flags_site:\n"
        "    .byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n"
        "    setl %al\n"
        "    movzbl %al, %eax\n"
        "    ret\n"
        ".size flags_probe, .-flags_probe\n");

static void *run(void *arg)
{
    long t = (long)arg, sum = 0, bad = 0;
    for (long i = 0; i < n_calls; i++) {
        sum += work6(t, i, 2 * i, -i, i * i, ~i);
        bad += flags_probe(i, 7) != (i < 7);
        bad += flags_probe(7, i) != (7 < i);
    }
    __atomic_add_fetch(&mismatches, bad, __ATOMIC_RELAXED);
    return (void *)sum;
}

int main(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    long threads = atol(argv[1]);
    n_calls = atol(argv[2]);
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc > 3) {
        char c;
        printf("ready\n");
        if (read(0, &c, 1) != 1)
            return 2;
    }
    long sum = 0;
    if (threads == 0) {
        sum = (long)run(0);
    } else {
        pthread_t tid[64];
        for (long t = 0; t < threads && t < 64; t++)
            pthread_create(&tid[t], NULL, run, (void *)t);
        for (long t = 0; t < threads && t < 64; t++) {
            void *r;
            pthread_join(tid[t], &r);
            sum += (long)r;
        }
    }
    printf("mismatches %ld\nsum %ld\n", mismatches, sum);
    return mismatches != 0;
}

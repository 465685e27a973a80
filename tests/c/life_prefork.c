/* A prefork server.
 *
 *   life_prefork WORKERS N K
 *
 * The parent passes both sites of life_sites.c K times, forks WORKERS workers, each
 * of which passes both sites N times, waits for them, then passes the sites K times
 * again. Output (unbuffered, one write per line):
 *   worker PID sum=S ok=1 code=XX,YY   per worker; S is the sum of what the sites
 *                                      returned, ok=0 if it is wrong; XX, YY are the
 *                                      first bytes of life_nop5 and life_int3 in the
 *                                      worker's memory after its passes
 *   parent PID ok=1 workers=W code=XX,YY
 *                                      W workers exited 0; ok=0 if the parent's own
 *                                      sums were wrong or a worker failed
 * Exit status 0 when every sum is right and every worker exited 0.
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

long life_nop5(long);
long life_int3(long);

static long passes(long n, long base)
{
    long sum = 0;
    for (long i = 0; i < n; i++)
        sum += life_nop5(base + i) + life_int3(base + i);
    return sum;
}

static long expected(long n, long base)
{
    /* sum of (b+i+1) + (b+i+2) for i < n */
    return n * (2 * base + 3) + n * (n - 1);
}

static void code(char *out)
{
    const unsigned char *a = (const unsigned char *)life_nop5;
    const unsigned char *b = (const unsigned char *)life_int3;
    sprintf(out, "%02x,%02x", a[0], b[0]);
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s WORKERS N K\n", argv[0]);
        return 2;
    }
    int workers = atoi(argv[1]);
    long n = atol(argv[2]), k = atol(argv[3]);
    int ok = passes(k, 1000) == expected(k, 1000);
    char bytes[16];
    for (int w = 0; w < workers; w++) {
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            return 1;
        }
        if (pid == 0) {
            long base = 100000L * (w + 1);
            long sum = passes(n, base);
            int good = sum == expected(n, base);
            code(bytes);
            dprintf(1, "worker %d sum=%ld ok=%d code=%s\n", (int)getpid(), sum, good, bytes);
            _exit(good ? 0 : 1);
        }
    }
    int exited_ok = 0;
    for (int w = 0; w < workers; w++) {
        int status;
        if (wait(&status) > 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0)
            exited_ok++;
    }
    ok = ok && passes(k, 2000) == expected(k, 2000) && exited_ok == workers;
    code(bytes);
    dprintf(1, "parent %d ok=%d workers=%d code=%s\n", (int)getpid(), ok, exited_ok, bytes);
    return ok ? 0 : 1;
}

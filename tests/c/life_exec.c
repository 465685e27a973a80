/* A chain of execs.
 *
 *   life_exec NAME COUNT [PROGRAM NAME COUNT]...
 *
 * Passes life_nop5(TAG * 1000 + i) for i < COUNT, where TAG is NAME's first
 * character, prints "stage NAME pid P count COUNT ok=1", then, if more arguments
 * follow, execs PROGRAM with "PROGRAM NAME COUNT ..." (the rest). When NAME starts
 * with 't' the exec is made by a second thread while the main thread waits in
 * pthread_join (an exec from a thread that is not the thread group leader).
 * Exits 0 at the end of the chain (1 if a site returned a wrong value, 127 if an
 * exec failed).
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

long life_nop5(long);

static char **next;

static void *exec_next(void *arg)
{
    (void)arg;
    execv(next[0], next);
    perror("execv");
    _exit(127);
}

int main(int argc, char **argv)
{
    if (argc < 3 || (argc - 3) % 3 != 0) {
        fprintf(stderr, "usage: %s NAME COUNT [PROGRAM NAME COUNT]...\n", argv[0]);
        return 2;
    }
    long tag = (unsigned char)argv[1][0], count = atol(argv[2]);
    int ok = 1;
    for (long i = 0; i < count; i++)
        if (life_nop5(tag * 1000 + i) != tag * 1000 + i + 1)
            ok = 0;
    dprintf(1, "stage %s pid %d count %ld ok=%d\n", argv[1], (int)getpid(), count, ok);
    if (!ok)
        return 1;
    if (argc == 3)
        return 0;
    next = argv + 3;
    if (argv[1][0] == 't') {
        pthread_t t;
        pthread_create(&t, NULL, exec_next, NULL);
        pthread_join(t, NULL);
        return 127;
    }
    exec_next(NULL);
    return 127;
}

/* One long sleep, to detach from in the middle of it.
 *
 *   life_sleep MS
 *
 * Prints "sleeping PID", sleeps MS milliseconds in a single nanosleep() and prints
 * "slept N ms rc=R" with the time the sleep really took (CLOCK_MONOTONIC). */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    long ms = argc > 1 ? atol(argv[1]) : 1000;
    struct timespec req = {ms / 1000, (ms % 1000) * 1000000L}, t0, t1;
    printf("sleeping %d\n", (int)getpid());
    fflush(stdout);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int rc = nanosleep(&req, NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    long took = (t1.tv_sec - t0.tv_sec) * 1000L + (t1.tv_nsec - t0.tv_nsec) / 1000000L;
    printf("slept %ld ms rc=%d\n", took, rc);
    return 0;
}

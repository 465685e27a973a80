/* A main thread that creates threads without a pause, to attach to meanwhile.
 * Link with life_sites.c (its life_nop5 is the probe site).
 *
 *   life_clone_burst
 *
 * Prints "ready PID", then creates threads (64 KiB stacks, each waiting in
 * pause()), 200 us apart, until a byte arrives on stdin (or 3000 exist); prints
 * "quiet N" (N threads created). Then "q" or the end of stdin: prints "done"
 * and exits 0. A failed pthread_create prints "FAIL ..." and exits 3. */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static void *idle(void *arg)
{
    (void)arg;
    for (;;)
        pause();
    return NULL;
}

int main(void)
{
    printf("ready %d\n", (int)getpid());
    fflush(stdout);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 65536);
    int n = 0;
    struct pollfd in = {0, POLLIN, 0};
    while (n < 3000 && poll(&in, 1, 0) == 0) {
        pthread_t t;
        int err = pthread_create(&t, &attr, idle, NULL);
        if (err != 0) {
            printf("FAIL pthread_create: %s\n", strerror(err));
            return 3;
        }
        n++;
        usleep(200);
    }
    char c;
    if (read(0, &c, 1) < 0 && errno != EINTR)
        return 4;
    printf("quiet %d\n", n);
    fflush(stdout);
    while (read(0, &c, 1) == 1 && c != 'q')
        ;
    printf("done\n");
    fflush(stdout);
    return 0;
}

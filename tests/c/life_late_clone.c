/* A thread created while ptprobe is about to stop waiting.
 *
 *   life_late_clone FIFO
 *
 * Prints "ready PID". The main thread calls tick() every millisecond, forever.
 * A second thread opens FIFO, blocks reading one byte from it, then creates a
 * third thread (which pauses forever) and pauses too. */
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>

static const char *fifo;

__attribute__((noipa)) void tick(void)
{
    __asm__ volatile("" ::: "memory");
}

static void *idle(void *arg)
{
    (void)arg;
    for (;;)
        pause();
    return NULL;
}

static void *spawner(void *arg)
{
    (void)arg;
    int fd = open(fifo, O_RDONLY);
    char c;
    if (fd >= 0 && read(fd, &c, 1) == 1) {
        pthread_t t;
        pthread_create(&t, NULL, idle, NULL);
    }
    for (;;)
        pause();
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    fifo = argv[1];
    pthread_t t;
    pthread_create(&t, NULL, spawner, NULL);
    printf("ready %d\n", (int)getpid());
    fflush(stdout);
    for (;;) {
        tick();
        usleep(1000);
    }
}

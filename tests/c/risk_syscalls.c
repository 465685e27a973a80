/* risk_syscalls.c - system calls whose syscall instruction is probed.
 *
 *   risk_syscalls vfork      vfork(); the child _exits at once; prints "vfork ok"
 *   risk_syscalls exec       calls work(1), prints "before exec", execs itself with
 *                            "after", which calls work(2) and prints "after exec"
 *   risk_syscalls read       a second thread writes to a pipe only once the main
 *                            thread is blocked in read() on it (seen in
 *                            /proc/self/task/TID/syscall); prints "read x"
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

__attribute__((noinline)) long work(long i)
{
    __asm__ volatile("" ::: "memory");
    return i + 1;
}

static int pipefd[2];
static pid_t main_tid;

static void *writer(void *arg)
{
    char path[64], buf[64];
    (void)arg;
    snprintf(path, sizeof path, "/proc/self/task/%d/syscall", (int)main_tid);
    for (;;) {             /* until the main thread blocks in read (syscall 0) on the pipe */
        int fd = open(path, O_RDONLY);
        ssize_t n = fd >= 0 ? read(fd, buf, sizeof buf - 1) : -1;
        if (fd >= 0)
            close(fd);
        if (n > 2 && buf[0] == '0' && buf[1] == ' ')
            break;
        sched_yield();
    }
    if (write(pipefd[1], "x", 1) != 1)
        _exit(3);
    return NULL;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc < 2)
        return 2;
    if (!strcmp(argv[1], "vfork")) {
        pid_t child = vfork();
        if (child == 0)
            _exit(7);
        int status;
        waitpid(child, &status, 0);
        printf("vfork %s\n", WIFEXITED(status) && WEXITSTATUS(status) == 7 ? "ok" : "bad");
        return 0;
    }
    if (!strcmp(argv[1], "exec")) {
        work(1);
        printf("before exec\n");
        char *args[] = {argv[0], "after", NULL};
        execv("/proc/self/exe", args);
        return 4;
    }
    if (!strcmp(argv[1], "after")) {
        work(2);
        printf("after exec\n");
        return 0;
    }
    if (!strcmp(argv[1], "read")) {
        if (pipe(pipefd))
            return 2;
        main_tid = (pid_t)syscall(SYS_gettid);
        pthread_t t;
        pthread_create(&t, NULL, writer, NULL);
        char c = 0;
        ssize_t n = read(pipefd[0], &c, 1);
        pthread_join(t, NULL);
        printf("read %c\n", n == 1 ? c : '?');
        return 0;
    }
    return 2;
}

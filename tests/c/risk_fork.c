/* risk_fork.c - a program that forks, then parent and child both call work().
 *
 *   risk_fork OUT_FD GO_FD N
 *
 * Forks, writes "forked CHILD_PID\n" to OUT_FD, waits for a byte on GO_FD (the
 * child waits too: each reads one byte), then each process calls work(i) for i
 * in 0..N-1 and writes "done PID SUM\n". The parent reaps the child and exits 0.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

__attribute__((noinline)) long work(long i)
{
    __asm__ volatile("" ::: "memory");
    return i * 2;
}

static void say(int fd, const char *text)
{
    if (write(fd, text, strlen(text)) < 0)
        _exit(2);
}

int main(int argc, char **argv)
{
    if (argc != 4)
        return 2;
    int out = atoi(argv[1]), go = atoi(argv[2]);
    long n = atol(argv[3]);
    char line[64];
    pid_t child = fork();
    if (child < 0)
        return 2;
    if (child > 0) {
        snprintf(line, sizeof line, "forked %d\n", (int)child);
        say(out, line);
    }
    char c;
    if (read(go, &c, 1) != 1)
        _exit(2);
    long sum = 0;
    for (long i = 0; i < n; i++)
        sum += work(i);
    snprintf(line, sizeof line, "done %d %ld\n", (int)getpid(), sum);
    say(out, line);
    if (child == 0)
        _exit(0);
    int status;
    waitpid(child, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}

/* act_fork.c - a process that forks; parent and child both call work6().
 *
 *   act_fork N     forks; each process calls work6(getpid(), i, 0, 0, 0, 0) for
 *                  i in 0..N-1 and prints "pid P done"; the parent reaps the child
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

__attribute__((noinline)) long work6(long t, long i, long a, long b, long c, long d)
{
    __asm__ volatile("" ::: "memory");
    return t + i + a + b + c + d;
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 100;
    setvbuf(stdout, NULL, _IONBF, 0);
    pid_t child = fork();
    long sum = 0;
    for (long i = 0; i < n; i++)
        sum += work6(getpid(), i, 0, 0, 0, 0);
    printf("pid %d done %ld\n", (int)getpid(), sum);
    if (child > 0) {
        int status;
        waitpid(child, &status, 0);
        return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
    }
    return 0;
}

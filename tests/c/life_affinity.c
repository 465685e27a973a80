/* Prints how many CPUs the process may run on, then forks a child that prints
 * its own count: "parent cpus=N", "child cpus=M". */
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

static int cpus(void)
{
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) != 0)
        return -1;
    return CPU_COUNT(&set);
}

int main(void)
{
    printf("parent cpus=%d\n", cpus());
    fflush(stdout);
    pid_t child = fork();
    if (child == 0) {
        printf("child cpus=%d\n", cpus());
        fflush(stdout);
        _exit(0);
    }
    int status;
    waitpid(child, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}

/* compute() 11 times, touch(&secret) once, getpid() 4 times; prints the results.
 * argv[1]: "exit7" exits with 7, "segv" dies by SIGSEGV, "abort" by SIGABRT. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int secret = 1;

__attribute__((noipa)) long compute(long x)
{
    return x * x + 1;
}

__attribute__((noipa)) void touch(int *p)
{
    (void)p;
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "";
    long total = 0;
    for (long i = 0; i < 10; i++)
        total += compute(i);
    printf("pid %d\n", (int)getpid());
    printf("compute(5) = %ld\n", compute(5));
    touch(&secret);
    printf("secret %d\n", secret);
    for (int i = 0; i < 3; i++)
        total += getpid() > 0;
    printf("total %ld\n", total);
    fflush(stdout);
    if (strcmp(mode, "exit7") == 0)
        exit(7);
    if (strcmp(mode, "segv") == 0)
        *(volatile int *)0 = 1;
    if (strcmp(mode, "abort") == 0)
        abort();
    return 0;
}

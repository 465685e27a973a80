/* Installs a SIGTRAP handler, then raise(SIGTRAP) (argv[1] "raise") or executes its own
 * int3 (argv[1] "int3"); prints "trap handled" when the handler ran once. */
#include <signal.h>
#include <stdio.h>
#include <string.h>

static volatile sig_atomic_t traps;

static void on_trap(int sig)
{
    (void)sig;
    traps++;
}

__attribute__((noipa)) int compute(int x)
{
    return x * 2 + 1;
}

int main(int argc, char **argv)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_trap;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGTRAP, &sa, NULL) != 0)
        return 100;
    int a = compute(1);
    if (argc > 1 && strcmp(argv[1], "int3") == 0)
        asm volatile("int3");
    else
        raise(SIGTRAP);
    if (traps == 1)
        printf("trap handled\n");
    int b = compute(2);
    printf("compute %d %d traps %d\n", a, b, (int)traps);
    return traps == 1 ? 0 : 3;
}

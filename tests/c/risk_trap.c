/* risk_trap.c - a SIGTRAP of the program's own, delivered while rip is one byte
 * past a probed instruction.
 *
 * spin() starts with a 1-byte nop (the probe site, trap_site) and then spins
 * until `flag` is set. A helper thread sends SIGUSR1 to the main thread until the
 * handler finds it spinning; the handler sets the flag, moves rip to trap_site+1
 * (the top of the spin loop: where it was anyway) and raises SIGTRAP, which its
 * sa_mask keeps blocked until sigreturn. The SIGTRAP is then delivered with
 * rip == trap_site + 1, exactly as a hit of an int3 at trap_site would be
 * reported. The program's SIGTRAP handler counts it. Prints "traps=N".
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <ucontext.h>
#include <unistd.h>

volatile int flag;
volatile int redirected;
volatile int traps;
static pthread_t main_thread;

void spin(void);
extern char trap_site[], spin_loop[], spin_end[];
__asm__(".text\n"
        ".globl spin\n"
        ".type spin, @function\n"
        "spin:\n"
        ".globl trap_site\n"
        "trap_site:\n"
        "    nop\n"
        ".globl spin_loop\n"
        "spin_loop:\n"
        "    cmpl $0, flag(%rip)\n"
        "    je spin_loop\n"
        ".globl spin_end\n"
        "spin_end:\n"
        "    ret\n"
        ".size spin, .-spin\n");

static void on_usr1(int sig, siginfo_t *info, void *ctx)
{
    ucontext_t *uc = ctx;
    char *rip = (char *)uc->uc_mcontext.gregs[REG_RIP];
    (void)sig;
    (void)info;
    if (rip >= spin_loop && rip < spin_end && !redirected) {
        uc->uc_mcontext.gregs[REG_RIP] = (greg_t)(trap_site + 1);
        flag = 1;
        redirected = 1;
        raise(SIGTRAP);          /* blocked by sa_mask until sigreturn */
    }
}

static void on_trap(int sig)
{
    (void)sig;
    traps++;
}

static void *nudge(void *arg)
{
    (void)arg;
    while (!redirected) {
        pthread_kill(main_thread, SIGUSR1);
        sched_yield();
    }
    return NULL;
}

int main(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_usr1;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    sigaddset(&sa.sa_mask, SIGTRAP);
    sigaction(SIGUSR1, &sa, NULL);
    signal(SIGTRAP, on_trap);
    main_thread = pthread_self();
    pthread_t t;
    pthread_create(&t, NULL, nudge, NULL);
    spin();
    pthread_join(t, NULL);
    printf("traps=%d\n", traps);
    return 0;
}

/* Children that share the parent's memory (system(), posix_spawn(), vfork()) while
 * probes are armed in the parent.
 *
 *   life_spawn N
 *
 * Phase 1: N passes of life_nop5, life_int3 and, while its semaphore is up, the USDT
 * probe life:tick (a 5-byte NOP site); then system("exit 3"), posix_spawn of
 * /bin/sh -c "exit 5" and a vfork() child that _exits 7, each waited for; then
 * phase 2: N more passes. Prints one line
 *   spawn sem1=S1 sem2=S2 enabled=E system=3 spawn=5 vfork=7 ok=1
 * S1, S2: the semaphore before and after the spawns (read by the program itself);
 * E: passes that found the semaphore up; ok=0 if a site returned a wrong value.
 * Exit status 0 (1 if ok=0 or a child status was wrong).
 */
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
#define PTPROBE_SDT_NOP PTPROBE_SDT_NOP_5
#include "ptprobe_sdt.h"

long life_nop5(long);
long life_int3(long);
extern char **environ;

PTPROBE_SDT_SEMAPHORE(life, tick);

static long enabled;
static int ok = 1;

static void phase(long n, long base)
{
    for (long i = base; i < base + n; i++) {
        if (life_nop5(i) != i + 1 || life_int3(i) != i + 2)
            ok = 0;
        if (PTPROBE_SDT_ENABLED(life, tick)) {
            enabled++;
            PTPROBE_SDT_PROBE_SEM(life, tick, i);
        }
    }
}

static int semaphore(void)
{
    return *(volatile unsigned short *)&life_tick_semaphore;
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 10;
    phase(n, 0);
    int sem1 = semaphore();

    int st = system("exit 3");
    int sys_status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;

    pid_t pid;
    char *sh_argv[] = {"sh", "-c", "exit 5", NULL};
    int spawn_status = -1;
    if (posix_spawn(&pid, "/bin/sh", NULL, NULL, sh_argv, environ) == 0 &&
        waitpid(pid, &st, 0) == pid && WIFEXITED(st))
        spawn_status = WEXITSTATUS(st);

    int vfork_status = -1;
    pid = vfork();
    if (pid == 0)
        _exit(7);
    if (pid > 0 && waitpid(pid, &st, 0) == pid && WIFEXITED(st))
        vfork_status = WEXITSTATUS(st);

    int sem2 = semaphore();
    phase(n, 1000);
    if (sys_status != 3 || spawn_status != 5 || vfork_status != 7)
        ok = 0;
    printf("spawn sem1=%d sem2=%d enabled=%ld system=%d spawn=%d vfork=%d ok=%d\n", sem1, sem2,
           enabled, sys_status, spawn_status, vfork_status, ok);
    return ok ? 0 : 1;
}

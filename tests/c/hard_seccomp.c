/* A program with a seccomp filter of its own, as a container or a systemd unit gives
 * one, installed at start or after a number of calls of the probed functions.
 *
 *   hard_seccomp KIND start              install, print "ready", then a worker thread
 *                                        calls hit() and hit_insn() until "q" on stdin;
 *                                        print "calls N" (N calls of each) and exit 0
 *   hard_seccomp KIND cmd FD             print "ready", a worker thread calls both until
 *                                        "q" on file descriptor FD; "f" there installs the
 *                                        filter (TSYNC) and prints "installed"
 *   hard_seccomp KIND later CALLS        call both CALLS times, install (from the main
 *                                        thread, TSYNC: the worker too), call both CALLS
 *                                        times more in a worker thread; print
 *                                        "calls 2*CALLS" and exit 0
 *
 * KIND: none; harmless (allows everything); kill512 (kill the process for any number >= 512, or another arch, as
 * systemd's SystemCallFilter does for unknown numbers); allowlist (kill the process
 * for anything but what this program needs); errno (EPERM for numbers >= 512);
 * trap512 (SIGSYS for numbers >= 512). The filter is installed with no_new_privs set,
 * as an unprivileged program must.
 *
 * hit() starts with a 5-byte NOP (built with -pg -mfentry -mnop-mcount); hit_insn's
 * second instruction (after the NOP) is an ordinary one, for int3 sites; the USDT
 * probe hard:combo, passed with them, is a nop1+nop5 site.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "ptprobe_sdt.h"

static volatile int stopping;
static volatile uint64_t calls;
static long rounds;

__attribute__((noipa)) uint64_t hit(uint64_t x)
{
    return x * 3 + 1;
}

__attribute__((noipa)) uint64_t hit_insn(uint64_t x)
{
    return (x ^ 0x5a5a) + 7;
}

static void say(const char *text)
{
    size_t len = strlen(text);
    while (len) {
        ssize_t n = write(1, text, len);
        if (n <= 0)
            return;
        text += n;
        len -= (size_t)n;
    }
}

#define LD_NR BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr))
#define LD_ARCH BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch))
#define ALLOW_NR(n) BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (n), 0, 1), BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)

static int install(const char *kind)
{
    struct sock_filter above512_kill[] = {
        LD_ARCH,
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
        LD_NR,
        BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, 512, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_filter above512_errno[] = {
        LD_NR,
        BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, 512, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_filter above512_trap[] = {
        LD_NR,
        BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, 512, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_TRAP),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_filter allowlist[] = {
        LD_ARCH,
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
        LD_NR,
        ALLOW_NR(SYS_read), ALLOW_NR(SYS_write), ALLOW_NR(SYS_exit), ALLOW_NR(SYS_exit_group),
        ALLOW_NR(SYS_rt_sigreturn), ALLOW_NR(SYS_futex), ALLOW_NR(SYS_nanosleep),
        ALLOW_NR(SYS_clock_nanosleep), ALLOW_NR(SYS_rt_sigprocmask), ALLOW_NR(SYS_madvise),
        ALLOW_NR(SYS_munmap), ALLOW_NR(SYS_restart_syscall), ALLOW_NR(SYS_rseq), ALLOW_NR(SYS_rt_sigaction),
        ALLOW_NR(SYS_set_robust_list), ALLOW_NR(SYS_sched_yield), ALLOW_NR(SYS_gettid), ALLOW_NR(SYS_getpid),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
    };
    struct sock_filter harmless[] = {
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog;
    if (strcmp(kind, "none") == 0)
        return 0;
    if (strcmp(kind, "harmless") == 0) {
        prog.filter = harmless;
        prog.len = 1;
    } else
    if (strcmp(kind, "kill512") == 0) {
        prog.filter = above512_kill;
        prog.len = sizeof above512_kill / sizeof above512_kill[0];
    } else if (strcmp(kind, "errno") == 0) {
        prog.filter = above512_errno;
        prog.len = sizeof above512_errno / sizeof above512_errno[0];
    } else if (strcmp(kind, "trap512") == 0) {
        prog.filter = above512_trap;
        prog.len = sizeof above512_trap / sizeof above512_trap[0];
    } else if (strcmp(kind, "allowlist") == 0) {
        prog.filter = allowlist;
        prog.len = sizeof allowlist / sizeof allowlist[0];
    } else {
        return -1;
    }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        return -1;
    return (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &prog);
}

static pthread_barrier_t barrier;

static void *worker(void *arg)
{
    uint64_t x = 1;
    if (arg)
        pthread_barrier_wait(&barrier);     /* until the filter is in place */
    for (long i = 0; rounds ? i < rounds : !stopping; i++) {
        x = hit(x);
        x = hit_insn(x);
        PTPROBE_SDT_PROBE_NOP(PTPROBE_SDT_NOP_1_5, hard, combo, x);
        calls++;
    }
    return (void *)(uintptr_t)x;
}

int main(int argc, char **argv)
{
    char line[64];
    pthread_t thread;
    if (argc < 3) {
        fprintf(stderr, "usage: %s KIND start|later [CALLS]\n", argv[0]);
        return 2;
    }
    int later = strcmp(argv[2], "later") == 0;
    if (strcmp(argv[2], "cmd") == 0) {
        int fd = argc > 3 ? atoi(argv[3]) : 0;
        char c;
        if (pthread_create(&thread, NULL, worker, NULL) != 0)
            return 4;
        say("ready\n");
        while (read(fd, &c, 1) == 1 && c != 'q') {
            if (c != 'f')
                continue;
            if (install(argv[1]) != 0) {
                snprintf(line, sizeof line, "install failed: errno %d\n", errno);
                say(line);
                stopping = 1;
                pthread_join(thread, NULL);
                return 3;
            }
            say("installed\n");
        }
        stopping = 1;
        pthread_join(thread, NULL);
        snprintf(line, sizeof line, "calls %llu\n", (unsigned long long)calls);
        say(line);
        return 0;
    }
    if (later) {
        rounds = argc > 3 ? atol(argv[3]) : 1000;
        worker(NULL);           /* before the filter, on the main thread */
    }
    /* a thread that exists when the filter comes (TSYNC gives it the filter too) */
    pthread_barrier_init(&barrier, NULL, 2);
    if (pthread_create(&thread, NULL, worker, &barrier) != 0)
        return 4;
    if (install(argv[1]) != 0) {
        perror("seccomp");
        return 3;
    }
    pthread_barrier_wait(&barrier);
    if (!later) {
        say("ready\n");
        char c;
        while (read(0, &c, 1) == 1 && c != 'q')
            ;
        stopping = 1;
    }
    pthread_join(thread, NULL);
    snprintf(line, sizeof line, "calls %llu\n", (unsigned long long)calls);
    say(line);
    return 0;
}

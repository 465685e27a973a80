/* ctracer.c - the least a ptrace tracer must do per probe hit: the C limit
 * tools/bench.py compares ptprobe with.
 *
 *   ctracer MODE N [THREADS [WARMUP [TRACER_CPU [CHILD_CPU]]]]
 *
 * The child (traced with PTRACE_TRACEME) installs the same seccomp filter as
 * ptprobe (SECCOMP_RET_TRACE for syscall SLOT_NR on AUDIT_ARCH_X86_64, ALLOW for
 * everything else), starts THREADS workers (default 1) that each make WARMUP
 * stops, meet at a barrier and make N more, timed (in the workers) from the
 * first start after the barrier to the last end.  Per MODE, one stop per iteration:
 *
 *   return  a self-returning slot inline: lea -0x80(%rsp),%rsp; push rcx, r11,
 *           rax; mov $NR,%eax; syscall; pop rax, r11, rcx; lea 0x80(%rsp),%rsp.
 *           Tracer: GETREGS, CONT (the syscall fails with ENOSYS, the pops
 *           restore the registers).
 *   seed    the 16-byte seed slot only.  Tracer: GETREGS, read the three
 *           saved registers from the stack (/proc/PID/mem), restore them,
 *           rsp += 152, orig_rax = -1, SETREGS, CONT (resume after the syscall).
 *   int3    "int3; nop".  Tracer: GETREGS, rip += 1 (the nop is emulated),
 *           SETREGS, CONT.
 *
 * TRACER_CPU / CHILD_CPU (-1: leave alone) pin the tracer and the child.
 *
 *   ctracer --child MODE N [THREADS [WARMUP]]
 *
 * runs the child alone: its parent, which must be waiting for it, is the
 * tracer (tools/pylimit.py, the same loop in Python).
 * Output on stdout, from the child then the tracer:
 *
 *     mode=MODE threads=T iterations=N*T ns=ELAPSED
 *     stops=S
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef SLOT_NR
#define SLOT_NR 0x3ff07e57 /* ptprobe.arch.SLOT_SYSCALL_NR; bench.py passes -DSLOT_NR */
#endif
#define SLOT_FRAME 152     /* 0x80 red zone + rax, r11, rcx */

#define STR_(x) #x
#define STR(x) STR_(x)

static long iterations, warmup;
static int mode;                 /* 0 return, 1 seed, 2 int3 */
static pthread_barrier_t start_line;

static inline void hit_return(void)
{
    __asm__ volatile("lea -0x80(%%rsp), %%rsp\n\t"
                     "push %%rcx\n\t"
                     "push %%r11\n\t"
                     "push %%rax\n\t"
                     "mov $" STR(SLOT_NR) ", %%eax\n\t"
                     "syscall\n\t"
                     "pop %%rax\n\t"
                     "pop %%r11\n\t"
                     "pop %%rcx\n\t"
                     "lea 0x80(%%rsp), %%rsp\n\t" ::: "memory");
}

static inline void hit_seed(void)
{
    /* the tracer restores rax/r11/rcx and rsp and skips the syscall */
    __asm__ volatile("lea -0x80(%%rsp), %%rsp\n\t"
                     "push %%rcx\n\t"
                     "push %%r11\n\t"
                     "push %%rax\n\t"
                     "mov $" STR(SLOT_NR) ", %%eax\n\t"
                     "syscall\n\t" ::: "memory");
}

static inline void hit_int3(void)
{
    __asm__ volatile("int3\n\tnop\n\t" ::: "memory");
}

static void hit(void)
{
    if (mode == 0)
        hit_return();
    else if (mode == 1)
        hit_seed();
    else
        hit_int3();
}

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

struct span {
    long long start, end;
};

/* Each worker times its own measured phase; the result spans the earliest
 * start to the latest end. */
static void *worker(void *arg)
{
    struct span *span = arg;
    for (long i = 0; i < warmup; i++)
        hit();
    pthread_barrier_wait(&start_line);
    span->start = now_ns();
    for (long i = 0; i < iterations; i++)
        hit();
    span->end = now_ns();
    return NULL;
}

static void pin(pid_t pid, int cpu)
{
    if (cpu < 0)
        return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(pid, sizeof(set), &set) != 0)
        perror("sched_setaffinity");
}

static int child_main(int threads)
{
    if (ptrace(PTRACE_TRACEME, 0, 0, 0) != 0) {
        perror("PTRACE_TRACEME");
        return 1;
    }
    raise(SIGSTOP);
    if (mode != 2) {
        struct sock_filter code[] = {
            BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
            BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 0, 3),
            BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
            BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SLOT_NR, 0, 1),
            BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_TRACE),
            BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        };
        struct sock_fprog prog = {sizeof(code) / sizeof(code[0]), code};
        if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 ||
            syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) != 0) {
            perror("seccomp");
            return 1;
        }
    }
    pthread_t tids[64];
    struct span spans[64];
    pthread_barrier_init(&start_line, NULL, (unsigned)threads + 1);
    for (int i = 0; i < threads; i++)
        pthread_create(&tids[i], NULL, worker, &spans[i]);
    pthread_barrier_wait(&start_line);
    long long first = 0, last = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(tids[i], NULL);
        if (i == 0 || spans[i].start < first)
            first = spans[i].start;
        if (i == 0 || spans[i].end > last)
            last = spans[i].end;
    }
    long long elapsed = last - first;
    printf("mode=%s threads=%d iterations=%ld ns=%lld\n",
           mode == 0 ? "return" : mode == 1 ? "seed" : "int3", threads, iterations * threads, elapsed);
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv)
{
    int child_only = argc > 1 && strcmp(argv[1], "--child") == 0;
    if (child_only) {
        argv++;
        argc--;
    }
    if (argc < 3) {
        fprintf(stderr, "usage: %s return|seed|int3 N [THREADS [WARMUP [TRACER_CPU [CHILD_CPU]]]]\n", argv[0]);
        return 2;
    }
    if (strcmp(argv[1], "return") == 0)
        mode = 0;
    else if (strcmp(argv[1], "seed") == 0)
        mode = 1;
    else if (strcmp(argv[1], "int3") == 0)
        mode = 2;
    else {
        fprintf(stderr, "%s: unknown mode %s\n", argv[0], argv[1]);
        return 2;
    }
    iterations = strtol(argv[2], NULL, 0);
    int threads = argc > 3 ? atoi(argv[3]) : 1;
    warmup = argc > 4 ? strtol(argv[4], NULL, 0) : 0;
    int tracer_cpu = argc > 5 ? atoi(argv[5]) : -1;
    int child_cpu = argc > 6 ? atoi(argv[6]) : -1;
    if (threads < 1 || threads > 64)
        return 2;
    if (child_only)
        return child_main(threads);
    pin(0, tracer_cpu);
    fflush(stdout);
    pid_t child = fork();
    if (child < 0) {
        perror("fork");
        return 1;
    }
    if (child == 0) {
        pin(0, child_cpu);
        _exit(child_main(threads));
    }

    int status;
    if (waitpid(child, &status, __WALL) != child || !WIFSTOPPED(status)) {
        fprintf(stderr, "ctracer: child did not stop\n");
        return 1;
    }
    ptrace(PTRACE_SETOPTIONS, child, 0,
           PTRACE_O_TRACESECCOMP | PTRACE_O_TRACECLONE | PTRACE_O_EXITKILL);
    ptrace(PTRACE_CONT, child, 0, 0);

    char mem_path[64];
    snprintf(mem_path, sizeof(mem_path), "/proc/%d/mem", child);
    int mem = open(mem_path, O_RDONLY);
    long stops = 0;
    int exit_code = 1;
    struct user_regs_struct regs;
    for (;;) {
        pid_t tid = waitpid(-1, &status, __WALL);
        if (tid < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (WIFEXITED(status) || WIFSIGNALED(status)) {
            if (tid == child) {
                exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
                break;
            }
            continue;
        }
        int sig = WSTOPSIG(status);
        int event = status >> 16;
        if (event == PTRACE_EVENT_SECCOMP) {
            ptrace(PTRACE_GETREGS, tid, 0, &regs);
            if (mode == 1) {
                unsigned long long saved[3];
                if (pread(mem, saved, sizeof(saved), (off_t)regs.rsp) != sizeof(saved)) {
                    perror("pread");
                    kill(child, SIGKILL);
                    return 1;
                }
                regs.rax = saved[0];
                regs.r11 = saved[1];
                regs.rcx = saved[2];
                regs.rsp += SLOT_FRAME;
                regs.orig_rax = (unsigned long long)-1;
                ptrace(PTRACE_SETREGS, tid, 0, &regs);
            }
            stops++;
            ptrace(PTRACE_CONT, tid, 0, 0);
        } else if (event == 0 && sig == SIGTRAP) {
            ptrace(PTRACE_GETREGS, tid, 0, &regs);
            regs.rip += 1;           /* over the nop after the int3 */
            ptrace(PTRACE_SETREGS, tid, 0, &regs);
            stops++;
            ptrace(PTRACE_CONT, tid, 0, 0);
        } else if (event != 0 || sig == SIGSTOP) {
            /* clone events and the new threads' first stop */
            ptrace(PTRACE_CONT, tid, 0, 0);
        } else {
            ptrace(PTRACE_CONT, tid, 0, sig);
        }
    }
    printf("stops=%ld\n", stops);
    return exit_code;
}

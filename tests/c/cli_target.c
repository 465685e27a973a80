/* cli_target: the program of the command-line tests (tests/test_cli.py).
 *
 *   cli_target calls N      N rounds, then prints "done N" and exits 0
 *   cli_target loop         prints "ready PID", then rounds for ever, printing
 *                           "progress N" every 100 rounds
 *   cli_target noterm       the same with SIGTERM ignored
 *   cli_target dl LIB       dlopen(LIB), then like loop; each round also calls the
 *                           library's cli_lib_fn(round)
 *   cli_target tree N       forks N children, prints "children PID..." then "ready PID",
 *                           and every process does rounds for ever (children silently)
 *
 * Round i (from 0) calls, in this order:
 *   cli_ints(-7, -100000000000 - i, 4000000000u, -300, -5, 0xdeadbeef00 + i)
 *   cli_str(S, i) for S in: "plain", "tab\there\n", a 100-character string, NULL
 *   cli_mixed(2.5 + i, 40 + i, 0.25f, "mixed")
 *   strlen(MARK) where MARK is "ifunc-mark-I" (libc's strlen is an IFUNC)
 *   the USDT probe cli:ints (-4@ -7, -8@ -100000000000 - i, 2@ 65000, 8@ "usdt-str")
 *   cli_last(i)
 */
#include <dlfcn.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ptprobe_sdt.h"

__attribute__((noipa)) long cli_ints(int i, long l, unsigned int u, short h, signed char c, unsigned long x)
{
    return i + l + u + h + c + (long)x;
}

__attribute__((noipa)) long cli_str(const char *s, long n)
{
    return (s ? (long)s[0] : 0) + n;
}

__attribute__((noipa)) double cli_mixed(double d, int i, float f, const char *s)
{
    return d + i + f + s[0];
}

__attribute__((noipa)) long cli_last(long i)
{
    return i + 1;
}

static char long_string[101];
static int (*lib_fn)(int);

static void round_of_calls(long i)
{
    char mark[32];
    int neg = -7;
    long big = -100000000000L - i;
    unsigned short u16 = 65000;
    const char *volatile usdt_ptr = "usdt-str";
    const char *usdt_str = usdt_ptr;

    cli_ints(-7, -100000000000L - i, 4000000000u, -300, -5, 0xdeadbeef00UL + (unsigned long)i);
    cli_str("plain", i);
    cli_str("tab\there\n", i);
    cli_str(long_string, i);
    cli_str(NULL, i);
    cli_mixed(2.5 + (double)i, 40 + (int)i, 0.25f, "mixed");
    snprintf(mark, sizeof mark, "ifunc-mark-%ld", i);
    if (strlen(mark) == 0)
        abort();
    PTPROBE_SDT_PROBE(cli, ints, neg, big, u16, usdt_str);
    if (lib_fn != NULL)
        lib_fn((int)i);
    cli_last(i);
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "calls";
    memset(long_string, 'x', 100);
    if (strcmp(mode, "calls") == 0) {
        long n = argc > 2 ? atol(argv[2]) : 3;
        for (long i = 0; i < n; i++)
            round_of_calls(i);
        printf("done %ld\n", n);
        return 0;
    }
    if (strcmp(mode, "noterm") == 0)
        signal(SIGTERM, SIG_IGN);
    if (strcmp(mode, "dl") == 0) {
        void *lib = dlopen(argv[2], RTLD_NOW);
        if (lib == NULL || (lib_fn = (int (*)(int))dlsym(lib, "cli_lib_fn")) == NULL) {
            fprintf(stderr, "dlopen: %s\n", dlerror());
            return 1;
        }
    }
    if (strcmp(mode, "tree") == 0) {
        int n = argc > 2 ? atoi(argv[2]) : 2;
        int quiet = 0;
        printf("children");
        for (int k = 0; k < n && !quiet; k++) {
            pid_t child = fork();
            if (child == 0)
                quiet = 1;
            else
                printf(" %d", (int)child);
        }
        if (quiet) {
            for (long i = 0;; i++) {
                round_of_calls(i);
                usleep(1000);
            }
        }
        printf("\n");
    }
    printf("ready %d\n", (int)getpid());
    fflush(stdout);
    for (long i = 0;; i++) {
        round_of_calls(i);
        if (i % 100 == 99) {
            printf("progress %ld\n", i + 1);
            fflush(stdout);
        }
        usleep(1000);
    }
}

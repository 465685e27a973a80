/* The program itself makes the slot syscall number while traced: it must fail with
 * EPROTO and leave everything else alone.
 *
 *   fast_nrcall NR    passes regs_site, calls syscall(NR, ...) through libc and then
 *                     directly, passes regs_site again; prints
 *                     "libc ret=R errno=E" and "raw ret=R", exits 1 if a register
 *                     the kernel preserves across a syscall changed.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fast_regcheck.h"

static int pass_site(uint64_t seed)
{
    uint64_t out[PROBE_OUT_WORDS];
    char msg[1024];
    memset(out, 0, sizeof out);
    probe_regs(seed, out);
    if (check_regs(seed, out, 0, msg, sizeof msg)) {
        printf("site FAILED:%s\n", msg);
        return 1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s NR\n", argv[0]);
        return 2;
    }
    long nr = strtol(argv[1], NULL, 0);
    int bad = pass_site(0x1234);

    errno = 0;
    long ret = syscall(nr, 0x11L, 0x22L, 0x33L, 0x44L, 0x55L, 0x66L);
    int err = errno;
    printf("libc ret=%ld errno=%d\n", ret, err);

    /* every register but rax, rcx and r11 must come back as it went in */
    register uint64_t a1 __asm__("rdi") = 0xd1d1d1d1d1d1d1d1ULL;
    register uint64_t a2 __asm__("rsi") = 0x5151515151515151ULL;
    register uint64_t a3 __asm__("rdx") = 0xdddd0000dddd0000ULL;
    register uint64_t a4 __asm__("r10") = 0x1010101010101010ULL;
    register uint64_t a5 __asm__("r8") = 0x8888888888888888ULL;
    register uint64_t a6 __asm__("r9") = 0x9999999999999999ULL;
    register uint64_t b __asm__("rbx") = 0xbbbbbbbb00000001ULL;
    long raw = nr;
    __asm__ volatile("syscall"
                     : "+a"(raw), "+r"(a1), "+r"(a2), "+r"(a3), "+r"(a4), "+r"(a5), "+r"(a6),
                       "+r"(b)
                     :
                     : "rcx", "r11", "memory");
    /* copy out of the register variables before any call */
    volatile uint64_t got[7] = {a1, a2, a3, a4, a5, a6, b};
    printf("raw ret=%ld\n", raw);
    if (got[0] != 0xd1d1d1d1d1d1d1d1ULL || got[1] != 0x5151515151515151ULL ||
        got[2] != 0xdddd0000dddd0000ULL || got[3] != 0x1010101010101010ULL ||
        got[4] != 0x8888888888888888ULL || got[5] != 0x9999999999999999ULL ||
        got[6] != 0xbbbbbbbb00000001ULL) {
        printf("registers FAILED: rdi=%#llx rsi=%#llx rdx=%#llx r10=%#llx r8=%#llx r9=%#llx "
               "rbx=%#llx\n", (unsigned long long)got[0], (unsigned long long)got[1],
               (unsigned long long)got[2], (unsigned long long)got[3],
               (unsigned long long)got[4], (unsigned long long)got[5],
               (unsigned long long)got[6]);
        bad = 1;
    }
    bad |= pass_site(0x5678);
    return bad;
}

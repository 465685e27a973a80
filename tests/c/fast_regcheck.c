/* A nop5 probe site with every general-purpose register, rflags and xmm0 set to
 * known values in front of it, and a record of what they hold right after it.
 * Linked into the fast_* targets that want register checks (tests/test_fastpath.py).
 *
 *   probe_regs(seed, out) sets, just before the site `regs_site`:
 *     register i (order of REG_NAMES, rsp excepted) = seed ^ probe_k[i]
 *     rflags = ((seed >> 8) & 0xcd5) | 0x202      (CF PF AF ZF SF DF OF as the seed says)
 *     xmm0   = { seed, ~seed }
 *   and stores after the site: out[0..15] the registers, out[16] rflags,
 *   out[17..18] xmm0, out[19] rsp before the site (out[7] is rsp after it).
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "fast_regcheck.h"

const char *const REG_NAMES[16] = {
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
    "r8",  "r9",  "r10", "r11", "r12", "r13", "r14", "r15",
};

/* One constant per register; rsp's entry (7) is unused. */
const uint64_t probe_k[16] = {
    0x9e3779b97f4a7c15ULL, 0x3c6ef372fe94f82aULL, 0xdaa66d2c7ddf743fULL, 0x78dde6e5fd29f054ULL,
    0x1715609f7c746c69ULL, 0xb54cda58fbbee87eULL, 0x538454127b096493ULL, 0x0000000000000000ULL,
    0x8ff34785f99e5cbdULL, 0x2e2ac13f78e8d8d2ULL, 0xcc623af8f83354e7ULL, 0x6a99b4b2777dd0fcULL,
    0x08d12e6bf6c84d11ULL, 0xa708a82576130926ULL, 0x454021def55d453bULL, 0xe3779b9874a7c150ULL,
};

/* probe_regs(uint64_t seed [rdi], uint64_t out[20] [rsi]) */
__asm__(
    ".text\n"
    ".globl probe_regs\n"
    ".type probe_regs, @function\n"
    "probe_regs:\n"
    "    push %rbx\n"
    "    push %rbp\n"
    "    push %r12\n"
    "    push %r13\n"
    "    push %r14\n"
    "    push %r15\n"
    "    push %rsi\n"                     /* B+8: out */
    "    push %rdi\n"                     /* B:   seed; rsp == B from here on */
    "    mov %rsp, 152(%rsi)\n"           /* out[19] = B */
    "    movq %rdi, %xmm0\n"
    "    mov %rdi, %rax\n"
    "    not %rax\n"
    "    movq %rax, %xmm1\n"
    "    punpcklqdq %xmm1, %xmm0\n"       /* xmm0 = { seed, ~seed } */
    "    mov %rdi, %rax\n"
    "    shr $8, %rax\n"
    "    and $0xcd5, %eax\n"
    "    or $0x202, %eax\n"
    "    push %rax\n"                     /* the flags, at B-8 */
    "    mov %rdi, %rax\n  xor probe_k+0(%rip), %rax\n"
    "    mov %rdi, %rbx\n  xor probe_k+8(%rip), %rbx\n"
    "    mov %rdi, %rcx\n  xor probe_k+16(%rip), %rcx\n"
    "    mov %rdi, %rdx\n  xor probe_k+24(%rip), %rdx\n"
    "    mov %rdi, %rsi\n  xor probe_k+32(%rip), %rsi\n"
    "    mov %rdi, %rbp\n  xor probe_k+48(%rip), %rbp\n"
    "    mov %rdi, %r8\n   xor probe_k+64(%rip), %r8\n"
    "    mov %rdi, %r9\n   xor probe_k+72(%rip), %r9\n"
    "    mov %rdi, %r10\n  xor probe_k+80(%rip), %r10\n"
    "    mov %rdi, %r11\n  xor probe_k+88(%rip), %r11\n"
    "    mov %rdi, %r12\n  xor probe_k+96(%rip), %r12\n"
    "    mov %rdi, %r13\n  xor probe_k+104(%rip), %r13\n"
    "    mov %rdi, %r14\n  xor probe_k+112(%rip), %r14\n"
    "    mov %rdi, %r15\n  xor probe_k+120(%rip), %r15\n"
    "    xor probe_k+40(%rip), %rdi\n"
    "    popfq\n"                          /* rsp == B */
    ".globl regs_site\n"
    "regs_site:\n"
    "    .byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n"
    "    pushfq\n"                         /* B-8: rflags after the site */
    "    push %rax\n"                      /* B-16 */
    "    mov 24(%rsp), %rax\n"             /* out */
    "    mov %rbx, 8(%rax)\n"
    "    mov %rcx, 16(%rax)\n"
    "    mov %rdx, 24(%rax)\n"
    "    mov %rsi, 32(%rax)\n"
    "    mov %rdi, 40(%rax)\n"
    "    mov %rbp, 48(%rax)\n"
    "    lea 16(%rsp), %rbx\n"
    "    mov %rbx, 56(%rax)\n"
    "    mov %r8, 64(%rax)\n"
    "    mov %r9, 72(%rax)\n"
    "    mov %r10, 80(%rax)\n"
    "    mov %r11, 88(%rax)\n"
    "    mov %r12, 96(%rax)\n"
    "    mov %r13, 104(%rax)\n"
    "    mov %r14, 112(%rax)\n"
    "    mov %r15, 120(%rax)\n"
    "    movdqu %xmm0, 136(%rax)\n"
    "    pop %rbx\n"
    "    mov %rbx, 0(%rax)\n"
    "    pop %rbx\n"
    "    mov %rbx, 128(%rax)\n"
    "    cld\n"
    "    add $16, %rsp\n"
    "    pop %r15\n"
    "    pop %r14\n"
    "    pop %r13\n"
    "    pop %r12\n"
    "    pop %rbp\n"
    "    pop %rbx\n"
    "    ret\n"
    ".size probe_regs, .-probe_regs\n");

uint64_t expected_reg(uint64_t seed, int i)
{
    return seed ^ probe_k[i];
}

uint64_t expected_flags(uint64_t seed)
{
    return ((seed >> 8) & 0xcd5) | 0x202;
}

/* Compare out[] with what probe_regs(seed) set; registers whose bit is set in
 * `skip` (bit i = register i) are not checked. Describes the mismatches in msg. */
int check_regs(uint64_t seed, const uint64_t *out, unsigned skip, char *msg, size_t size)
{
    int bad = 0;
    size_t used = 0;
    msg[0] = 0;
#define NOTE(...)                                                                   \
    do {                                                                            \
        bad++;                                                                      \
        if (used < size)                                                            \
            used += (size_t)snprintf(msg + used, size - used, __VA_ARGS__);         \
    } while (0)
    for (int i = 0; i < 16; i++) {
        if (skip & (1u << i))
            continue;
        uint64_t want = i == 7 ? out[19] : expected_reg(seed, i);
        if (out[i] != want)
            NOTE(" %s=%#llx(want %#llx)", REG_NAMES[i], (unsigned long long)out[i],
                 (unsigned long long)want);
    }
    /* bits the program set; RF (0x10000) and the like may legitimately differ */
    if ((out[16] & 0xfd7) != expected_flags(seed))
        NOTE(" rflags=%#llx(want %#llx)", (unsigned long long)out[16],
             (unsigned long long)expected_flags(seed));
    if (out[17] != seed || out[18] != ~seed)
        NOTE(" xmm0=%#llx:%#llx(want %#llx:%#llx)", (unsigned long long)out[18],
             (unsigned long long)out[17], (unsigned long long)~seed, (unsigned long long)seed);
#undef NOTE
    return bad;
}

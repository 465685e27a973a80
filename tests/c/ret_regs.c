/* Every register after a probed function's return, for tests/test_returns.py.
 *
 * regs_fn (assembly) sets every general register but rsp to a known value and
 * the carry flag, and returns; call_regs_fn (assembly) calls it and stores what
 * every register holds right after the return, rsp and rflags included. main
 * runs it ROUNDS times (argv[1], default 3) and prints "regs ok N" or the first
 * register that differs. Built with -DNOP5_ENTRY, regs_fn starts with a 5-byte
 * NOP (a jmp site); without, with a mov (an int3 site). With argv[2] = "set",
 * the test's handler sets rax to 0x5a5a: the expected rax becomes that.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef NOP5_ENTRY
#define ENTRY ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n"
#else
#define ENTRY ""
#endif

__asm__(".text\n"
        ".globl regs_fn\n"
        ".type regs_fn, @function\n"
        "regs_fn:\n" ENTRY
        "    movabs $0x1111111111111101, %rax\n"
        "    movabs $0x2222222222222202, %rbx\n"
        "    movabs $0x3333333333333303, %rcx\n"
        "    movabs $0x4444444444444404, %rdx\n"
        "    movabs $0x5555555555555505, %rsi\n"
        "    movabs $0x6666666666666606, %rdi\n"
        "    movabs $0x7777777777777707, %rbp\n"
        "    movabs $0x0808080808080808, %r8\n"
        "    movabs $0x0909090909090909, %r9\n"
        "    movabs $0x0a0a0a0a0a0a0a0a, %r10\n"
        "    movabs $0x0b0b0b0b0b0b0b0b, %r11\n"
        "    movabs $0x0c0c0c0c0c0c0c0c, %r12\n"
        "    movabs $0x0d0d0d0d0d0d0d0d, %r13\n"
        "    movabs $0x0e0e0e0e0e0e0e0e, %r14\n"
        "    movabs $0x0f0f0f0f0f0f0f0f, %r15\n"
        "    stc\n"
        "    ret\n"
        ".size regs_fn, .-regs_fn\n"
        /* call_regs_fn(unsigned long out[18]): out[0..15] rax rbx rcx rdx rsi rdi rbp
         * r8..r15 after the return, out[16] rsp after minus rsp before, out[17] rflags */
        ".globl call_regs_fn\n"
        ".type call_regs_fn, @function\n"
        "call_regs_fn:\n"
        "    push %rbx\n"
        "    push %rbp\n"
        "    push %r12\n"
        "    push %r13\n"
        "    push %r14\n"
        "    push %r15\n"
        "    push %rdi\n"
        "    mov %rsp, 128(%rdi)\n"
        "    clc\n"
        "    call regs_fn\n"
        "    pushfq\n"
        "    push %rax\n"
        "    mov 16(%rsp), %rax\n"
        "    mov %rbx, 8(%rax)\n"
        "    mov %rcx, 16(%rax)\n"
        "    mov %rdx, 24(%rax)\n"
        "    mov %rsi, 32(%rax)\n"
        "    mov %rdi, 40(%rax)\n"
        "    mov %rbp, 48(%rax)\n"
        "    mov %r8, 56(%rax)\n"
        "    mov %r9, 64(%rax)\n"
        "    mov %r10, 72(%rax)\n"
        "    mov %r11, 80(%rax)\n"
        "    mov %r12, 88(%rax)\n"
        "    mov %r13, 96(%rax)\n"
        "    mov %r14, 104(%rax)\n"
        "    mov %r15, 112(%rax)\n"
        "    lea 16(%rsp), %rbx\n"
        "    sub 128(%rax), %rbx\n"
        "    mov %rbx, 128(%rax)\n"
        "    pop %rbx\n"
        "    mov %rbx, 0(%rax)\n"
        "    pop %rbx\n"
        "    mov %rbx, 136(%rax)\n"
        "    pop %rdi\n"
        "    pop %r15\n"
        "    pop %r14\n"
        "    pop %r13\n"
        "    pop %r12\n"
        "    pop %rbp\n"
        "    pop %rbx\n"
        "    ret\n"
        ".size call_regs_fn, .-call_regs_fn\n");

void call_regs_fn(unsigned long *out);

static const char *names[] = {"rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9",
                              "r10", "r11", "r12", "r13", "r14", "r15"};

int main(int argc, char **argv)
{
    int rounds = argc > 1 ? atoi(argv[1]) : 3;
    int set = argc > 2 && strcmp(argv[2], "set") == 0;
    unsigned long expected[15] = {0x1111111111111101, 0x2222222222222202, 0x3333333333333303,
                                  0x4444444444444404, 0x5555555555555505, 0x6666666666666606,
                                  0x7777777777777707, 0x0808080808080808, 0x0909090909090909,
                                  0x0a0a0a0a0a0a0a0a, 0x0b0b0b0b0b0b0b0b, 0x0c0c0c0c0c0c0c0c,
                                  0x0d0d0d0d0d0d0d0d, 0x0e0e0e0e0e0e0e0e, 0x0f0f0f0f0f0f0f0f};
    if (set)
        expected[0] = 0x5a5a;
    for (int round = 0; round < rounds; round++) {
        unsigned long out[18];
        memset(out, 0, sizeof out);
        call_regs_fn(out);
        for (int i = 0; i < 15; i++) {
            if (out[i] != expected[i]) {
                printf("regs BAD %s %#lx\n", names[i], out[i]);
                return 1;
            }
        }
        if (out[16] != 0) {
            printf("regs BAD rsp moved by %ld\n", (long)out[16]);
            return 1;
        }
        if ((out[17] & 0x1) != 1 || (out[17] & 0x400) != 0) {
            printf("regs BAD rflags %#lx\n", out[17]);
            return 1;
        }
    }
    printf("regs ok %d\n", rounds);
    return 0;
}

/* check_regs() loads known values into every general-purpose register but rsp, sets the
 * flags (mode 0: CF SF PF AF; mode 1: ZF PF), fills the red zone below rsp with a pattern,
 * passes the probe sites regs_site_nop (nop), regs_site_mov (mov rax,rax), regs_site_nop5
 * (a 5-byte NOP), regs_site_pair (nop) + regs_site_pair5 (a 5-byte NOP: the nop1+nop5
 * combination USDT headers emit), then stores what it finds. main compares and exits 1 on
 * any difference.
 *
 * out[0..14]  rax rbx rcx rdx rsi rdi rbp r8 .. r15 after the sites
 * out[15]     rflags after the sites       out[16]  rflags before
 * out[17]     rsp before                   out[18]  rsp after
 * out[19..34] the 16 red-zone quadwords after the sites
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NOUT 35
#define REDZONE_PATTERN 0x5245445a4f4e4500ULL

uint64_t check_regs(uint64_t *out, uint64_t mode);

asm(".intel_syntax noprefix\n"
    ".text\n"
    ".globl check_regs\n"
    ".type check_regs, @function\n"
    "check_regs:\n"
    "  push rbx\n  push rbp\n  push r12\n  push r13\n  push r14\n  push r15\n"
    "  push rdi\n"
    "  mov [rdi+8*17], rsp\n"
    "  test rsi, rsi\n"
    "  jnz 1f\n"
    "  xor eax, eax\n"
    "  sub eax, 1\n"
    "  jmp 2f\n"
    "1:\n"
    "  xor eax, eax\n"
    "2:\n"
    "  pushfq\n"
    "  pop rax\n"
    "  mov [rdi+8*16], rax\n"
    "  movabs rax, 0x5245445a4f4e4500\n"
    "  .irp i,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15\n"
    "  mov [rsp-128+8*\\i], rax\n"
    "  lea rax, [rax+1]\n"
    "  .endr\n"
    "  movabs rax, 0x1111111111111111\n"
    "  movabs rbx, 0x2222222222222222\n"
    "  movabs rcx, 0x3333333333333333\n"
    "  movabs rdx, 0x4444444444444444\n"
    "  movabs rsi, 0x5555555555555555\n"
    "  movabs rdi, 0x6666666666666666\n"
    "  movabs rbp, 0x7777777777777777\n"
    "  movabs r8, 0x8888888888888888\n"
    "  movabs r9, 0x9999999999999999\n"
    "  movabs r10, 0xaaaaaaaaaaaaaaaa\n"
    "  movabs r11, 0xbbbbbbbbbbbbbbbb\n"
    "  movabs r12, 0xcccccccccccccccc\n"
    "  movabs r13, 0xdddddddddddddddd\n"
    "  movabs r14, 0xeeeeeeeeeeeeeeee\n"
    "  movabs r15, 0xffffffffffffffff\n"
    ".globl regs_site_nop\n"
    "regs_site_nop:\n"
    "  nop\n"
    ".globl regs_site_mov\n"
    "regs_site_mov:\n"
    "  mov rax, rax\n"
    ".globl regs_site_nop5\n"
    "regs_site_nop5:\n"
    "  .byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n"
    ".globl regs_site_pair\n"
    "regs_site_pair:\n"
    "  nop\n"
    ".globl regs_site_pair5\n"
    "regs_site_pair5:\n"
    "  .byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n"
    "  lea rsp, [rsp-128]\n"
    "  pushfq\n"
    "  push rax\n"
    "  mov rax, [rsp+144]\n"
    "  mov [rax+8*1], rbx\n"
    "  mov [rax+8*2], rcx\n"
    "  mov [rax+8*3], rdx\n"
    "  mov [rax+8*4], rsi\n"
    "  mov [rax+8*5], rdi\n"
    "  mov [rax+8*6], rbp\n"
    "  mov [rax+8*7], r8\n"
    "  mov [rax+8*8], r9\n"
    "  mov [rax+8*9], r10\n"
    "  mov [rax+8*10], r11\n"
    "  mov [rax+8*11], r12\n"
    "  mov [rax+8*12], r13\n"
    "  mov [rax+8*13], r14\n"
    "  mov [rax+8*14], r15\n"
    "  pop rbx\n"
    "  mov [rax+8*0], rbx\n"
    "  pop rbx\n"
    "  mov [rax+8*15], rbx\n"
    "  lea rbx, [rsp+128]\n"
    "  mov [rax+8*18], rbx\n"
    "  .irp i,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15\n"
    "  mov rbx, [rsp+8*\\i]\n"
    "  mov [rax+8*19+8*\\i], rbx\n"
    "  .endr\n"
    "  lea rsp, [rsp+128]\n"
    "  pop rdi\n"
    "  pop r15\n  pop r14\n  pop r13\n  pop r12\n  pop rbp\n  pop rbx\n"
    "  xor eax, eax\n"
    "  ret\n"
    ".size check_regs, .-check_regs\n"
    ".att_syntax prefix\n");

static const char *const names[15] = {"rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8",
                                      "r9",  "r10", "r11", "r12", "r13", "r14", "r15"};

int main(int argc, char **argv)
{
    int rounds = argc > 1 ? atoi(argv[1]) : 4;
    int bad = 0;
    for (int r = 0; r < rounds; r++) {
        uint64_t out[NOUT];
        uint64_t mode = (uint64_t)(r & 1);
        memset(out, 0, sizeof out);
        check_regs(out, mode);
        for (int k = 0; k < 15; k++) {
            uint64_t want = (uint64_t)(k + 1) * 0x1111111111111111ULL;
            if (out[k] != want) {
                printf("round %d: %s = %016llx, want %016llx\n", r, names[k],
                       (unsigned long long)out[k], (unsigned long long)want);
                bad++;
            }
        }
        if (out[15] != out[16]) {
            printf("round %d: rflags %llx after, %llx before\n", r, (unsigned long long)out[15],
                   (unsigned long long)out[16]);
            bad++;
        }
        uint64_t want_flags = mode ? 0x44 : 0x85; /* ZF|PF, or CF|PF|SF (AF not compared) */
        if ((out[16] & 0x8c5) != want_flags) {
            printf("round %d: flags before %llx, want %llx in 0x8c5\n", r,
                   (unsigned long long)out[16], (unsigned long long)want_flags);
            bad++;
        }
        if (out[17] != out[18]) {
            printf("round %d: rsp %llx after, %llx before\n", r, (unsigned long long)out[18],
                   (unsigned long long)out[17]);
            bad++;
        }
        for (int i = 0; i < 16; i++)
            if (out[19 + i] != REDZONE_PATTERN + (uint64_t)i) {
                printf("round %d: red zone quadword %d = %llx\n", r, i,
                       (unsigned long long)out[19 + i]);
                bad++;
            }
    }
    printf("%s after %d rounds\n", bad ? "MISMATCH" : "registers ok", rounds);
    return bad ? 1 : 0;
}

/* The red zone must survive a nop5 site: redzone_leaf() (a leaf, written in asm so
 * no compiler can move things around) fills the 128 bytes below rsp with a pattern,
 * passes the site rz_site N times, then counts the bytes of the pattern that changed.
 *
 *   fast_redzone [N]     (default 1000) prints "redzone bad=K", exits 1 if K != 0
 */
#include <stdio.h>
#include <stdlib.h>

int redzone_leaf(long n);
__asm__(
    ".text\n"
    ".globl redzone_leaf\n"
    ".type redzone_leaf, @function\n"
    "redzone_leaf:\n"
    "    movabs $0x0123456789abcdef, %rax\n"
    "    movabs $0x1111111111111111, %rdx\n"
    "    lea -128(%rsp), %rsi\n"
    "    mov $16, %ecx\n"
    "1:  mov %rax, (%rsi)\n"
    "    add %rdx, %rax\n"
    "    add $8, %rsi\n"
    "    dec %ecx\n"
    "    jnz 1b\n"
    "    mov %rdi, %rcx\n"
    "    test %rcx, %rcx\n"
    "    jz 3f\n"
    "2:\n"
    ".globl rz_site\n"
    "rz_site:\n"
    "    .byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n"
    "    dec %rcx\n"
    "    jnz 2b\n"
    "3:  movabs $0x0123456789abcdef, %rax\n"  /* expected qword */
    "    lea -128(%rsp), %rsi\n"
    "    mov $16, %ecx\n"
    "    xor %edi, %edi\n"
    "4:  mov (%rsi), %r8\n"
    "    xor %rax, %r8\n"                  /* the bits that changed */
    "    mov $8, %r9d\n"
    "5:  test $0xff, %r8b\n"
    "    jz 6f\n"
    "    inc %edi\n"                       /* one more byte changed */
    "6:  shr $8, %r8\n"
    "    dec %r9d\n"
    "    jnz 5b\n"
    "    add %rdx, %rax\n"
    "    add $8, %rsi\n"
    "    dec %ecx\n"
    "    jnz 4b\n"
    "    mov %edi, %eax\n"
    "    ret\n"
    ".size redzone_leaf, .-redzone_leaf\n");

int main(int argc, char **argv)
{
    long n = argc > 1 ? strtol(argv[1], NULL, 0) : 1000;
    int bad = redzone_leaf(n);
    printf("redzone bad=%d\n", bad);
    return bad ? 1 : 0;
}

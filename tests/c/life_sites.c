/* Probe sites shared by the life_* targets (tests/test_lifecycle.py); link it in.
 *
 *   long life_nop5(long x)   returns x + 1; its first instruction is the 5-byte NOP
 *                            0f 1f 44 00 00 (a jmp-slot site)
 *   long life_int3(long x)   returns x + 2; its first instruction is an ordinary one,
 *                            lea 2(%rdi),%rax (an int3 site, run out of line)
 */
__asm__(
    ".text\n"
    ".globl life_nop5\n"
    ".type life_nop5, @function\n"
    "life_nop5:\n"
    "    .byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n"
    "    lea 1(%rdi), %rax\n"
    "    ret\n"
    ".size life_nop5, .-life_nop5\n"
    ".globl life_int3\n"
    ".type life_int3, @function\n"
    "life_int3:\n"
    "    lea 2(%rdi), %rax\n"
    "    ret\n"
    ".size life_int3, .-life_int3\n");

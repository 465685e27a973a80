/* A shared library with a nop5 probe site, lib_site, in lib_func (adds 3).
 * Used by fast_forms.c (built with -DWITH_LIB). */

long lib_func(long acc);
__asm__(
    ".text\n"
    ".globl lib_func\n"
    ".type lib_func, @function\n"
    "lib_func:\n"
    "    mov %rdi, %rax\n"
    ".globl lib_site\n"
    "lib_site:\n"
    "    .byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n"
    "    add $3, %rax\n"
    "    ret\n"
    ".size lib_func, .-lib_func\n");

/* 300 nop5 probe sites, site_0 .. site_299, in one function.
 *
 *   fast_many [N]     runs every site N times (default 3); prints "many N"
 */
#include <stdio.h>
#include <stdlib.h>

void many_sites(void);
__asm__(
    ".text\n"
    ".globl many_sites\n"
    ".type many_sites, @function\n"
    "many_sites:\n"
    ".altmacro\n"
    ".macro fast_site n\n"
    ".globl site_\\n\n"
    "site_\\n:\n"
    "    .byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n"
    ".endm\n"
    ".set fast_i, 0\n"
    ".rept 300\n"
    "    fast_site %fast_i\n"
    "    .set fast_i, fast_i + 1\n"
    ".endr\n"
    ".noaltmacro\n"
    "    ret\n"
    ".size many_sites, .-many_sites\n");

int main(int argc, char **argv)
{
    long n = argc > 1 ? strtol(argv[1], NULL, 0) : 3;
    for (long i = 0; i < n; i++)
        many_sites();
    printf("many %ld\n", n);
    return 0;
}

/* The USDT NOP combos as probe sites, and a nop5 site in a shared library.
 *
 *   form_a: 90 0f 1f 44 00 00                  (nop1+nop5: resume at form_a+6)
 *   form_b: 90 66 2e 0f 1f 84 00 00 00 00 00   (nop1+nop10: resume at form_b+11)
 *
 * forms_func() adds 1 after form_a and 10 after form_b: a thread that resumed
 * anywhere but right after each combo gets another sum (or crashes).
 *
 *   fast_forms [N]   N passes of forms_func, fentry_func and lib_func (fastlib_sites.c,
 *                    when built with -DWITH_LIB); prints "forms N SUM", "fentry N SUM"
 *                    and "lib N SUM", exits 1 when a sum is wrong.
 */
#include <stdio.h>
#include <stdlib.h>

long forms_func(long acc);
__asm__(
    ".text\n"
    ".globl forms_func\n"
    ".type forms_func, @function\n"
    "forms_func:\n"
    "    mov %rdi, %rax\n"
    ".globl form_a\n"
    "form_a:\n"
    "    .byte 0x90, 0x0f, 0x1f, 0x44, 0x00, 0x00\n"
    "    add $1, %rax\n"
    ".globl form_b\n"
    "form_b:\n"
    "    .byte 0x90, 0x66, 0x2e, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00\n"
    "    add $10, %rax\n"
    "    ret\n"
    ".size forms_func, .-forms_func\n");

#ifdef WITH_LIB
long lib_func(long acc);
#endif

/* With -pg -mfentry -mnop-mcount (non-PIE) its entry is a nop5 site too. */
__attribute__((noinline)) long fentry_func(long acc)
{
    __asm__ volatile("" : "+r"(acc));
    return acc + 100;
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? strtol(argv[1], NULL, 0) : 5;
    int bad = 0;
    long sum = 0;
    for (long i = 0; i < n; i++)
        sum = forms_func(sum);
    printf("forms %ld %ld\n", n, sum);
    bad |= sum != 11 * n;
    sum = 0;
    for (long i = 0; i < n; i++)
        sum = fentry_func(sum);
    printf("fentry %ld %ld\n", n, sum);
    bad |= sum != 100 * n;
#ifdef WITH_LIB
    sum = 0;
    for (long i = 0; i < n; i++)
        sum = lib_func(sum);
    printf("lib %ld %ld\n", n, sum);
    bad |= sum != 3 * n;
#endif
    return bad;
}

/* A small program for tests/test_elf.py: functions (global, static, weak,
 * alias, a size-0 assembler label), initialised, read-only and zeroed data. */
#include <stdio.h>

int counter = 7;
int zeroed[64];
const char message[] = "ptprobe elf test";

int *other_get(void);

static __attribute__((noinline)) int helper(int x)
{
    return x * 3 + counter;
}

__attribute__((noinline)) int compute(int x)
{
    zeroed[x & 63] += x;
    return helper(x) + 1;
}

int alias_fn(int x) __attribute__((alias("compute")));

__attribute__((weak, noinline)) int weak_fn(int x)
{
    return x + 1;
}

__asm__(".text\n"
        ".globl zero_size_fn\n"
        ".type zero_size_fn, @function\n"
        "zero_size_fn:\n"
        "\tret\n");

int main(int argc, char **argv)
{
    (void)argv;
    printf("%s %d %d %p\n", message, compute(argc), weak_fn(argc), (void *)other_get());
    return 0;
}

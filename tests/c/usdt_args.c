/* A 12-argument USDT probe whose note is written by hand in inline asm, so that
 * the argument string certainly has every operand form: constants, registers
 * (including rax/rcx/r11, which a jmp slot saves and restores), stack slots,
 * array elements through SIB (base,index,scale) and rip-relative globals,
 * with negative values.  Registers and stack offsets are still chosen by the
 * compiler through asm operands.  The site is a 1-byte nop, or a 5-byte nop
 * with -DARGS_NOP5.
 *
 * For round i (0 <= i < N, N = argv[1], default 5) the probe passes:
 *   1  -4@$-17                    -17
 *   2   8@%rax                    0xdeadbeefcafef00d ^ i
 *   3  -4@%ecx                    -5 - i
 *   4  -2@%r11w                   -300 - i
 *   5  -8@<stack slot>            -99999999999 - i
 *   6   4@<stack slot>            4000000000 + i
 *   7  -4@-4(%b,%x,4)             g_table[(i % 5 + 1) - 1]   (global array, SIB)
 *   8  -8@8(%b,%x,8)              local[i % 3 + 1]           (stack array, SIB)
 *   9  -8@g_neg(%rip)             g_neg = -1234567890123 - i
 *  10  -4@g_table+20(%rip)        g_table[5] = -66
 *  11   2@<compiler's g_u16>      g_u16 = 0xfedc - i          (rip-relative in PIE)
 *  12  -1@<8-bit register>        -7 - i
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#ifdef ARGS_NOP5
#define ARGS_SITE ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00"
#else
#define ARGS_SITE "nop"
#endif

int32_t g_table[6] = {11, -22, 33, -44, 55, -66};
int64_t g_neg;
uint16_t g_u16;

__attribute__((noinline)) long twelve(long i)
{
    volatile int64_t slot8 = -99999999999LL - i;
    volatile uint32_t slot4 = 4000000000u + (uint32_t)i;
    int64_t local[4] = {100 + i, -200 - i, 300 + i, -400 - i};
    register unsigned long a1 __asm__("rax") = 0xdeadbeefcafef00dUL ^ (unsigned long)i;
    register int c1 __asm__("rcx") = -5 - (int)i;
    register short r11 __asm__("r11") = (short)(-300 - i);
    long gidx = i % 5 + 1;
    long lidx = i % 3;
    signed char byte = (signed char)(-7 - i);

    g_neg = -1234567890123LL - i;
    g_u16 = (uint16_t)(0xfedc - i);
    __asm__ __volatile__(
        "990:\t" ARGS_SITE "\n"
        "\t.pushsection .note.stapsdt, \"?\", @note\n"
        "\t.balign 4\n"
        "\t.4byte 992f - 991f, 994f - 993f, 3\n"
        "991:\t.asciz \"stapsdt\"\n"
        "992:\t.balign 4\n"
        "993:\t.8byte 990b\n"
        "\t.8byte _.stapsdt.base\n"
        "\t.8byte 0\n"
        "\t.asciz \"ptargs\"\n"
        "\t.asciz \"twelve\"\n"
        "\t.ascii \"-4@%[k] 8@%[a1] -4@%[c1] -2@%[r11] -8@%[s8] 4@%[s4] \"\n"
        "\t.ascii \"-4@-4(%[gb],%[gi],4) -8@8(%[lb],%[li],8) \"\n"
        "\t.ascii \"-8@g_neg(%%rip) -4@g_table+20(%%rip) 2@%[u16] -1@%[byte]\"\n"
        "\t.byte 0\n"
        "994:\t.balign 4\n"
        "\t.popsection\n"
        ".ifndef _.stapsdt.base\n"
        "\t.pushsection .stapsdt.base, \"aG\", @progbits, .stapsdt.base, comdat\n"
        "\t.weak _.stapsdt.base\n"
        "\t.hidden _.stapsdt.base\n"
        "_.stapsdt.base:\n"
        "\t.space 1\n"
        "\t.size _.stapsdt.base, 1\n"
        "\t.popsection\n"
        ".endif\n"
        :
        : [k] "n" (-17), [a1] "r" (a1), [c1] "r" (c1), [r11] "r" (r11),
          [s8] "m" (slot8), [s4] "m" (slot4),
          [gb] "r" (g_table), [gi] "r" (gidx), [lb] "r" (local), [li] "r" (lidx),
          [u16] "m" (g_u16), [byte] "q" (byte),
          "m" (g_neg), "m" (g_table), "m" (local)
        : "memory");
    return local[lidx + 1] + g_table[gidx - 1];
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 5;
    long sum = 0;
    for (long i = 0; i < n; i++)
        sum += twelve(i);
    printf("rounds %d sum %ld\n", n, sum);
    return 0;
}

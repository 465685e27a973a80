/* Built with -O0 -fno-omit-frame-pointer: functions whose instructions the tests probe
 * (push %rbp, ret, rip-relative load and store, a 1-byte nop labelled nop_site). */
#include <stdio.h>

int global_value = 42;

int add(int a, int b)
{
    return a + b;
}

int read_global(void)
{
    return global_value;
}

void bump(void)
{
    global_value += 3;
}

int with_ret(int x)
{
    return x * 3;
}

int with_nop(int x)
{
    asm volatile(".globl nop_site\nnop_site: nop");
    return x + 1;
}

int main(void)
{
    int s = 0;
    for (int i = 0; i < 5; i++) {
        s += add(i, 1);
        s += read_global();
        s += with_ret(i);
        s += with_nop(i);
        bump();
        printf("round %d s=%d global=%d\n", i, s, global_value);
    }
    printf("done %d\n", s);
    return 0;
}

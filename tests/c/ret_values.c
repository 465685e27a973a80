/* Return values and durations for tests/test_returns.py: functions with known
 * results and known sleeps, called from main in a fixed order; main prints what
 * each call returned, so that the test can compare with what the probes saw.
 *
 *   sleep_int(ms, k)    sleeps ms milliseconds, returns ms * 1000 + k
 *   get_ptr(i)          returns &table[i]
 *   scale(x)            returns x * 1.5 (a double, in xmm0)
 *   make_pair(a, b)     returns {a + 1, b * 2} (16 bytes, in rdx:rax)
 *   negative(x)         returns -x (an int: eax, the upper half of rax is the caller's problem)
 */
#include <stdio.h>
#include <time.h>

#define NOIPA __attribute__((noipa))

struct pair {
    long a;
    long b;
};

long table[8];

NOIPA int sleep_int(int ms, int k)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0)
        ;
    return ms * 1000 + k;
}

NOIPA long *get_ptr(int i)
{
    return &table[i];
}

NOIPA double scale(double x)
{
    return x * 1.5;
}

NOIPA struct pair make_pair(long a, long b)
{
    struct pair p = {a + 1, b * 2};
    return p;
}

NOIPA int negative(int x)
{
    return -x;
}

int main(void)
{
    int r1 = sleep_int(20, 1);
    int r2 = sleep_int(60, 2);
    long *p = get_ptr(3);
    double d = scale(2.5);
    struct pair pr = make_pair(41, 0x123456789);
    int n = negative(7);
    printf("sleep_int %d %d\n", r1, r2);
    printf("get_ptr %#lx\n", (unsigned long)p);
    printf("scale %.3f\n", d);
    printf("make_pair %ld %#lx\n", pr.a, (unsigned long)pr.b);
    printf("negative %d\n", n);
    return 0;
}

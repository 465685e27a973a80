/* risk_loop.c - calls work(i) for i in 0..N-1 and prints "sum S" (S = N*(N-1)). */
#include <stdio.h>
#include <stdlib.h>

__attribute__((noinline)) long work(long i)
{
    __asm__ volatile("" ::: "memory");
    return i * 2;
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 1000;
    long sum = 0;
    for (long i = 0; i < n; i++)
        sum += work(i);
    printf("sum %ld\n", sum);
    return 0;
}

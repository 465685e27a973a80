/* The bundled example program: a small "order book" that ptprobe probes.
 * Build: gcc -O1 -g -pg -mfentry -mnop-mcount -fno-pie -no-pie -o demo demo.c
 * (-mnop-mcount puts a 5-byte NOP at every function entry: the jmp fast path). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct order { const char *symbol; long qty; long price; };

__attribute__((noinline)) long compute(long qty, long price)
{
    return qty * price;
}

__attribute__((noinline)) void submit(const char *symbol, long qty, long price)
{
    long total = compute(qty, price);
    printf("%-5s %4ld x %5ld = %8ld\n", symbol, qty, price, total);
}

int main(int argc, char **argv)
{
    static const char *symbols[] = { "ACME", "BOLT", "CRUX", "DYNE" };
    int rounds = argc > 1 ? atoi(argv[1]) : 8;
    for (int i = 0; i < rounds; i++)
        submit(symbols[i % 4], 10 + i, 100 + 7 * i);
    return 0;
}

/* Runs until killed: prints "ready PID", then calls work() in a loop and prints
 * "progress N COUNTER" every 100 calls. work_nop5 labels a 5-byte NOP inside work().
 * spare() is never called: tests may patch it. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

volatile unsigned long counter;

__attribute__((noipa)) unsigned long work(unsigned long i)
{
    counter += i;
    asm volatile(".globl work_nop5\nwork_nop5: .byte 0x0f, 0x1f, 0x44, 0x00, 0x00");
    return counter * 3 + 1;
}

__attribute__((noipa)) int spare(int x)
{
    return x * 7 + 3;
}

int main(int argc, char **argv)
{
    (void)argv;
    if (argc > 5)
        spare(argc);
    printf("ready %d\n", (int)getpid());
    fflush(stdout);
    for (unsigned long i = 1;; i++) {
        work(i);
        if (i % 100 == 0) {
            printf("progress %lu %lu\n", i, counter);
            fflush(stdout);
        }
        usleep(200);
    }
}

/* Linked against libcorelib.so: lib_compute() 6 times and getpid() 3 times. */
#include <stdio.h>
#include <unistd.h>

int lib_compute(int x);

int main(void)
{
    int s = 0;
    for (int i = 0; i < 6; i++)
        s += lib_compute(i);
    for (int i = 0; i < 3; i++)
        s += getpid() > 0;
    printf("sum %d\n", s);
    return 0;
}

/* risk_wait.c - reads one byte from stdin, then exits with status 3. */
#include <unistd.h>

int main(void)
{
    char c;
    if (read(0, &c, 1) < 0)
        return 1;
    return 3;
}

/* A USDT probe with a string argument: ptstr:greet(const char *word, int n)
 * for each word of a fixed list.  Prints "greeted K" on stdout at the end. */
#include <stdio.h>
#include "ptprobe_sdt.h"

static const char *const words[] = {"alpha", "beta", "gamma delta", "", "\xc3\xa9t\xc3\xa9"};

__attribute__((noinline)) void greet(const char *word, int n)
{
    PTPROBE_SDT_PROBE(ptstr, greet, word, n);
}

int main(void)
{
    int k = 0;
    for (int i = 0; i < (int)(sizeof words / sizeof words[0]); i++, k++)
        greet(words[i], -10 * i + 3);
    printf("greeted %d\n", k);
    return 0;
}

/* risk_dlswap.c - dlopen library A, call value(10), dlclose it, dlopen library B
 * (same layout, mapped where A was), call value(10).
 *
 *   risk_dlswap LIB_A LIB_B      prints "a=R1 at=ADDR1 b=R2 at=ADDR2"
 */
#include <dlfcn.h>
#include <stdio.h>

static int call(const char *path, void **where)
{
    void *h = dlopen(path, RTLD_NOW);
    if (!h)
        return -1000;
    int (*value)(int) = (int (*)(int))dlsym(h, "value");
    *where = (void *)value;
    int r = value(10);
    dlclose(h);
    return r;
}

int main(int argc, char **argv)
{
    if (argc != 3)
        return 2;
    void *a_at, *b_at;
    int a = call(argv[1], &a_at);
    int b = call(argv[2], &b_at);
    printf("a=%d at=%p b=%d at=%p\n", a, a_at, b, b_at);
    return 0;
}

/* Call chains for the stack traces of tests/test_returns.py (compared with gdb):
 *
 *   chain   main -> c1 -> c2 -> c3 -> c4 -> c5 -> leaf
 *   qsort   main -> qsort (libc) -> ... -> compare (each comparison)
 *   lib     main -> outer_exe -> lib_enter (.so) -> lib_middle (.so) -> exe_callback -> leaf
 *           (built with -DWITH_LIB)
 *
 * Every function is noinline and does a volatile store after its call, so that no
 * call is a tail call and each function keeps its own frame.
 */
#include <stdlib.h>
#include <string.h>

#define NOINLINE __attribute__((noinline))

volatile int sink;

NOINLINE int leaf(int x) { sink += x; return x + 1; }
NOINLINE int c5(int x) { int r = leaf(x + 1); sink += r; return r; }
NOINLINE int c4(int x) { int r = c5(x + 1); sink += r; return r; }
NOINLINE int c3(int x) { int r = c4(x + 1); sink += r; return r; }
NOINLINE int c2(int x) { int r = c3(x + 1); sink += r; return r; }
NOINLINE int c1(int x) { int r = c2(x + 1); sink += r; return r; }

NOINLINE int compare(const void *a, const void *b)
{
    int x = *(const int *)a, y = *(const int *)b;
    sink++;
    return (x > y) - (x < y);
}

#ifdef WITH_LIB
int lib_enter(int x, int (*callback)(int));

NOINLINE int exe_callback(int x) { int r = leaf(x); sink += r; return r; }
NOINLINE int outer_exe(int x) { int r = lib_enter(x, exe_callback); sink += r; return r; }
#endif

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "chain";
    if (strcmp(mode, "chain") == 0) {
        sink += c1(1);
    } else if (strcmp(mode, "qsort") == 0) {
        int values[8];
        for (int i = 0; i < 8; i++)
            values[i] = (i * 5) % 8;
        qsort(values, 8, sizeof values[0], compare);
        sink += values[0];
#ifdef WITH_LIB
    } else if (strcmp(mode, "lib") == 0) {
        sink += outer_exe(1);
#endif
    } else {
        return 2;
    }
    return 0;
}

/* Shared library half of unwind_target.c's "lib" mode: the chain enters here
 * from the executable and calls back into it. */
#define NOINLINE __attribute__((noinline))

volatile int lib_sink;

NOINLINE int lib_middle(int x, int (*callback)(int)) {
    int r = callback(x + 1);
    lib_sink += r;
    return r;
}

NOINLINE int lib_enter(int x, int (*callback)(int)) {
    int r = lib_middle(x + 1, callback);
    lib_sink += r;
    return r;
}

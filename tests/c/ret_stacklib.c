/* The shared library of ret_stack.c's "lib" mode: two frames between the
 * executable's outer_exe and its exe_callback. */
#define NOINLINE __attribute__((noinline))

volatile int lib_sink;

NOINLINE int lib_middle(int x, int (*callback)(int))
{
    int r = callback(x + 1);
    lib_sink += r;
    return r;
}

NOINLINE int lib_enter(int x, int (*callback)(int))
{
    int r = lib_middle(x + 1, callback);
    lib_sink += r;
    return r;
}

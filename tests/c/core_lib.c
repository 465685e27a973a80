/* A small shared library (built as libcorelib.so). */
int lib_compute(int x)
{
    return x * 5 + 2;
}

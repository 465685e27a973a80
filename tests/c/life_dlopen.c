/* Loads liblifeplug.so (lifelib_plug.c) with dlopen, when told to.
 *
 *   life_dlopen LIBRARY             interactive: prints "ready PID", then reads commands
 *   life_dlopen LIBRARY auto N      dlopen, one "c" command with N calls, exit
 *
 * Commands on stdin, one byte each:
 *   o   dlopen(LIBRARY) and print "opened"
 *   c   call plug_work(i) N times (N = 10 interactively) and print
 *       "called calls=C enabled=E sem=S ok=1": C calls so far, E of them found the
 *       semaphore up, S the semaphore's value now; ok=0 if a result was wrong
 *   q   (or end of input) exit 0
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static long (*work)(long);
static int (*semaphore)(void);
static long *enabled;
static long calls;
static int ok = 1;

static int open_plugin(const char *path)
{
    void *handle = dlopen(path, RTLD_NOW);
    if (handle == NULL) {
        dprintf(1, "dlopen failed: %s\n", dlerror());
        return -1;
    }
    work = (long (*)(long))dlsym(handle, "plug_work");
    semaphore = (int (*)(void))dlsym(handle, "plug_semaphore");
    enabled = (long *)dlsym(handle, "plug_enabled");
    if (!work || !semaphore || !enabled)
        return -1;
    dprintf(1, "opened\n");
    return 0;
}

static void call(long n)
{
    for (long i = 0; i < n; i++, calls++)
        if (work(calls) != 3 * calls + 1)
            ok = 0;
    dprintf(1, "called calls=%ld enabled=%ld sem=%d ok=%d\n", calls, *enabled, semaphore(), ok);
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    if (argc > 3 && strcmp(argv[2], "auto") == 0) {
        if (open_plugin(argv[1]))
            return 1;
        call(atol(argv[3]));
        return ok ? 0 : 1;
    }
    dprintf(1, "ready %d\n", (int)getpid());
    for (;;) {
        char c;
        if (read(0, &c, 1) != 1 || c == 'q')
            break;
        if (c == 'o' && work == NULL && open_plugin(argv[1]))
            return 1;
        if (c == 'c' && work != NULL)
            call(10);
    }
    return ok ? 0 : 1;
}

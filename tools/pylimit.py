#!/usr/bin/env python3
"""The Python limit: tools/ctracer.c's tracer loop written in Python.

    python3 tools/pylimit.py CTRACER MODE N [THREADS [WARMUP [TRACER_CPU [CHILD_CPU]]]]

Starts ``CTRACER --child MODE N THREADS WARMUP`` (the same traced child as the
C limit) and traces it making the same system calls as the C tracer, through
ptprobe's own wrappers (:mod:`ptprobe.linux`): ``waitpid``, then for ``return``
PTRACE_GETREGS and PTRACE_CONT; for ``int3`` GETREGS, rip + 1, SETREGS, CONT;
for ``seed`` GETREGS, a read of the three saved registers, SETREGS, CONT. No
probe table, no thread states, no handler: the gap to the C limit is the
interpreter's alone. (ptprobe's hot path reads and writes rip alone, with
PTRACE_PEEKUSER and PTRACE_POKEUSER, which cost the kernel less.) Prints what
ctracer prints (the child's timing line, then ``stops=S``).
"""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ptprobe import linux  # noqa: E402

SLOT_FRAME = 152                # red zone + rax, r11, rcx
SAVED = struct.Struct("<3Q")
SLOT_STOP = (linux.PTRACE_EVENT_SECCOMP << 16) | (5 << 8) | 0x7F
TRAP_STOP = (5 << 8) | 0x7F


def pin(pid: int, cpu: int) -> None:
    if cpu >= 0:
        os.sched_setaffinity(pid, {cpu})


def main(argv: list) -> int:
    if len(argv) < 3 or argv[1] not in ("return", "seed", "int3"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    ctracer, mode, n = argv[0], argv[1], argv[2]
    threads = argv[3] if len(argv) > 3 else "1"
    warmup = argv[4] if len(argv) > 4 else "0"
    tracer_cpu = int(argv[5]) if len(argv) > 5 else -1
    child_cpu = int(argv[6]) if len(argv) > 6 else -1
    pin(0, tracer_cpu)
    sys.stdout.flush()
    child = os.fork()
    if child == 0:
        try:
            pin(0, child_cpu)
            os.execv(ctracer, [ctracer, "--child", mode, n, threads, warmup])
        finally:
            os._exit(127)
    _, status = os.waitpid(child, linux.WALL)
    if not os.WIFSTOPPED(status):
        print("pylimit: the child did not stop", file=sys.stderr)
        return 1
    linux.set_options(child, linux.PTRACE_O_TRACESECCOMP | linux.PTRACE_O_TRACECLONE | linux.PTRACE_O_EXITKILL)
    linux.cont(child)
    mem = linux.Memory(child)
    stops = 0
    exit_code = 1
    wait_any, get_regs, set_regs, cont = linux.wait_any, linux.get_regs, linux.set_regs, linux.cont
    while True:
        tid, status = wait_any()
        if status == SLOT_STOP:
            regs = get_regs(tid)
            if mode == "seed":
                regs.rax, regs.r11, regs.rcx = SAVED.unpack(mem.read(regs.rsp, SAVED.size))
                regs.rsp += SLOT_FRAME
                regs.orig_rax = (1 << 64) - 1
                set_regs(tid, regs)
            stops += 1
            cont(tid)
        elif status == TRAP_STOP:
            regs = get_regs(tid)
            regs.rip += 1                        # over the nop after the int3
            set_regs(tid, regs)
            stops += 1
            cont(tid)
        elif os.WIFEXITED(status) or os.WIFSIGNALED(status):
            if tid == child:
                exit_code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
                break
        else:
            sig = os.WSTOPSIG(status)
            # clone events and the new threads' first stops carry no signal to deliver
            cont(tid, 0 if (status >> 16) or sig == 19 else sig)
    mem.close()
    print(f"stops={stops}")
    return exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

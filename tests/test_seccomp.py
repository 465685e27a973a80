"""ptprobe.seccomp: the classic BPF interpreter against the kernel, seccomp return
values, and what a stack of filters lets ptprobe do.

The interpreter is checked against the kernel itself: random programs (behind a
guard that lets every ordinary system call through) are installed in a child
process, which makes system calls with unassigned numbers and random arguments;
a program's answer shows as the errno the call fails with (ENOSYS when allowed).
"""

from __future__ import annotations

import ctypes
import errno
import json
import random
import subprocess
import sys
from typing import List, Tuple

import pytest

from ptprobe import linux, seccomp
from ptprobe.seccomp import FilterStack, Program

LD, JEQ, RET = linux.BPF_LD_W_ABS, linux.BPF_JEQ_K, linux.BPF_RET_K
BASE_NR = 0x3FF00000            # unassigned numbers from here on: ENOSYS when allowed

# The child: installs the program given as hex, then makes each (nr, args...) call and
# prints the errno (0 if it succeeded) of each, as JSON.
_CHILD = r"""
import ctypes, json, sys
program = bytes.fromhex(sys.argv[1])
cases = json.loads(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
buf = ctypes.create_string_buffer(program, len(program))
fprog = Fprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
assert libc.prctl(38, 1, 0, 0, 0) == 0
if libc.syscall(317, 1, 0, ctypes.byref(fprog)) != 0:
    print(json.dumps({"refused": ctypes.get_errno()}))
    sys.exit(0)
out = []
for nr, *args in cases:
    res = libc.syscall(ctypes.c_long(nr), *(ctypes.c_ulong(a) for a in args))
    out.append(ctypes.get_errno() if res == -1 else 0)
print(json.dumps(out))
"""


def kernel_errnos(program: bytes, cases: List[List[int]]) -> List[int]:
    res = subprocess.run([sys.executable, "-c", _CHILD, program.hex(), json.dumps(cases)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert isinstance(out, list), f"the kernel refused the program: {out}"
    return out


def expected_errno(value: int) -> int:
    """The errno of a call that a filter answers with *value* (allow -> ENOSYS)."""
    act = seccomp.action(value)
    if act == linux.SECCOMP_RET_ALLOW:
        return errno.ENOSYS
    assert act == linux.SECCOMP_RET_ERRNO, hex(value)
    return min(value & linux.SECCOMP_RET_DATA, 4095)


def random_program(rng: random.Random) -> Program:
    """A valid program: a guard that allows every number below BASE_NR, then random
    loads, ALU operations, stores and forward jumps, every way out an ERRNO or ALLOW
    (never a kill: the child would die)."""
    guard = [(LD, 0, 0, linux.SECCOMP_DATA_NR), (0x35, 1, 0, BASE_NR), (RET, 0, 0, linux.SECCOMP_RET_ALLOW)]
    # every scratch word written first: the kernel refuses a load that some path reaches unwritten
    body: List[Tuple[int, int, int, int]] = [(0x02, 0, 0, m) for m in range(16)]
    ends = [(RET, 0, 0, linux.SECCOMP_RET_ERRNO | rng.randrange(1, 4096)), (RET, 0, 0, linux.SECCOMP_RET_ALLOW),
            (0x54, 0, 0, 0xFFF), (0x44, 0, 0, linux.SECCOMP_RET_ERRNO), (0x16, 0, 0, 0)]   # A & 0xfff | ERRNO; ret A
    n = rng.randrange(4, 40)
    first = len(body)
    end_at = first + n                      # where the ends start
    exits = [end_at, end_at + 1, end_at + 2]     # a jump lands on an end only at its start

    def target(at: int) -> int:
        """A jump offset from instruction *at*: a later body instruction or an exit."""
        choices = list(range(at + 1, end_at)) + exits
        return rng.choice(choices) - at - 1

    for at in range(first, end_at):
        pick = rng.random()
        if pick < 0.25:
            body.append((LD, 0, 0, rng.choice([0, 4] + [16 + 4 * j for j in range(12)])))
        elif pick < 0.45:
            op = rng.choice([0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0xA0])   # (no mod in seccomp)
            if op == 0x30:
                body.append((0x04 | op, 0, 0, rng.randrange(1, 1 << 32)))   # div by K, never 0 (X could be)
            elif rng.random() < 0.5 and op != 0x80:
                body.append((0x04 | op | 0x08, 0, 0, 0))          # by X
            else:
                body.append((0x04 | op, 0, 0, rng.randrange(32) if op in (0x60, 0x70) else rng.randrange(1 << 32)))
        elif pick < 0.55:
            body.append((rng.choice([0x00, 0x01]), 0, 0, rng.randrange(1 << 32)))   # ld/ldx imm
        elif pick < 0.62:
            body.append((rng.choice([0x02, 0x03]), 0, 0, rng.randrange(16)))        # st/stx
        elif pick < 0.67:
            body.append((rng.choice([0x60, 0x61]), 0, 0, rng.randrange(16)))        # ld/ldx mem
        elif pick < 0.72:
            body.append((rng.choice([0x07, 0x87]), 0, 0, 0))                        # tax/txa
        elif pick < 0.90:
            cond = rng.choice([0x10, 0x20, 0x30, 0x40]) | rng.choice([0x00, 0x08])
            k = rng.choice([0, 1, 2, rng.randrange(1 << 32)])
            jt, jf = target(at), target(at)
            if max(jt, jf) > 255:
                jt, jf = 0, 0
            body.append((0x05 | cond, jt, jf, k))
        else:
            body.append((0x05, 0, 0, target(at)))                                    # ja
    return Program(tuple(guard + body + ends))


def random_cases(rng: random.Random, count: int) -> List[List[int]]:
    interesting = [0, 1, 2, 0xFFFFFFFF, 0x100000000, 1 << 63, (1 << 64) - 1]
    cases = []
    for _ in range(count):
        nr = BASE_NR + rng.randrange(16)
        args = [rng.choice(interesting) if rng.random() < 0.3 else rng.randrange(1 << 64) for _ in range(6)]
        cases.append([nr] + args)
    return cases


@pytest.mark.parametrize("seed", range(6))
def test_interpreter_agrees_with_the_kernel(seed):
    rng = random.Random(seed)
    for _ in range(20):
        program = random_program(rng)
        cases = random_cases(rng, 16)
        kernel = kernel_errnos(program.to_bytes(), cases)
        ours = []
        for nr, *args in cases:
            outcome = program.run(seccomp.seccomp_data(nr, args))
            ours.append(expected_errno(outcome.value))
        assert ours == kernel, program


def test_precedence_and_unknown_actions():
    kill, trap, err, trace, allow = (linux.SECCOMP_RET_KILL_PROCESS, linux.SECCOMP_RET_TRAP,
                                     linux.SECCOMP_RET_ERRNO | 1, linux.SECCOMP_RET_TRACE, linux.SECCOMP_RET_ALLOW)
    order = [kill, linux.SECCOMP_RET_KILL_THREAD, trap, err, linux.SECCOMP_RET_USER_NOTIF, trace,
             linux.SECCOMP_RET_LOG, allow]
    for stronger, weaker in zip(order, order[1:]):
        assert seccomp.outranks(stronger, weaker) and not seccomp.outranks(weaker, stronger)
    assert seccomp.action(0x00010000) == kill          # an unknown action kills the process
    assert seccomp.describe(err) == "with an error"


def ret(value: int) -> Program:
    return Program(((RET, 0, 0, value),))


def test_stack_refusals():
    data_nr = linux.SYS_memfd_create
    assert FilterStack().refusal(data_nr) is None
    strict = FilterStack()
    strict.strict()
    assert "strict mode" in strict.refusal(data_nr)
    assert strict.refusal(1) is None                   # write
    unknown = FilterStack()
    unknown.add(None, "cannot read it")
    assert unknown.refusal(data_nr) == "cannot read it"
    stack = FilterStack()
    stack.add(ret(linux.SECCOMP_RET_ERRNO | errno.EPERM))
    assert stack.refusal(data_nr) is None              # an error: harmless to try
    stack.add(ret(linux.SECCOMP_RET_TRAP))
    assert stack.refusal(data_nr) == "its seccomp filter would answer it with SIGSYS"


def test_slot_verdict():
    ours = Program.from_bytes(linux.seccomp_trace_filter(0x3FF07E57, watch=True))
    stack = FilterStack()
    stack.add(ours)
    assert stack.slot_verdict(0x3FF07E57) == (True, "")
    stack.add(ret(linux.SECCOMP_RET_LOG))
    assert stack.slot_verdict(0x3FF07E57) == (True, "")
    looks = Program(((LD, 0, 0, linux.SECCOMP_DATA_ARGS), (RET, 0, 0, linux.SECCOMP_RET_ALLOW)))
    stack.add(looks)
    assert stack.slot_verdict(0x3FF07E57)[0] is False          # depends on the registers
    killing = FilterStack(programs=[ours])
    killing.mode = seccomp.MODE_FILTER
    killing.add(ret(linux.SECCOMP_RET_KILL_PROCESS))
    assert killing.slot_verdict(0x3FF07E57) == (
        False, "its seccomp filter would answer the slots' system call by killing the process")


@pytest.mark.parametrize("arch, nr, arg0, traced", [
    (linux.AUDIT_ARCH_X86_64, 0x3FF07E57, 0, True),
    (linux.AUDIT_ARCH_X86_64, linux.SYS_seccomp, linux.SECCOMP_SET_MODE_FILTER, True),
    (linux.AUDIT_ARCH_X86_64, linux.SYS_seccomp, linux.SECCOMP_SET_MODE_STRICT, True),
    (linux.AUDIT_ARCH_X86_64, linux.SYS_seccomp, 2, False),                    # GET_ACTION_AVAIL
    (linux.AUDIT_ARCH_X86_64, linux.SYS_seccomp | 0x40000000, 1, True),       # x32
    (linux.AUDIT_ARCH_X86_64, linux.SYS_prctl, linux.PR_SET_SECCOMP, True),
    (linux.AUDIT_ARCH_X86_64, linux.SYS_prctl, (1 << 32) | linux.PR_SET_SECCOMP, True),   # low 32 bits
    (linux.AUDIT_ARCH_X86_64, linux.SYS_prctl, linux.PR_SET_NO_NEW_PRIVS, False),
    (linux.AUDIT_ARCH_X86_64, 1, 0, False),
    (linux.AUDIT_ARCH_I386, 354, 1, True),
    (linux.AUDIT_ARCH_I386, 172, linux.PR_SET_SECCOMP, True),
    (linux.AUDIT_ARCH_I386, 0x3FF07E57, 0, False),
    (linux.AUDIT_ARCH_I386, linux.SYS_seccomp, 1, False),                     # 317 is not seccomp there
])
def test_the_watch_filter(arch, nr, arg0, traced):
    """ptprobe's filter in run mode: a trace stop for the slots' syscall and for every
    way of installing a filter or strict mode, nothing else."""
    program = Program.from_bytes(linux.seccomp_trace_filter(0x3FF07E57, watch=True))
    value = program.run(seccomp.seccomp_data(nr, [arg0], arch=arch)).value
    assert value == (linux.SECCOMP_RET_TRACE if traced else linux.SECCOMP_RET_ALLOW)
    plain = Program.from_bytes(linux.seccomp_trace_filter(0x3FF07E57))
    expected = traced and nr == 0x3FF07E57
    assert (plain.run(seccomp.seccomp_data(nr, [arg0], arch=arch)).value == linux.SECCOMP_RET_TRACE) == expected


def test_both_filters_load_in_the_kernel():
    for watch in (False, True):
        assert kernel_errnos(linux.seccomp_trace_filter(0x3FF07E57, watch=watch), [[BASE_NR]]) == [errno.ENOSYS]


def test_bad_programs_are_filter_errors():
    with pytest.raises(seccomp.FilterError):
        Program.from_bytes(b"\0" * 7)
    with pytest.raises(seccomp.FilterError):
        Program(((LD, 0, 0, 2), (RET, 0, 0, 0))).run(seccomp.seccomp_data(0))     # unaligned load
    with pytest.raises(seccomp.FilterError):
        Program(((0x05, 0, 0, 5),)).run(seccomp.seccomp_data(0))                  # jumps off the end
    assert ctypes.sizeof(linux.SockFilter) == 8

"""Seccomp filters of a traced process, and what they would do to ptprobe's own system calls.

A process may carry seccomp filters of its own: a container's, a systemd unit's
(``SystemCallFilter=`` kills unknown numbers), a sandbox's. Every system call ptprobe
makes inside the process (mapping a page, installing its filter, the slots' syscall)
meets them too, and a filter may kill the process for it. So before making one,
ptprobe asks this module what the process's filters would answer, with the exact
number, architecture, instruction pointer and arguments, and makes it only if
the answer is harmless: allowed, logged, failed with an error, or sent to ptprobe
itself as tracer. See ``docs/design.md``, "Foreign seccomp filters".

* :class:`Program` -- one classic BPF program, with a small interpreter of the
  instructions seccomp accepts (:meth:`Program.run`).
* :func:`action`, :func:`outranks`, :func:`describe` -- seccomp return values.
* :class:`FilterStack` -- what is known of one process's filters: none, strict
  mode, a list of programs (the newest first), or something unknown (a filter
  ptprobe may not read); :meth:`FilterStack.refusal` says why a system call must
  not be made, :meth:`FilterStack.slot_verdict` what becomes of a slot's syscall.

Pure: the programs are read from the kernel elsewhere (:mod:`ptprobe.linux`,
:mod:`ptprobe.procfs`, :class:`ptprobe.tracee.AddressSpace`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional, Sequence, Tuple

from . import linux

# classic BPF opcode fields (linux/bpf_common.h)
_CLASS = 0x07
_LD, _LDX, _ST, _STX, _ALU, _JMP, _RET, _MISC = range(8)
_SIZE_MODE = 0xF8
_W_ABS, _W_LEN, _IMM, _MEM = 0x20, 0x80, 0x00, 0x60
_OP = 0xF0
_SRC_X = 0x08
_RVAL = 0x18
_RET_A = 0x10
_MISC_TXA = 0x80
_U32 = 0xFFFFFFFF
_DATA_SIZE = linux.SECCOMP_DATA.size

#: The actions whose system call ptprobe may make: it runs, or fails with an error
#: code, or stops for the tracer (ptprobe itself).
HARMLESS = frozenset({linux.SECCOMP_RET_ALLOW, linux.SECCOMP_RET_LOG, linux.SECCOMP_RET_ERRNO,
                      linux.SECCOMP_RET_TRACE})
_KNOWN_ACTIONS = {
    linux.SECCOMP_RET_KILL_PROCESS: "by killing the process",
    linux.SECCOMP_RET_KILL_THREAD: "by killing the thread",
    linux.SECCOMP_RET_TRAP: "with SIGSYS",
    linux.SECCOMP_RET_ERRNO: "with an error",
    linux.SECCOMP_RET_USER_NOTIF: "by handing it to a supervisor",
    linux.SECCOMP_RET_TRACE: "with a stop for the tracer",
    linux.SECCOMP_RET_LOG: "by logging and allowing it",
    linux.SECCOMP_RET_ALLOW: "by allowing it",
}


class FilterError(ValueError):
    """A program this interpreter cannot run (the kernel would have refused it, or it
    uses something seccomp does not allow)."""


def action(value: int) -> int:
    """The action of a seccomp return *value* (an unknown action counts as
    killing the process, as the kernel treats it)."""
    act = value & linux.SECCOMP_RET_ACTION_FULL
    return act if act in _KNOWN_ACTIONS else linux.SECCOMP_RET_KILL_PROCESS


def _rank(act: int) -> int:
    """The kernel's order of precedence: the lower (as a signed 32-bit value), the stronger."""
    return act - (1 << 32) if act & 0x80000000 else act


def outranks(a: int, b: int) -> bool:
    """True if action *a* takes precedence over action *b*."""
    return _rank(action(a)) < _rank(action(b))


def describe(value: int) -> str:
    """How a filter returning *value* answers a system call, in words ("by killing
    the process")."""
    return _KNOWN_ACTIONS[action(value)]


def seccomp_data(nr: int, args: Sequence[int] = (), ip: int = 0,
                 arch: int = linux.AUDIT_ARCH_X86_64) -> bytes:
    """The ``struct seccomp_data`` a filter sees for a system call."""
    full = [a & linux.U64 for a in args][:6]
    full += [0] * (6 - len(full))
    nr &= 0xFFFFFFFF
    return linux.SECCOMP_DATA.pack(nr - (1 << 32) if nr & 0x80000000 else nr, arch, ip & linux.U64, *full)


class Outcome(NamedTuple):
    """What one program returned, and whether it looked at the instruction pointer
    or the arguments on the way (its answer then depends on them)."""

    value: int
    read_args: bool


@dataclass(frozen=True)
class Program:
    """One classic BPF program: a tuple of (code, jt, jf, k)."""

    insns: Tuple[Tuple[int, int, int, int], ...]

    @classmethod
    def from_bytes(cls, data: bytes) -> "Program":
        """Parse ``sock_filter`` bytes (as the kernel or a ``sock_fprog`` holds them)."""
        size = linux.ctypes.sizeof(linux.SockFilter)
        if not data or len(data) % size or len(data) // size > linux.BPF_MAXINSNS:
            raise FilterError(f"a seccomp program of {len(data)} bytes")
        array = (linux.SockFilter * (len(data) // size)).from_buffer_copy(data)
        return cls(tuple((i.code, i.jt, i.jf, i.k) for i in array))

    def to_bytes(self) -> bytes:
        return bytes((linux.SockFilter * len(self.insns))(*(linux.SockFilter(*i) for i in self.insns)))

    def run(self, data: bytes) -> Outcome:
        """Run the program on *data* (a ``struct seccomp_data``). FilterError for an
        instruction seccomp does not accept or a jump out of the program."""
        if len(data) != _DATA_SIZE:
            raise FilterError("seccomp_data must be 64 bytes")
        a = x = 0
        mem = [0] * 16
        read_args = False
        pc = 0
        insns = self.insns
        while True:
            if pc >= len(insns):
                raise FilterError(f"the program runs off its end at {pc}")
            code, jt, jf, k = insns[pc]
            pc += 1
            cls = code & _CLASS
            if cls == _RET:
                rval = code & _RVAL
                if rval == 0:
                    return Outcome(k & _U32, read_args)
                if rval == _RET_A:
                    return Outcome(a, read_args)
                raise FilterError(f"return opcode {code:#x}")
            if cls in (_LD, _LDX):
                mode = code & _SIZE_MODE
                if mode == _W_ABS and cls == _LD:
                    if k % 4 or k + 4 > _DATA_SIZE:
                        raise FilterError(f"load at offset {k}")
                    if k >= linux.SECCOMP_DATA_IP:
                        read_args = True
                    value = int.from_bytes(data[k:k + 4], "little")
                elif mode == _W_LEN:
                    value = _DATA_SIZE
                elif mode == _IMM:
                    value = k & _U32
                elif mode == _MEM and k < 16:
                    value = mem[k]
                else:
                    raise FilterError(f"load opcode {code:#x}")
                if cls == _LD:
                    a = value
                else:
                    x = value
            elif cls in (_ST, _STX):
                if k >= 16:
                    raise FilterError(f"store to M[{k}]")
                mem[k] = a if cls == _ST else x
            elif cls == _ALU:
                operand = x if code & _SRC_X else k & _U32
                op = code & _OP
                if op == 0x00:
                    a = a + operand
                elif op == 0x10:
                    a = a - operand
                elif op == 0x20:
                    a = a * operand
                elif op == 0x30:                      # div: by zero ends the filter with 0
                    if operand == 0:
                        return Outcome(0, read_args)
                    a = a // operand
                elif op == 0x40:
                    a = a | operand
                elif op == 0x50:
                    a = a & operand
                elif op == 0x60:
                    a = a << (operand & 31)
                elif op == 0x70:
                    a = a >> (operand & 31)
                elif op == 0x80:
                    a = -a
                elif op == 0xA0:
                    a = a ^ operand
                else:
                    raise FilterError(f"ALU opcode {code:#x}")
                a &= _U32
            elif cls == _JMP:
                op = code & _OP
                if op == 0x00:
                    pc += k
                    continue
                operand = x if code & _SRC_X else k & _U32
                if op == 0x10:
                    taken = a == operand
                elif op == 0x20:
                    taken = a > operand
                elif op == 0x30:
                    taken = a >= operand
                elif op == 0x40:
                    taken = bool(a & operand)
                else:
                    raise FilterError(f"jump opcode {code:#x}")
                pc += jt if taken else jf
            else:  # _MISC
                if code & _MISC_TXA:
                    a = x
                else:
                    x = a


def evaluate(programs: Sequence[Program], data: bytes) -> Outcome:
    """What a stack of filters (the newest first) returns for *data*: the strongest
    action any of them returns (among equals, the newest's value)."""
    best: Optional[int] = None
    read_args = False
    for program in programs:
        outcome = program.run(data)
        read_args = read_args or outcome.read_args
        if best is None or outranks(outcome.value, best):
            best = outcome.value
    return Outcome(linux.SECCOMP_RET_ALLOW if best is None else best, read_args)


#: mode values of the ``Seccomp:`` line of /proc/PID/status
MODE_NONE, MODE_STRICT, MODE_FILTER = 0, 1, 2
#: the system calls strict mode lets through (everything else kills the thread)
_STRICT_ALLOWED = frozenset({0, 1, 60, 15})         # read, write, exit, rt_sigreturn


@dataclass
class FilterStack:
    """What ptprobe knows of the seccomp filters of one process's threads.

    ``mode`` is the strongest mode of its threads; ``programs`` the filters of every
    thread (the newest first, each once), or None when some cannot be read; ``why``
    says why not. ``counts`` is what /proc said for each thread when it was read
    (to notice that the process installed another filter since)."""

    mode: int = MODE_NONE
    programs: Optional[List[Program]] = field(default_factory=list)
    why: str = ""
    counts: Tuple[Tuple[int, int], ...] = ()

    def copy(self) -> "FilterStack":
        return FilterStack(self.mode, None if self.programs is None else list(self.programs), self.why,
                           self.counts)

    @property
    def known(self) -> bool:
        return self.mode == MODE_NONE or (self.mode == MODE_FILTER and self.programs is not None)

    def add(self, program: Optional[Program], why: str = "") -> None:
        """The process installs another filter (None: one that cannot be read)."""
        self.mode = max(self.mode, MODE_FILTER)
        if program is None or self.programs is None:
            self.programs = None
            self.why = self.why or why
        elif program not in self.programs:
            self.programs.insert(0, program)

    def strict(self) -> None:
        """The process enters strict mode."""
        self.mode = MODE_STRICT

    def verdict(self, nr: int, args: Sequence[int] = (), ip: int = 0) -> Optional[Outcome]:
        """What the process's filters return for x86-64 system call *nr*; None when
        that is not known."""
        if self.mode == MODE_NONE:
            return Outcome(linux.SECCOMP_RET_ALLOW, False)
        if self.mode == MODE_STRICT:
            allowed = nr in _STRICT_ALLOWED
            return Outcome(linux.SECCOMP_RET_ALLOW if allowed else linux.SECCOMP_RET_KILL_THREAD, False)
        if self.programs is None:
            return None
        try:
            return evaluate(self.programs, seccomp_data(nr, args, ip))
        except FilterError:
            return None

    def refusal(self, nr: int, args: Sequence[int] = (), ip: int = 0) -> Optional[str]:
        """Why ptprobe must not make system call *nr* with *args* from *ip* in this
        process (None: it may; it runs, fails with an error, or stops for ptprobe)."""
        outcome = self.verdict(nr, args, ip)
        if outcome is None:
            return self._unknown()
        if action(outcome.value) in HARMLESS:
            return None
        if self.mode == MODE_STRICT:
            return self._unknown()
        return f"its seccomp filter would answer it {describe(outcome.value)}"

    def slot_verdict(self, nr: int, ip: int = 0) -> Tuple[bool, str]:
        """(does the slots' system call *nr* stop for ptprobe, why not): it must come
        out as SECCOMP_RET_TRACE whatever the registers at a site hold."""
        outcome = self.verdict(nr, (), ip)
        if outcome is None:
            return False, self._unknown()
        if outcome.read_args:
            return False, "its seccomp filter looks at the registers when it judges the slots' system call"
        if action(outcome.value) != linux.SECCOMP_RET_TRACE:
            return False, f"its seccomp filter would answer the slots' system call {describe(outcome.value)}"
        return True, ""

    def _unknown(self) -> str:
        if self.mode == MODE_STRICT:
            return "it runs in seccomp strict mode (anything but read, write, exit and sigreturn kills it)"
        return self.why or "it has a seccomp filter ptprobe cannot read"

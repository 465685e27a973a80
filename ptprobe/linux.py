"""The one module over ptrace, waitpid, raw system calls and ctypes.

Everything ptprobe asks of the kernel goes through here: ptrace requests (the
raw call comes from python-ptrace; the requests, options and events it lacks
are declared here), the register structures, a few raw syscalls (tgkill,
kcmp), process memory through ``/proc/PID/mem``, and the kernel ABI layouts
ptprobe writes into a tracee (``sock_fprog`` and the BPF program of the
seccomp filter, glibc's ``r_debug``). Every ctypes declaration of the project
is here. Kernel errors are translated into :mod:`ptprobe.errors` exceptions
where they enter. The text files of ``/proc`` are parsed in
:mod:`ptprobe.procfs`.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import functools
import os
import struct
from typing import Optional

from ptrace.binding import func as _pt
from ptrace.binding.linux_struct import siginfo as _siginfo
from ptrace.binding.linux_struct import user_fpregs_struct as _fpregs
from ptrace.binding.linux_struct import user_regs_struct as _regs

from .errors import FaultError, NoSuchProcessError, TracePermissionError, TracerError

# --- ptrace requests ---------------------------------------------------------
PTRACE_CONT = 7
PTRACE_KILL = 8
PTRACE_SINGLESTEP = 9
PTRACE_SYSCALL = 24
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_GETFPREGS = 14
PTRACE_SETFPREGS = 15
PTRACE_DETACH = 17
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETEVENTMSG = 0x4201
PTRACE_GETSIGINFO = 0x4202
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_SECCOMP_GET_FILTER = 0x420C

# --- ptrace options ----------------------------------------------------------
PTRACE_O_TRACESYSGOOD = 0x1
PTRACE_O_TRACEFORK = 0x2
PTRACE_O_TRACEVFORK = 0x4
PTRACE_O_TRACECLONE = 0x8
PTRACE_O_TRACEEXEC = 0x10
PTRACE_O_TRACEVFORKDONE = 0x20
PTRACE_O_TRACEEXIT = 0x40
PTRACE_O_TRACESECCOMP = 0x80
PTRACE_O_EXITKILL = 0x100000

# --- ptrace events (status >> 16) --------------------------------------------
PTRACE_EVENT_FORK = 1
PTRACE_EVENT_VFORK = 2
PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_EXEC = 4
PTRACE_EVENT_VFORK_DONE = 5
PTRACE_EVENT_EXIT = 6
PTRACE_EVENT_SECCOMP = 7
PTRACE_EVENT_STOP = 128

# --- wait flags ----------------------------------------------------------------
WALL = 0x40000000
WNOTHREAD = 0x20000000

# --- misc kernel numbers -----------------------------------------------------
SI_KERNEL = 0x80
TRAP_TRACE = 2
SYS_mmap = 9
SYS_munmap = 11
SYS_close = 3
SYS_prctl = 157
SYS_ftruncate = 77
SYS_seccomp = 317
SYS_memfd_create = 319
SYS_restart_syscall = 219
SYS_tgkill = 234
SYS_kcmp = 312
SYS_getpid = 39
KCMP_VM = 1
#: names of the system calls ptprobe makes inside a tracee (for messages)
SYSCALL_NAMES = {SYS_mmap: "mmap", SYS_munmap: "munmap", SYS_close: "close", SYS_prctl: "prctl",
                 SYS_ftruncate: "ftruncate", SYS_seccomp: "seccomp", SYS_memfd_create: "memfd_create"}
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_SET_MODE_STRICT = 0
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
#: system calls that install seccomp filters, in the other ABIs a 64-bit process can use
X32_SYSCALL_BIT = 0x40000000
SYS_I386_prctl = 172
SYS_I386_seccomp = 354
PROT_READ = 1
PROT_WRITE = 2
PROT_EXEC = 4
MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_FIXED_NOREPLACE = 0x100000
MFD_CLOEXEC = 1
ERESTARTSYS = 512
ERESTARTNOINTR = 513
ERESTARTNOHAND = 514
ERESTART_RESTARTBLOCK = 516

Registers = _regs
FpRegisters = _fpregs
SigInfo = _siginfo

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _translate(exc: OSError, tid: int, what: str) -> Exception:
    if exc.errno == _errno.ESRCH:
        return NoSuchProcessError(f"{what}: no such process or thread {tid}", tid)
    if exc.errno == _errno.EPERM or exc.errno == _errno.EACCES:
        return TracePermissionError(f"{what}: operation not permitted on {tid}", tid)
    return TracerError(f"{what} on {tid} failed: {os.strerror(exc.errno or 0)}")


def _ptrace(request: int, tid: int, addr: int = 0, data: int = 0, what: str = "ptrace") -> int:
    try:
        return _pt.ptrace(request, tid, addr, data)
    except _pt.PtraceError as exc:
        raise _translate(OSError(exc.errno, str(exc)), tid, what) from None


# The hot path (reading and writing registers, resuming) is a few ptrace calls
# per hit, made through a prototype of its own. python-ptrace's declares
# argtypes, and ctypes' conversion of them costs about 0.4 us per call on
# CPython 3.11 (a failing PTRACE_CONT: 0.80 us through it, 0.39 us here), a
# tenth of a whole hit. Without argtypes ctypes passes a Python int as a C int,
# which libffi sign-extends into the 64-bit register that glibc's variadic
# ptrace() reads: exact for the tids, user-area offsets and signal numbers
# passed here (a plain int of 2**31 or more would be silently truncated: any
# address or 64-bit value must go as c_ulong). Buffers go by byref(). For these
# requests -1 always means an error, so errno needs no clearing first.
_hot = ctypes.CDLL(None, use_errno=True).ptrace
_hot.restype = ctypes.c_long
PTRACE_PEEKUSER = 3
PTRACE_POKEUSER = 6
_RIP_OFFSET = _regs.rip.offset        # the user area starts with user_regs_struct


def _fail(tid: int, what: str) -> Exception:
    err = ctypes.get_errno()
    return _translate(OSError(err, os.strerror(err)), tid, what)


def seize(tid: int, options: int) -> None:
    """PTRACE_SEIZE *tid* with *options* (the thread keeps running)."""
    _ptrace(PTRACE_SEIZE, tid, 0, options, "attach")


def interrupt(tid: int) -> None:
    _ptrace(PTRACE_INTERRUPT, tid, 0, 0, "interrupt")


def listen(tid: int) -> None:
    _ptrace(PTRACE_LISTEN, tid, 0, 0, "listen")


def cont(tid: int, sig: int = 0) -> None:
    if _hot(PTRACE_CONT, tid, 0, sig) == -1:
        raise _fail(tid, "continue")


def singlestep(tid: int, sig: int = 0) -> None:
    _ptrace(PTRACE_SINGLESTEP, tid, 0, sig, "single-step")


def syscall_resume(tid: int, sig: int = 0) -> None:
    """PTRACE_SYSCALL: run to the next system call entry or exit."""
    _ptrace(PTRACE_SYSCALL, tid, 0, sig, "resume to a syscall stop")


def detach(tid: int, sig: int = 0) -> None:
    _ptrace(PTRACE_DETACH, tid, 0, sig, "detach")


def set_options(tid: int, options: int) -> None:
    _ptrace(PTRACE_SETOPTIONS, tid, 0, options, "set options")


def get_regs(tid: int) -> Registers:
    regs = Registers()
    if _hot(PTRACE_GETREGS, tid, 0, ctypes.byref(regs)) == -1:
        raise _fail(tid, "read registers")
    return regs


def set_regs(tid: int, regs: Registers) -> None:
    if _hot(PTRACE_SETREGS, tid, 0, ctypes.byref(regs)) == -1:
        raise _fail(tid, "write registers")


def get_rip(tid: int) -> int:
    """The instruction pointer alone (one PTRACE_PEEKUSER; no user address is -1)."""
    rip = _hot(PTRACE_PEEKUSER, tid, _RIP_OFFSET, 0)
    if rip == -1:
        raise _fail(tid, "read registers")
    return rip


def set_rip(tid: int, rip: int) -> None:
    """Set the instruction pointer alone (one PTRACE_POKEUSER)."""
    if _hot(PTRACE_POKEUSER, tid, _RIP_OFFSET, ctypes.c_ulong(rip)) == -1:
        raise _fail(tid, "write registers")


_RSP_OFFSET = _regs.rsp.offset


def get_rsp(tid: int) -> int:
    """The stack pointer alone (one PTRACE_PEEKUSER; a user rsp is never -1)."""
    rsp = _hot(PTRACE_PEEKUSER, tid, _RSP_OFFSET, 0)
    if rsp == -1:
        raise _fail(tid, "read registers")
    return rsp & U64


#: Offset of each register in the user area (it starts with user_regs_struct).
REGISTER_OFFSETS = {name: getattr(_regs, name).offset for name, _ in _regs._fields_}


def peek_register(tid: int, name: str) -> Optional[int]:
    """Register *name* alone (one PTRACE_PEEKUSER), unsigned; None when the
    answer is -1, which is also how the call fails: the caller reads the whole
    set instead, which tells a value of -1 from an error."""
    value = _hot(PTRACE_PEEKUSER, tid, REGISTER_OFFSETS[name], 0)
    return None if value == -1 else value & U64


def poke_register(tid: int, name: str, value: int) -> None:
    """Set register *name* alone (one PTRACE_POKEUSER; the kernel checks it as
    PTRACE_SETREGS does)."""
    if _hot(PTRACE_POKEUSER, tid, REGISTER_OFFSETS[name], ctypes.c_ulong(value & U64)) == -1:
        raise _fail(tid, "write registers")


def get_fpregs(tid: int) -> FpRegisters:
    regs = FpRegisters()
    _ptrace(PTRACE_GETFPREGS, tid, 0, ctypes.addressof(regs), "read fp registers")
    return regs


def set_fpregs(tid: int, regs: FpRegisters) -> None:
    _ptrace(PTRACE_SETFPREGS, tid, 0, ctypes.addressof(regs), "write fp registers")


def get_seccomp_filter(tid: int, index: int) -> bytes:
    """The classic BPF program of seccomp filter *index* of thread *tid* (0: the
    newest), as ``sock_filter`` bytes (PTRACE_SECCOMP_GET_FILTER; needs CAP_SYS_ADMIN
    and a tracer outside seccomp: TracePermissionError otherwise). TracerError when
    there is no such filter or it cannot be dumped."""
    count = _ptrace(PTRACE_SECCOMP_GET_FILTER, tid, index, 0, "read seccomp filter")
    if not 0 < count <= BPF_MAXINSNS:
        raise TracerError(f"read seccomp filter {index} of {tid}: {count} instructions")
    program = (SockFilter * count)()
    got = _ptrace(PTRACE_SECCOMP_GET_FILTER, tid, index, ctypes.addressof(program), "read seccomp filter")
    if got != count:
        raise TracerError(f"read seccomp filter {index} of {tid}: changed while read")
    return bytes(program)


def get_event_msg(tid: int) -> int:
    """PTRACE_GETEVENTMSG with the 8-byte buffer the kernel writes."""
    value = ctypes.c_ulong()
    _ptrace(PTRACE_GETEVENTMSG, tid, 0, ctypes.addressof(value), "read event message")
    return value.value


def get_siginfo(tid: int) -> SigInfo:
    info = SigInfo()
    _ptrace(PTRACE_GETSIGINFO, tid, 0, ctypes.addressof(info), "read signal info")
    return info


_SIGINFO_INTS = ctypes.c_int * 32          # a siginfo_t (128 bytes); si_code is the third int


def is_int3_trap(tid: int) -> bool:
    """True if the SIGTRAP *tid* is stopped with came from an int3 instruction
    (``si_code == SI_KERNEL``), not from a program's kill, tgkill or single step."""
    info = _SIGINFO_INTS()
    if _hot(PTRACE_GETSIGINFO, tid, 0, ctypes.byref(info)) == -1:
        raise _fail(tid, "read signal info")
    return info[2] == SI_KERNEL


def stop_event(tid: int) -> int:
    """The PTRACE_EVENT_* of the stop *tid* is in (0: another stop, or none known)."""
    try:
        info = get_siginfo(tid)
    except TracerError:
        return 0            # a group-stop has no siginfo (EINVAL)
    return info.si_code >> 8 if info.si_signo == 5 and info.si_code & 0xFF == 5 else 0


def copy_regs(regs: Registers) -> Registers:
    new = Registers()
    ctypes.memmove(ctypes.addressof(new), ctypes.addressof(regs), ctypes.sizeof(Registers))
    return new


def xmm_bytes(fpregs: FpRegisters, index: int) -> bytes:
    """The 16 bytes of xmm*index* from a user_fpregs_struct."""
    offset = FpRegisters.xmm_space.offset + 16 * index
    return ctypes.string_at(ctypes.addressof(fpregs) + offset, 16)


def tgkill(tgid: int, tid: int, sig: int) -> None:
    if _syscall(SYS_tgkill, tgid, tid, sig) < 0:
        err = ctypes.get_errno()
        raise _translate(OSError(err, os.strerror(err)), tid, "tgkill")


def share_memory(pid1: int, pid2: int) -> bool:
    """True when the two processes share one address space (kcmp KCMP_VM)."""
    res = _syscall(SYS_kcmp, pid1, pid2, KCMP_VM, 0, 0)
    if res < 0:
        err = ctypes.get_errno()
        raise _translate(OSError(err, os.strerror(err)), pid2, "kcmp")
    return res == 0


# --- wait ----------------------------------------------------------------------
#: wait_any() -> (tid, status): waitpid(-1, __WALL | __WNOTHREAD), the tracees
#: of this OS thread and its children. A partial, not a function: once per hit.
wait_any = functools.partial(os.waitpid, -1, WALL | WNOTHREAD)


def wait_tid(tid: int) -> int:
    return os.waitpid(tid, WALL)[1]


def wait_any_nohang() -> "tuple[int, int]":
    """Like wait_any, but (0, 0) when nothing is pending."""
    return os.waitpid(-1, WALL | WNOTHREAD | os.WNOHANG)


def wait_tid_nohang(tid: int) -> "tuple[int, int]":
    try:
        return os.waitpid(tid, WALL | os.WNOHANG)
    except ChildProcessError:
        return 0, 0


def lost_stop_status(tid: int) -> "int | None":
    """The wait status of the ptrace-stop *tid* is in, rebuilt from its signal
    information (for a stop whose status another waitpid collected); None if
    *tid* is in no such stop."""
    info = _SIGINFO_INTS()
    if _hot(PTRACE_GETSIGINFO, tid, 0, ctypes.byref(info)) == -1:
        if ctypes.get_errno() == _errno.EINVAL:      # a group-stop has no siginfo
            return (PTRACE_EVENT_STOP << 16) | (19 << 8) | 0x7F     # SIGSTOP
        return None
    signo, code = info[0], info[2]
    if signo == 5 and code & 0xFF == 5 and code >> 8:           # SIGTRAP | event << 8
        return ((code >> 8) << 16) | (5 << 8) | 0x7F
    return (signo << 8) | 0x7F


# --- /proc ---------------------------------------------------------------------
class Memory:
    """Reads and writes another process's memory through ``/proc/PID/mem``.

    Writes are ptrace-forced: they reach read-only and executable pages too.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self._fd = os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NoSuchProcessError(f"no such process: {pid}", pid) from None
        except PermissionError:
            raise TracePermissionError(f"cannot open the memory of process {pid}: permission denied", pid) from None
        except OSError as exc:
            raise NoSuchProcessError(f"cannot open the memory of process {pid}: {exc.strerror}", pid) from None

    def read(self, address: int, size: int) -> bytes:
        try:
            data = os.pread(self._fd, size, address)
        except OSError as exc:
            raise FaultError(f"cannot read {size} bytes at {address:#x} in process {self.pid}: "
                             f"{os.strerror(exc.errno or 0)}", address) from None
        if len(data) != size:
            raise FaultError(f"cannot read {size} bytes at {address:#x} in process {self.pid}", address)
        return data

    def write(self, address: int, data: bytes) -> None:
        try:
            done = os.pwrite(self._fd, data, address)
        except OSError as exc:
            raise FaultError(f"cannot write {len(data)} bytes at {address:#x} in process {self.pid}: "
                             f"{os.strerror(exc.errno or 0)}", address) from None
        if done != len(data):
            raise FaultError(f"short write at {address:#x} in process {self.pid}", address)

    def read_u64(self, address: int) -> int:
        return int.from_bytes(self.read(address, 8), "little")

    def read_cstring(self, address: int, limit: int = 4096) -> bytes:
        out = b""
        chunk = 64
        while len(out) < limit:
            try:
                data = os.pread(self._fd, chunk, address + len(out))
            except OSError:
                data = b""
            if not data:
                if out or chunk == 1:
                    break
                chunk = 1
                continue
            nul = data.find(b"\0")
            if nul >= 0:
                return out + data[:nul]
            out += data
        if not out:
            raise FaultError(f"cannot read a string at {address:#x} in process {self.pid}", address)
        return out[:limit]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# --- kernel and libc ABI layouts written into or read from a tracee -------------
#: All-ones 64-bit value: ``orig_rax = U64`` means "no syscall to restart/skip it".
U64 = (1 << 64) - 1


def signed64(value: int) -> int:
    """*value* (a 64-bit register) as a signed integer."""
    value &= U64
    return value - (1 << 64) if value >> 63 else value


class SockFprog(ctypes.Structure):
    """``struct sock_fprog``: a BPF program for ``seccomp(SECCOMP_SET_MODE_FILTER)``."""

    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_uint64)]


class SockFilter(ctypes.Structure):
    """``struct sock_filter``: one classic BPF instruction."""

    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]


#: ``struct seccomp_data``, what a seccomp filter reads: nr, arch, instruction_pointer,
#: args[6]; and the offsets of its fields
SECCOMP_DATA = struct.Struct("<iIQ6Q")
SECCOMP_DATA_NR = 0
SECCOMP_DATA_ARCH = 4
SECCOMP_DATA_IP = 8
SECCOMP_DATA_ARGS = 16
AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
# seccomp return values: the action in the high 16 bits (SECCOMP_RET_ACTION_FULL)
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_KILL_THREAD = 0x00000000
SECCOMP_RET_TRAP = 0x00030000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_RET_TRACE = 0x7FF00000
SECCOMP_RET_LOG = 0x7FFC0000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ACTION_FULL = 0xFFFF0000
SECCOMP_RET_DATA = 0x0000FFFF
BPF_MAXINSNS = 4096
BPF_LD_W_ABS = 0x20          # BPF_LD | BPF_W | BPF_ABS
BPF_JEQ_K = 0x15             # BPF_JMP | BPF_JEQ | BPF_K
BPF_RET_K = 0x06             # BPF_RET | BPF_K


def seccomp_trace_filter(nr: int, watch: bool = False) -> bytes:
    """A BPF program: ``SECCOMP_RET_TRACE`` for x86-64 syscall *nr*, allow everything
    else. With *watch*, also ``SECCOMP_RET_TRACE`` for the calls that install a
    seccomp filter or strict mode, in every ABI: ``seccomp(SECCOMP_SET_MODE_STRICT or
    SECCOMP_SET_MODE_FILTER, ...)`` and ``prctl(PR_SET_SECCOMP, ...)`` (the low 32 bits
    of the first argument, which is all the kernel reads of it)."""
    ld, jeq, ret = BPF_LD_W_ABS, BPF_JEQ_K, BPF_RET_K
    if not watch:
        program = [
            (ld, 0, 0, SECCOMP_DATA_ARCH),
            (jeq, 0, 3, AUDIT_ARCH_X86_64),       # other arch: allow
            (ld, 0, 0, SECCOMP_DATA_NR),
            (jeq, 0, 1, nr),
            (ret, 0, 0, SECCOMP_RET_TRACE),
            (ret, 0, 0, SECCOMP_RET_ALLOW),
        ]
    else:
        trace, allow = 17, 18

        def to(target: int, at: int) -> int:        # a jump offset from instruction *at*
            return target - at - 1

        seccomp_op, prctl_op, i386 = 12, 15, 8
        program = [
            (ld, 0, 0, SECCOMP_DATA_ARCH),                                        # 0
            (jeq, 0, to(i386, 1), AUDIT_ARCH_X86_64),                             # 1
            (ld, 0, 0, SECCOMP_DATA_NR),                                          # 2
            (jeq, to(trace, 3), 0, nr),                                           # 3: the slot
            (jeq, to(seccomp_op, 4), 0, SYS_seccomp),                             # 4
            (jeq, to(seccomp_op, 5), 0, SYS_seccomp | X32_SYSCALL_BIT),           # 5
            (jeq, to(prctl_op, 6), 0, SYS_prctl),                                 # 6
            (jeq, to(prctl_op, 7), to(allow, 7), SYS_prctl | X32_SYSCALL_BIT),    # 7
            (jeq, 0, to(allow, 8), AUDIT_ARCH_I386),                              # 8: i386
            (ld, 0, 0, SECCOMP_DATA_NR),                                          # 9
            (jeq, to(seccomp_op, 10), 0, SYS_I386_seccomp),                       # 10
            (jeq, to(prctl_op, 11), to(allow, 11), SYS_I386_prctl),               # 11
            (ld, 0, 0, SECCOMP_DATA_ARGS),                                        # 12: seccomp(op, ...)
            (jeq, to(trace, 13), 0, SECCOMP_SET_MODE_STRICT),                     # 13
            (jeq, to(trace, 14), to(allow, 14), SECCOMP_SET_MODE_FILTER),         # 14
            (ld, 0, 0, SECCOMP_DATA_ARGS),                                        # 15: prctl(option, ...)
            (jeq, to(trace, 16), to(allow, 16), PR_SET_SECCOMP),                  # 16
            (ret, 0, 0, SECCOMP_RET_TRACE),                                       # 17
            (ret, 0, 0, SECCOMP_RET_ALLOW),                                       # 18
        ]
    return bytes((SockFilter * len(program))(*(SockFilter(*insn) for insn in program)))


class RDebug(ctypes.Structure):
    """glibc's ``struct r_debug`` (``_r_debug`` in ld.so), read to know when the
    dynamic loader's list of objects is consistent."""

    _fields_ = [("r_version", ctypes.c_int32), ("r_map", ctypes.c_uint64), ("r_brk", ctypes.c_uint64),
                ("r_state", ctypes.c_int32), ("r_ldbase", ctypes.c_uint64)]


RT_CONSISTENT = 0
R_STATE_OFFSET = RDebug.r_state.offset


# --- sharing memory with a tracee, waking up on child events, the TSC ---------------------
SYS_pidfd_getfd = 438
MFD_ALLOW_SEALING = 2
SFD_NONBLOCK = 0o4000
SFD_CLOEXEC = 0o2000000


def take_fd(pid: int, fd: int) -> int:
    """A duplicate, in this process, of descriptor *fd* of process *pid*
    (``pidfd_getfd``; the caller must be allowed to ptrace *pid*)."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError) as exc:
        raise TracerError(f"pidfd_open({pid}) failed: {getattr(exc, 'strerror', exc)}") from None
    try:
        res = _syscall(SYS_pidfd_getfd, pidfd, fd, 0)
        if res < 0:
            err = ctypes.get_errno()
            raise _translate(OSError(err, os.strerror(err)), pid, "pidfd_getfd")
        return int(res)
    finally:
        os.close(pidfd)


class _SigSet(ctypes.Structure):
    _fields_ = [("val", ctypes.c_uint64 * 16)]


def child_signal_fd() -> int:
    """A non-blocking signalfd for SIGCHLD (a ptrace stop of a tracee sends its
    tracer a SIGCHLD). It reads only while SIGCHLD is blocked: see
    :func:`wait_child_signal`."""
    import signal
    mask = _SigSet()
    mask.val[0] = 1 << (signal.SIGCHLD - 1)
    fd = _libc.signalfd(-1, ctypes.byref(mask), SFD_NONBLOCK | SFD_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise TracerError(f"signalfd failed: {os.strerror(err)}")
    return int(fd)


def wait_child_signal(fd: int, timeout_ms: int) -> "tuple[int, int]":
    """Wait at most *timeout_ms* for a child event, with SIGCHLD blocked in this
    thread only for that while (so that nothing else, and no program started
    meanwhile, ever sees it blocked). Returns a (tid, status) that was already
    there, or (0, 0)."""
    import select
    import signal
    old = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])
    try:
        found = wait_any_nohang()           # an event before the block is not signalled again
        if found[0]:
            return found
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if poller.poll(timeout_ms):
            try:
                while os.read(fd, 128 * 16):
                    pass
            except BlockingIOError:
                pass
        return 0, 0
    finally:
        if signal.SIGCHLD not in old:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCHLD])


_rdtsc_func = None


def rdtsc() -> int:
    """The CPU's time-stamp counter, as the ``rdtsc`` of a recording stub reads it
    (a four-instruction function mapped executable in this process on first use)."""
    global _rdtsc_func
    if _rdtsc_func is None:
        import mmap
        code = bytes.fromhex("0f31" "48c1e220" "4809d0" "c3")     # rdtsc; shl rdx, 32; or rax, rdx; ret
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        page.write(code)
        address = ctypes.addressof(ctypes.c_char.from_buffer(page))
        if _libc.mprotect(ctypes.c_void_p(address), mmap.PAGESIZE, PROT_READ | PROT_EXEC) != 0:
            raise TracerError("cannot make the rdtsc function executable")
        _rdtsc_func = (ctypes.CFUNCTYPE(ctypes.c_uint64)(address), page)
    return int(_rdtsc_func[0]())

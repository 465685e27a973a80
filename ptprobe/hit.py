"""What a handler sees: :class:`Hit`, its register view :class:`Regs` and its
arguments :class:`Args`.

The engine builds these per hit (``ptprobe.engine.hits``); the probe that was
hit supplies the arguments through the :class:`ArgumentSource` protocol, so this
module depends on no probe or engine module.
"""

from __future__ import annotations

import struct
import time
from typing import (TYPE_CHECKING, AbstractSet, Dict, Iterator, List, Optional, Protocol, Sequence, Set, Tuple,
                    Union, cast, overload)

from . import linux
from .unwind import RegisterSource, Stack

if TYPE_CHECKING:  # pragma: no cover
    from .patching import Site

Value = Union[int, float]


class ArgumentSource(Protocol):
    """What a :class:`Hit` needs of its probe (:class:`ptprobe.Probe` is one)."""

    name: str

    def argument_count(self, hit: "Hit") -> int: ...

    def arguments(self, hit: "Hit") -> List[Value]: ...

    def argument(self, hit: "Hit", index: int) -> Value:
        """Argument *index* (0 up to ``argument_count(hit)``); a LookupError past the end."""
        ...


class StackSource(Protocol):
    """Where :meth:`Hit.stack` unwinds (the hit's address space,
    :class:`ptprobe.tracee.AddressSpace`, is one)."""

    def user_stack(self, tid: int, regs: RegisterSource, max_frames: int) -> Stack: ...

#: The registers a handler can read and write by name.
#: A slot's frame as :class:`Regs` takes it: the names of the registers saved at
#: the thread's rsp, the program's rsp minus the thread's, where to read them.
Frame = Tuple[Tuple[str, ...], int, linux.Memory]
_NOTHING: AbstractSet[str] = frozenset()

REGISTER_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
                  "r12", "r13", "r14", "r15", "rip", "eflags", "fs_base", "gs_base",
                  "cs", "ss", "ds", "es", "fs", "gs")


class Regs:
    """The program's registers at the probe site, read and written by name.

    ``hit.regs.rdi`` reads, ``hit.regs.rdi = 5`` writes (the program sees the
    new value after the site), ``hit.regs.rip = address`` resumes elsewhere.
    ``rflags`` is another name for ``eflags``. The view is the same whether the
    hit came through an int3 or a slot.

    The engine builds the view over the thread's registers as read (*raw*), or
    with *raw* None over thread *tid* itself, read when a handler asks: the
    first register by one ``PTRACE_PEEKUSER``, the whole set at the second.
    *values* are what the view shows instead of the thread's registers (rip at
    the probe address). *frame*, for a stop inside a slot or the return
    trampoline, is a :data:`Frame`: the registers saved at the thread's rsp (in
    :data:`ptprobe.arch.SLOT_SAVED` order, read when first needed), how far above the
    thread's rsp the program's is, and the memory to read them from.
    """

    # (positional parameters and no empty set until a write: a view is made per hit)
    __slots__ = ("_raw", "_tid", "_peeked", "_values", "_dirty", "_saved", "_frame", "asked")

    def __init__(self, raw: Optional[linux.Registers], values: Dict[str, int], tid: int = 0,
                 frame: Optional["Frame"] = None) -> None:
        self._raw = raw
        self._tid = tid
        self._peeked: Optional[Tuple[str, int]] = None     # the one register read alone
        self._values = values           # the view's values that differ from the thread's registers
        self._dirty: Optional[Set[str]] = None
        self._frame = frame
        self._saved: Tuple[str, ...] = frame[0] if frame is not None else ()   # not read yet
        #: True once a register of the thread (not one the view knows) was asked for
        self.asked = False

    def get(self, name: str) -> int:
        """The program's value of register *name* (a name of :data:`REGISTER_NAMES`)."""
        value = self._values.get(name)
        if value is not None:
            return value
        raw = self._raw
        if raw is not None and not self._saved and name != "rsp":
            self.asked = True
            return getattr(raw, name)       # (the common case, shortest)
        if name in self._saved:
            self.load_stacked()
            return self._values[name]
        if name == "rsp" and self._frame is not None and self._frame[1]:
            value = self._values["rsp"] = self.thread_value("rsp") + self._frame[1]
            return value
        return self.thread_value(name)

    def thread_value(self, name: str) -> int:
        """Register *name* as the stopped thread has it (not the program's view:
        inside a slot, rsp points at the slot's frame)."""
        self.asked = True
        raw = self._raw
        if raw is None:
            peeked = self._peeked
            if peeked is None:
                value = linux.peek_register(self._tid, name)
                if value is not None:
                    self._peeked = (name, value)
                    return value
            elif peeked[0] == name:
                return peeked[1]
            raw = self.raw
        return getattr(raw, name)

    @property
    def raw(self) -> linux.Registers:
        """The thread's whole register set (read now if it was not)."""
        raw = self._raw
        if raw is None:
            raw = self._raw = linux.get_regs(self._tid)
        return raw

    @property
    def loaded(self) -> bool:
        """True once the whole register set was read."""
        return self._raw is not None

    def _set(self, name: str, value: int) -> None:
        if name in self._saved:
            self.load_stacked()
        self._values[name] = int(value) & linux.U64
        if self._dirty is None:
            self._dirty = {name}
        else:
            self._dirty.add(name)

    def load_stacked(self) -> None:
        """Read the registers a slot saved on the stack now (the engine needs them
        all to finish a slot by hand)."""
        saved = self._saved
        if saved:
            assert self._frame is not None
            data = self._frame[2].read(self.thread_value("rsp"), 8 * len(saved))
            for index, name in enumerate(saved):
                self._values.setdefault(name, int.from_bytes(data[8 * index:8 * index + 8], "little"))
            self._saved = ()

    def move_to(self, address: int) -> None:
        """Show the program at *address* (the next site of a chained patch): rip
        changes in the view, and does not count as a handler's change."""
        self._values["rip"] = address

    @property
    def changed(self) -> AbstractSet[str]:
        """Names of the registers a handler wrote."""
        return self._dirty or _NOTHING

    def as_dict(self) -> Dict[str, int]:
        return {name: self.get(name) for name in REGISTER_NAMES}

    def __getitem__(self, name: str) -> int:
        if name == "rflags":
            name = "eflags"
        if name not in REGISTER_NAMES:
            raise KeyError(name)
        return self.get(name)

    def __setitem__(self, name: str, value: int) -> None:
        if name == "rflags":
            name = "eflags"
        if name not in REGISTER_NAMES:
            raise KeyError(name)
        self._set(name, value)

    def __repr__(self) -> str:
        return "Regs(" + ", ".join(f"{k}={v:#x}" for k, v in self.as_dict().items()) + ")"


def _reg_property(name: str) -> property:
    def getter(self: Regs) -> int:
        return self.get(name)

    def setter(self: Regs, value: int) -> None:
        self._set(name, value)

    return property(getter, setter, doc=f"The program's {name}.")


for _name in REGISTER_NAMES:
    setattr(Regs, _name, _reg_property(_name))
Regs.rflags = _reg_property("eflags")  # type: ignore[attr-defined]


class Hit:
    """One probe hit. Valid only while the handler runs.

    ``time_ns``: when the thread stopped, CLOCK_MONOTONIC in nanoseconds (taken
    by ptprobe at the stop; the clock of ``time.monotonic_ns()``)."""

    __slots__ = ("pid", "tid", "address", "probe", "regs", "site", "time_ns", "_mem", "_args", "_xmm")

    #: True for a :class:`ReturnHit`.
    is_return = False

    def __init__(self, probe: ArgumentSource, site: "Site", pid: int, tid: int, regs: Regs,
                 time_ns: Optional[int] = None) -> None:
        self.time_ns: int = time.monotonic_ns() if time_ns is None else time_ns
        self.probe = probe
        self.site = site
        self.pid = pid
        self.tid = tid
        self.address: int = site.address
        self.regs = regs
        self._mem: linux.Memory = site.space.mem
        self._args: Optional[Args] = None
        self._xmm: Optional[linux.FpRegisters] = None

    @property
    def name(self) -> str:
        """What was hit: ``symbol``, ``symbol+0x4``, or ``provider:name`` for USDT."""
        return self.site.label

    @property
    def args(self) -> "Args":
        """Arguments: for uprobes the SysV integer argument registers
        (rdi, rsi, rdx, rcx, r8, r9); for USDT probes the values the probe's
        argument specs describe. Each is read when it is first used."""
        if self._args is None:
            self._args = Args(self)
        return self._args

    def xmm(self, index: int) -> bytes:
        """The 16 bytes of register xmm*index*."""
        if self._xmm is None:
            self._xmm = linux.get_fpregs(self.tid)
        return linux.xmm_bytes(self._xmm, index)

    def read(self, address: int, size: int) -> bytes:
        """Read *size* bytes of the process's memory."""
        return self._mem.read(address, size)

    def read_str(self, address: int, limit: int = 4096, encoding: str = "utf-8") -> str:
        """Read a NUL-terminated string (at most *limit* bytes), decoded."""
        return self._mem.read_cstring(address, limit).decode(encoding, "replace")

    def write(self, address: int, data: bytes) -> None:
        """Write *data* into the process's memory."""
        self._mem.write(address, bytes(data))

    def stack(self, max_frames: int = 64) -> Stack:
        """The thread's call chain here, innermost frame first (at most
        *max_frames*): :class:`ptprobe.unwind.Frame` values with ``address``,
        ``symbol``, ``offset``, ``object`` (``str(frame)`` is ``symbol+0x1c
        (object)``). Unwound from the objects' CFI, else frame pointers; return
        addresses that return probes replaced show as the original ones."""
        source = cast(StackSource, self.site.space)     # an AddressSpace
        return source.user_stack(self.tid, self.regs, max_frames)

    def __repr__(self) -> str:
        return f"<Hit {self.probe.name} pid={self.pid} tid={self.tid} at {self.address:#x}>"

    def expire(self) -> None:
        """The hit is over (called by the engine): drop the cached :class:`Args`,
        which refer back to the hit, so that reference counting frees both (no
        garbage for the cyclic GC)."""
        self._args = None


class Args(Sequence):
    """A hit's arguments, each evaluated when first read (``args[3]`` of a slot hit
    is rcx, which costs a read of the slot's stack)."""

    __slots__ = ("_hit", "_values", "_len")

    def __init__(self, hit: Hit) -> None:
        self._hit = hit
        self._len = -1                  # counted when first needed
        self._values: Dict[int, Value] = {}

    def __len__(self) -> int:
        if self._len < 0:
            self._len = self._hit.probe.argument_count(self._hit)
        return self._len

    def __iter__(self) -> Iterator[Value]:
        if not self._values:
            # nothing read yet: all of them in one go (the common case, printing a hit)
            values = self._hit.probe.arguments(self._hit)
            self._values.update(enumerate(values))
            return iter(values)
        return (self[index] for index in range(len(self)))

    @overload
    def __getitem__(self, index: int) -> Value: ...

    @overload
    def __getitem__(self, index: slice) -> List[Value]: ...

    def __getitem__(self, index):
        if index.__class__ is int and index >= 0:
            # the common case (hit.args[0]), with the fewest calls: no count needed,
            # the probe refuses an index past the end (ArgumentSource.argument)
            value = self._values.get(index)
            if value is None:
                try:
                    value = self._values[index] = self._hit.probe.argument(self._hit, index)
                except LookupError:
                    raise IndexError("argument index out of range") from None
            return value
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("argument index out of range")
        return self[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (list, tuple, Args)):
            return list(self) == list(other)
        return NotImplemented

    def __repr__(self) -> str:
        return repr(list(self))


class Unreadable:
    """The value of a recorded argument whose memory could not be read when the
    program recorded it (a bad pointer: the program was not harmed)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<unreadable>"

    def __bool__(self) -> bool:
        return False


#: The one :class:`Unreadable` value.
UNREADABLE = Unreadable()


class Record:
    """One hit of a recording probe, written inside the program with no stop and
    read by ptprobe afterwards: read-only, valid after the handler returns.

    ``probe``, ``pid``, ``tid`` (0 if the thread could not be told), ``time_ns``
    (CLOCK_MONOTONIC), ``address`` (the probe address), ``name`` (as
    :attr:`Hit.name`) and ``args`` (a tuple: for uprobes the six integer argument
    registers, for USDT probes the values of the probe's argument specs; an
    argument in memory that could not be read is :data:`UNREADABLE`).
    """

    __slots__ = ("probe", "site", "pid", "tid", "time_ns", "args")

    def __init__(self, probe: ArgumentSource, site: "Site", pid: int, tid: int, time_ns: int,
                 args: tuple) -> None:
        self.probe = probe
        self.site = site
        self.pid = pid
        self.tid = tid
        self.time_ns = time_ns
        self.args = args

    @property
    def address(self) -> int:
        return self.site.address

    @property
    def name(self) -> str:
        return self.site.label

    def __repr__(self) -> str:
        return (f"<Record {self.probe.name} pid={self.pid} tid={self.tid} t={self.time_ns} "
                f"args={list(self.args)}>")
class ReturnHit(Hit):
    """A hit of a return probe: the function *returned*; the thread is stopped at
    its caller's return address with every register as the function left it.

    ``address`` and ``name`` are the function's (its entry site), ``regs`` shows
    the program at the return address (``regs.rip``, also ``return_address``),
    ``time_ns`` is the return's time and ``entry_time_ns`` the entry's.
    ``entry_args`` (also ``args``) are the arguments the function was entered
    with (the six integer argument registers; None when the entry was seen
    before the probe had a handler).
    """

    __slots__ = ("entry_time_ns", "entry_args")

    is_return = True

    def __init__(self, probe: ArgumentSource, site: "Site", pid: int, tid: int, regs: Regs, time_ns: int,
                 entry_time_ns: int, entry_args: Optional[Tuple[int, ...]]) -> None:
        super().__init__(probe, site, pid, tid, regs, time_ns)
        self.entry_time_ns = entry_time_ns
        self.entry_args = entry_args

    @property
    def name(self) -> str:
        """The function's name (its entry site's label without an offset)."""
        return self.site.label.partition("+")[0]

    @property
    def retval(self) -> int:
        """The return value: rax (an unsigned 64-bit value; rdx has the upper half of
        a 16-byte integer or struct, ``regs.rdx``)."""
        return self.regs.get("rax")

    @property
    def retval_double(self) -> float:
        """The return value of a function returning ``double``: xmm0's low 8 bytes."""
        return float(struct.unpack("<d", self.xmm(0)[:8])[0])

    @property
    def retval_float(self) -> float:
        """The return value of a function returning ``float``: xmm0's low 4 bytes."""
        return float(struct.unpack("<f", self.xmm(0)[:4])[0])

    @property
    def duration_ns(self) -> int:
        """Nanoseconds from the entry's stop to the return's (ptprobe's own stops included)."""
        return self.time_ns - self.entry_time_ns

    @property
    def return_address(self) -> int:
        """Where the function returns to (its caller)."""
        return self.regs.get("rip")

    def __repr__(self) -> str:
        return f"<ReturnHit {self.probe.name} pid={self.pid} tid={self.tid} retval={self.retval:#x}>"

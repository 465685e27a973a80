"""Machine code for actions that run inside the program, with no stop.

Pure functions of their arguments, like :mod:`ptprobe.arch` (which they build
on): the code is assembled by keystone from readable Intel-syntax source with
hex literals, at the address where it will run. See ``docs/design.md``,
"Actions inside the program".

* :func:`count_slot_code` -- a counting slot: one ``lock inc`` of this CPU's
  counter of the site, then back to the site.
* :func:`record_stub_code` -- a recording stub: reserve a record in the
  address space's ring, write its time, thread and arguments, commit it by
  writing its header last, then back to the site. When the ring is full it
  makes the slot syscall (the tracer drains the ring and lets it retry) or,
  in drop mode or with no tracer, counts a drop.

Both step over the red zone first and give back every register; they clobber
the flags, so a site whose flags may be live (anything but a function entry or
a USDT site) gets ``pushfq``/``popfq`` around them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from . import arch

#: Bytes of a counting slot (a page holds 64).
COUNT_SLOT_SIZE = 64
#: ``rdpid rax`` (keystone 0.9.2 does not know the mnemonic).
_RDPID_RAX = ".byte 0xf3, 0x0f, 0xc7, 0xf8"
#: The low 12 bits of TSC_AUX are the CPU number (Linux puts the node above them).
CPU_MASK = 0xFFF

#: A record: header, time (TSC), thread key, then one 8-byte value per argument.
RECORD_HEADER = struct.Struct("<Q")
RECORD_FIXED = 24                  # header + time + thread
#: Header fields: bits 0-19 the stub's id + 1, bits 20-27 the record's size in
#: 8-byte words, bit 28 set while the record is being written (the stub writes
#: the header so marked right after reserving, and without the mark last: a
#: non-zero header without it is a committed record).
HEADER_ID_BITS = 20
HEADER_SIZE_SHIFT = 20
MAX_RECORD_WORDS = 0xFF
HEADER_PENDING = 1 << 28

#: In a record's thread word, the bits from FAULT_SHIFT up mark the arguments whose
#: memory could not be read (user addresses and thread pointers stay below 2**48).
FAULT_SHIFT = 48
SYS_PROCESS_VM_READV = 310
THREAD_FSBASE = "fsbase"           # the thread pointer, by rdfsbase
THREAD_RSP = "rsp"                 # the program's rsp (its stack tells the thread)

# the stub's own frame, from rsp up: r11, rdx, rcx, rax, [rflags]
_FRAME_REGS = ("r11", "rdx", "rcx", "rax")


def _frame_offset(name: str) -> int:
    return 8 * _FRAME_REGS.index(name)


def _frame_size(save_flags: bool) -> int:
    """From the stub's rsp to the program's."""
    return 8 * len(_FRAME_REGS) + (8 if save_flags else 0) + 0x80


# --------------------------------------------------------------------------- counting
_COUNT_SOURCE = """
lea rsp, [rsp - 0x80]
{pushf}
push rax
push rcx
{cpu}
movabs rcx, 0x1122334455667788
lock inc qword ptr [rcx + rax]
pop rcx
pop rax
{popf}
lea rsp, [rsp + 0x80]
"""
_PLACEHOLDER = struct.pack("<Q", 0x1122334455667788)
_count_templates: Dict[Tuple[bool, int, bool], Tuple[bytes, int]] = {}


def _cpu_source(cpu_shift: int, per_cpu: bool) -> str:
    """rax = this CPU's offset in the counters (or 0 with a single line)."""
    if not per_cpu:
        return "xor eax, eax"
    return f"{_RDPID_RAX}\nand eax, {CPU_MASK:#x}\nshl eax, {cpu_shift:#x}"


def _count_template(save_flags: bool, cpu_shift: int, per_cpu: bool) -> Tuple[bytes, int]:
    key = (save_flags, cpu_shift, per_cpu)
    cached = _count_templates.get(key)
    if cached is None:
        source = _COUNT_SOURCE.format(pushf="pushfq" if save_flags else "",
                                      popf="popfq" if save_flags else "",
                                      cpu=_cpu_source(cpu_shift, per_cpu))
        code = arch.assemble(source)
        cached = (code, code.index(_PLACEHOLDER))
        _count_templates[key] = cached
    return cached


def count_slot_inc_offset(*, cpu_shift: int, save_flags: bool, per_cpu: bool = True) -> int:
    """Offset of the ``lock inc`` in a counting slot: a thread stopped at or before
    it has not counted its hit yet."""
    template, _ = _count_template(save_flags, cpu_shift, per_cpu)
    return template.index(b"\xf0\x48\xff\x04\x01")


def count_slot_code(slot: int, resume: int, counter: int, *, cpu_shift: int, save_flags: bool,
                    per_cpu: bool = True) -> bytes:
    """The 64 bytes of a counting slot at *slot*: add one to the 64-bit counter at
    ``counter + (cpu << cpu_shift)`` (with *per_cpu*; else at *counter*), then
    jump to *resume*. ValueError if *resume* is out of rel32 reach."""
    template, at = _count_template(save_flags, cpu_shift, per_cpu)
    code = template[:at] + struct.pack("<Q", counter) + template[at + 8:]
    code += arch.jmp_rel32(slot + len(code), resume)
    if len(code) > COUNT_SLOT_SIZE:    # pragma: no cover - the template is fixed
        raise ValueError(f"counting slot of {len(code)} bytes")
    return code.ljust(COUNT_SLOT_SIZE, bytes([arch.INT3]))


# --------------------------------------------------------------------------- recording
@dataclass(frozen=True)
class Load:
    """How the stub gets one argument into its record.

    ``kind``: ``"reg"`` (the 64-bit register ``reg``: a general register, or
    ``xmmN`` for its low 8 bytes), ``"mem"`` (``size`` bytes at ``disp + base +
    index * scale``, the address cut to ``address_bits``), ``"abs"`` (``size``
    bytes at the absolute address ``disp``), ``"none"`` (nothing to load: a
    constant the tracer knows). Memory values are zero-extended to 8 bytes.
    """

    kind: str
    reg: Optional[str] = None
    base: Optional[str] = None
    index: Optional[str] = None
    scale: int = 1
    disp: int = 0
    size: int = 8
    address_bits: int = 64
    #: a plain load cannot fault (the stack, a global known to be mapped); else the
    #: stub reads with process_vm_readv, which fails where a load would crash, and
    #: marks the argument unreadable (a bit of FAULT_SHIFT + its index in the record's
    #: thread word)
    safe: bool = True


@dataclass(frozen=True)
class RingLayout:
    """Where a stub finds the ring and its counters (absolute addresses)."""

    head: int                  # u64: bytes ever reserved (producers, lock cmpxchg)
    tail: int                  # u64: bytes ever consumed (the tracer)
    drops: int                 # u64: records dropped
    ring: int                  # the ring's first byte; it is mapped twice in a row
    capacity: int              # a power of two
    counters: int              # CPU 0's block of counters
    cpu_shift: int             # log2 of the bytes between two CPUs' blocks
    per_cpu: bool = True
    pid: int = 0               # u64: the process's pid (for process_vm_readv)


@dataclass(frozen=True)
class RecordStub:
    """One site's recording stub: what it records and how."""

    stub_id: int
    site: int                  # the probe address (a %rip operand is relative to it)
    resume: int
    counter: int               # this site's counter in CPU 0's block
    loads: Sequence[Load] = field(default_factory=tuple)
    save_flags: bool = True
    thread: str = THREAD_FSBASE
    lossless: bool = True
    nr: int = arch.SLOT_SYSCALL_NR

    @property
    def record_size(self) -> int:
        return RECORD_FIXED + 8 * len(self.loads)

    @property
    def header(self) -> int:
        return make_header(self.stub_id, self.record_size)


def make_header(stub_id: int, size: int) -> int:
    if not 0 <= stub_id < (1 << HEADER_ID_BITS) - 1:
        raise ValueError(f"stub id {stub_id} out of range")
    if size % 8 or not 0 < size // 8 <= MAX_RECORD_WORDS:
        raise ValueError(f"record size {size} is not a multiple of 8 up to {8 * MAX_RECORD_WORDS}")
    return (stub_id + 1) | ((size // 8) << HEADER_SIZE_SHIFT)


def parse_header(header: int) -> Tuple[int, int]:
    """(stub id, record size in bytes) of a record's header (pending or committed)."""
    return (header & ((1 << HEADER_ID_BITS) - 1)) - 1, ((header >> HEADER_SIZE_SHIFT) & MAX_RECORD_WORDS) * 8


def _value_to(dst: str, name: str, stub: RecordStub) -> List[str]:
    """Source putting the program's 64-bit register *name* into *dst*."""
    if name in _FRAME_REGS:
        return [f"mov {dst}, qword ptr [rsp + {_frame_offset(name):#x}]"]
    if name == "rsp":
        return [f"lea {dst}, [rsp + {_frame_size(stub.save_flags):#x}]"]
    if name == "rip":
        return [f"movabs {dst}, {stub.site:#x}"]
    return [f"mov {dst}, {name}"]


_LOAD = {1: "movzx eax, byte ptr [rax]", 2: "movzx eax, word ptr [rax]", 4: "mov eax, dword ptr [rax]",
         8: "mov rax, qword ptr [rax]"}


def _careful_read(load: Load, offset: int, index: int, layout: RingLayout, label: str) -> List[str]:
    """Read *load.size* bytes at the address in rax into ``[rcx + offset]`` with
    process_vm_readv on the program's own pid: a bad address fails the system call
    instead of crashing the program; the argument is then marked unreadable."""
    return [
        f"mov qword ptr [rcx + {offset:#x}], 0",
        "push rdi", "push rsi", "push rdx", "push r10", "push r8", "push r9", "push rcx",
        "sub rsp, 0x20",                                   # two iovecs: local, remote
        f"lea rdx, [rcx + {offset:#x}]",
        "mov qword ptr [rsp], rdx",
        f"mov qword ptr [rsp + 0x8], {load.size:#x}",
        "mov qword ptr [rsp + 0x10], rax",
        f"mov qword ptr [rsp + 0x18], {load.size:#x}",
        f"movabs rdi, {layout.pid:#x}",
        "mov rdi, qword ptr [rdi]",
        "mov rsi, rsp",
        "mov edx, 1",
        "lea r10, [rsp + 0x10]",
        "mov r8d, 1",
        "xor r9d, r9d",
        f"mov eax, {SYS_PROCESS_VM_READV:#x}",
        "syscall",
        "add rsp, 0x20",
        "pop rcx", "pop r9", "pop r8", "pop r10", "pop rdx", "pop rsi", "pop rdi",
        f"cmp rax, {load.size:#x}",
        f"je {label}",
        f"bts qword ptr [rcx + 0x10], {FAULT_SHIFT + index:#x}",
        f"{label}:",
    ]


def _load_source(load: Load, offset: int, stub: RecordStub, index: int = 0,
                 layout: Optional[RingLayout] = None) -> List[str]:
    """Source storing one argument at ``[rcx + offset]`` (rcx: the record; rax and
    rdx are free)."""
    if load.kind == "none":
        return []
    if load.kind == "reg":
        assert load.reg is not None
        if load.reg.startswith("xmm"):
            return [f"movq rax, {load.reg}", f"mov qword ptr [rcx + {offset:#x}], rax"]
        if load.reg not in _FRAME_REGS and load.reg not in ("rsp", "rip"):
            return [f"mov qword ptr [rcx + {offset:#x}], {load.reg}"]
        return _value_to("rax", load.reg, stub) + [f"mov qword ptr [rcx + {offset:#x}], rax"]
    if load.size not in _LOAD:
        raise ValueError(f"cannot load {load.size} bytes")
    out: List[str] = []
    if load.kind == "abs":
        out.append(f"movabs rax, {load.disp & ((1 << 64) - 1):#x}")
    elif load.kind == "mem":
        if load.base is not None:
            out += _value_to("rax", load.base, stub)
        else:
            out.append("xor eax, eax")
        if load.index is not None:
            out += _value_to("rdx", load.index, stub)
            out.append(f"lea rax, [rax + rdx*{load.scale:#x}]")
        if load.disp:
            out += [f"movabs rdx, {load.disp & ((1 << 64) - 1):#x}", "add rax, rdx"]
        if load.address_bits == 32:
            out.append("mov eax, eax")
        elif load.address_bits == 16:
            out.append("movzx eax, ax")
    else:
        raise ValueError(f"unknown load kind {load.kind!r}")
    if not load.safe:
        if layout is None or not layout.pid:
            raise ValueError("a careful read needs the address of the pid")
        return out + _careful_read(load, offset, index, layout, f"arg{index}_read")
    out += [_LOAD[load.size], f"mov qword ptr [rcx + {offset:#x}], rax"]
    return out


def record_stub_source(stub: RecordStub, layout: RingLayout) -> str:
    """The assembly source of *stub* (for reading and for tests)."""
    lines = ["lea rsp, [rsp - 0x80]"]
    if stub.save_flags:
        lines.append("pushfq")
    lines += ["push rax", "push rcx", "push rdx", "push r11"]
    # count the hit, as a counting slot would (exact even when a record is dropped)
    lines += [_cpu_source(layout.cpu_shift, layout.per_cpu),
              f"movabs rcx, {stub.counter:#x}", "lock inc qword ptr [rcx + rax]"]
    size = stub.record_size
    lines += [
        "retry:",
        f"movabs rcx, {layout.head:#x}",
        "mov rax, qword ptr [rcx]",
        "reserve:",
        f"lea rdx, [rax + {size:#x}]",
        f"movabs r11, {layout.tail:#x}",
        "sub rdx, qword ptr [r11]",
        f"cmp rdx, {layout.capacity:#x}",
        "jbe room",
    ]
    # the ring is full
    if stub.lossless:
        # the tracer drains the ring and answers 0: try again; no tracer (or a
        # filter that answers for it) gives an error: drop
        lines += [f"mov eax, {stub.nr:#x}", "syscall", "test rax, rax", "je retry"]
    lines += [f"movabs rcx, {layout.drops:#x}", "lock inc qword ptr [rcx]", "jmp done"]
    lines += [
        "room:",
        f"lea rdx, [rax + {size:#x}]",
        "lock cmpxchg qword ptr [rcx], rdx",
        "jne reserve",
        f"and rax, {layout.capacity - 1:#x}",
        f"movabs rcx, {layout.ring:#x}",
        "add rcx, rax",
        f"mov qword ptr [rcx], {stub.header | HEADER_PENDING:#x}",    # its size, for a reader that must skip it
        "rdtsc",
        "shl rdx, 0x20",
        "or rax, rdx",
        "mov qword ptr [rcx + 0x8], rax",
    ]
    if stub.thread == THREAD_FSBASE:
        lines += ["rdfsbase rax"]
    else:
        lines += _value_to("rax", "rsp", stub)
    lines.append("mov qword ptr [rcx + 0x10], rax")
    for i, load in enumerate(stub.loads):
        lines += _load_source(load, RECORD_FIXED + 8 * i, stub, i, layout)
    lines += [
        f"mov qword ptr [rcx], {stub.header:#x}",        # commit: the header last
        "done:",
        "pop r11", "pop rdx", "pop rcx", "pop rax",
    ]
    if stub.save_flags:
        lines.append("popfq")
    lines.append("lea rsp, [rsp + 0x80]")         # then: jmp resume (appended, rel32)
    return "\n".join(lines)


def record_stub_body(stub: RecordStub, layout: RingLayout) -> bytes:
    """The stub's code but its final ``jmp resume``: it does not depend on where
    it is placed (absolute addresses are ``movabs`` immediates, the branches
    between its labels relative)."""
    if not 0 < layout.capacity < (1 << 31) or layout.capacity & (layout.capacity - 1):
        raise ValueError(f"ring capacity {layout.capacity:#x} is not a power of two below 2**31")
    return arch.assemble(record_stub_source(stub, layout))


def place_stub(body: bytes, at: int, resume: int) -> bytes:
    """A stub *body* placed at *at*: its final ``jmp resume`` appended. ValueError
    if *resume* is out of rel32 reach."""
    return body + arch.jmp_rel32(at + len(body), resume)


def record_stub_code(at: int, stub: RecordStub, layout: RingLayout) -> bytes:
    """The machine code of *stub* placed at *at*."""
    return place_stub(record_stub_body(stub, layout), at, stub.resume)


def syscall_return_offset(code: bytes, at: int, nr: int = arch.SLOT_SYSCALL_NR) -> Optional[int]:
    """Offset in a stub's *code* (placed at *at*) just after its slot syscall
    (where the thread stops when the ring is full), None if it has none."""
    offsets = syscall_return_offsets(code, nr)
    return offsets[0] if offsets else None


def syscall_return_offsets(code: bytes, nr: int = arch.SLOT_SYSCALL_NR) -> List[int]:
    """Offsets just after each slot syscall of *code*, in order."""
    mov = b"\xb8" + struct.pack("<I", nr) + b"\x0f\x05"
    out = []
    i = code.find(mov)
    while i >= 0:
        out.append(i + len(mov))
        i = code.find(mov, i + 1)
    return out


# --------------------------------------------------------------------------- call graphs
@dataclass(frozen=True)
class GraphLayout:
    """Where the call-graph code finds each thread's stack of pending returns.

    ``table``: ``entries`` pairs (thread pointer, address of its shadow stack),
    written by the tracer (a thread is entered before it runs); a key of 0 ends
    a probe sequence. A shadow stack: its depth (u64), 8 bytes unused, then
    ``frames`` frames of FRAME_BYTES: the original return address, the address
    of the stack slot that held it, the header of the exit record.
    """

    table: int
    entries: int               # a power of two
    trampoline: int            # the exit trampoline's address
    frames: int


FRAME_BYTES = 32
SHADOW_HEADER = 16
ENTRY_RECORD = 32              # header, time, thread, depth (or -1: no exit will come)
EXIT_RECORD = 32               # header, time, thread, frames lost (skipped by longjmp)


def _reserve_source(size: int, layout: RingLayout, lossless: bool, nr: int, header: str,
                    done: str, prefix: str, thread: Optional[str] = None) -> List[str]:
    """Reserve *size* bytes in the ring (rax, rcx, rdx, r11 are free), leaving the
    record's address in rcx with its pending header, time and thread written;
    *header* is an immediate or a register; *thread*, a register already holding
    the thread pointer (else rdfsbase reads it again). A full ring stops (lossless)
    or drops, then goes to *done*. Labels get *prefix*."""
    pending = (f"{int(header, 0) | HEADER_PENDING:#x}" if header.startswith("0x") else None)
    lines = [
        f"{prefix}retry:",
        f"movabs rcx, {layout.head:#x}",
        "mov rax, qword ptr [rcx]",
        f"{prefix}reserve:",
        f"lea rdx, [rax + {size:#x}]",
        f"movabs r11, {layout.tail:#x}",
        "sub rdx, qword ptr [r11]",
        f"cmp rdx, {layout.capacity:#x}",
        f"jbe {prefix}room",
    ]
    if lossless:
        lines += [f"mov eax, {nr:#x}", "syscall", "test rax, rax", f"je {prefix}retry"]
    lines += [f"movabs rcx, {layout.drops:#x}", "lock inc qword ptr [rcx]", f"jmp {done}"]
    lines += [
        f"{prefix}room:",
        f"lea rdx, [rax + {size:#x}]",
        "lock cmpxchg qword ptr [rcx], rdx",
        f"jne {prefix}reserve",
        f"and rax, {layout.capacity - 1:#x}",
        f"movabs rcx, {layout.ring:#x}",
        "add rcx, rax",
    ]
    if pending is not None:
        lines.append(f"mov qword ptr [rcx], {pending}")
    else:
        lines += [f"mov rax, {header}", f"bts rax, {HEADER_PENDING.bit_length() - 1:#x}",
                  "mov qword ptr [rcx], rax"]
    lines += ["rdtsc", "shl rdx, 0x20", "or rax, rdx", "mov qword ptr [rcx + 0x8], rax"]
    if thread is None:
        lines += ["rdfsbase rax", "mov qword ptr [rcx + 0x10], rax"]
    else:
        lines.append(f"mov qword ptr [rcx + 0x10], {thread}")
    return lines


def _find_shadow(graph: GraphLayout, missing: str, prefix: str) -> List[str]:
    """rsi = this thread's shadow stack (rax, rcx, rdx, rsi free), or jump to *missing*."""
    mask = graph.entries - 1
    return [
        "rdfsbase rax",
        "mov rdx, rax",
        "shr rdx, 0xc",
        f"and edx, {mask:#x}",
        f"movabs rcx, {graph.table:#x}",
        f"{prefix}find:",
        "mov rsi, rdx",
        "shl rsi, 4",
        "cmp qword ptr [rcx + rsi], rax",
        f"je {prefix}found",
        "cmp qword ptr [rcx + rsi], 0",
        f"je {missing}",
        "inc edx",
        f"and edx, {mask:#x}",
        f"jmp {prefix}find",
        f"{prefix}found:",
        "mov rsi, qword ptr [rcx + rsi + 8]",
    ]


_ENTRY_SAVED = ("r8", "r11", "rdi", "rsi", "rdx", "rcx", "rax")       # pushed in reverse: rax first


#: the exit record's header minus the entry record's (the exit's stub id follows)
GRAPH_EXIT_HEADER_DELTA = make_header(1, EXIT_RECORD) - make_header(0, ENTRY_RECORD)
#: a function's entry stub (:func:`graph_entry_stub`): its code, then the routine's address
GRAPH_STUB_SIZE = 40
_GRAPH_STUB_POINTER = 32


def graph_entry_source(layout: RingLayout, graph: GraphLayout, *, lossless: bool = True,
                       nr: int = arch.SLOT_SYSCALL_NR) -> str:
    """The entry routine every recorded function of an address space calls from its
    entry stub (:func:`graph_entry_stub`, which has stepped over the red zone and
    pushed the entry record's header): push a frame on the thread's shadow stack,
    make the function return through the exit trampoline, and record the entry
    (its depth, or -1 when no exit will come: an unknown thread or a full shadow
    stack). Only at a function's entry: the flags are dead there."""
    header_at = 8 * len(_ENTRY_SAVED) + 8                  # above the saved registers and our return
    header = f"qword ptr [rsp + {header_at:#x}]"
    frame = 0x80 + header_at + 8                          # the function's return address
    lines = [f"push {r}" for r in reversed(_ENTRY_SAVED)]
    lines += ["e_lookup:"] + _find_shadow(graph, "e_miss", "e_")
    lines += [
        "mov r8, rax",                                        # the thread pointer, for the record
        "mov rdx, qword ptr [rsi]",
        # frames whose slot lies below this call's are dead (a longjmp skipped their
        # returns), and so is one in the same slot unless the slot holds the exit
        # trampoline's address: then this call is a tail call of that frame's call,
        # which stays, and returns through the trampoline once this one has.
        # Dead frames are dropped here, so that the depth recorded is the true one
        f"lea rdi, [rsp + {frame:#x}]",
        "e_dead:",
        "test rdx, rdx",
        "jz e_push",
        "mov rax, rdx",
        "shl rax, 5",
        f"cmp qword ptr [rsi + rax + {SHADOW_HEADER - FRAME_BYTES + 8:#x}], rdi",
        "ja e_push",
        "jb e_pop",
        f"movabs rax, {graph.trampoline:#x}",
        "cmp qword ptr [rdi], rax",
        "je e_push",
        "e_pop:",
        "dec rdx",
        "jmp e_dead",
        "e_push:",
        f"cmp rdx, {graph.frames:#x}",
        "jae e_nohijack",
        "lea rdi, [rdx + 1]",
        "mov qword ptr [rsi], rdi",
        "mov rdi, rdx",                                       # the entry's depth
        "shl rdx, 5",
        f"lea rsi, [rsi + rdx + {SHADOW_HEADER:#x}]",         # the frame
        f"lea rdx, [rsp + {frame:#x}]",                       # the return address's slot
        "mov rax, qword ptr [rdx]",
        "mov qword ptr [rsi], rax",
        "mov qword ptr [rsi + 0x8], rdx",
        f"mov rax, {header}",
        f"add rax, {GRAPH_EXIT_HEADER_DELTA:#x}",
        "mov qword ptr [rsi + 0x10], rax",                    # the exit record's header
        f"movabs rax, {graph.trampoline:#x}",
        "mov qword ptr [rdx], rax",
        "jmp e_record",
        # a thread not in the table yet (its thread pointer was set after its first
        # stop): ptprobe enters it and answers 0 (look again); without ptprobe, go on
        "e_miss:",
        f"mov eax, {nr:#x}",
        "syscall",
        "test rax, rax",
        "je e_lookup",
        "e_nohijack:",
        "mov rdi, -1",
        "rdfsbase r8",
        "e_record:",
    ]
    lines += _reserve_source(ENTRY_RECORD, layout, lossless, nr, header, "e_done", "e_", "r8")
    lines += ["mov qword ptr [rcx + 0x18], rdi", f"mov rax, {header}", "mov qword ptr [rcx], rax", "e_done:"]
    lines += [f"pop {r}" for r in _ENTRY_SAVED]
    lines.append("ret")
    return "\n".join(lines)


def graph_entry_stub(entry_header: int, routine: int, at: int, resume: int) -> bytes:
    """A recorded function's entry stub placed at *at* (GRAPH_STUB_SIZE bytes):
    step over the red zone, push the entry record's header, call the space's
    entry routine (*routine*, through the address stored after the code: any
    distance), step back and ``jmp resume``."""
    if not 0 <= entry_header < 1 << 31:
        raise ValueError(f"entry header {entry_header:#x} does not fit a push imm32")
    call_end = 16
    code = (b"\x48\x8d\x64\x24\x80"                                  # lea rsp, [rsp - 0x80]
            + b"\x68" + struct.pack("<I", entry_header)                   # push header
            + b"\xff\x15" + struct.pack("<i", _GRAPH_STUB_POINTER - call_end)  # call [rip + routine]
            + b"\x48\x8d\xa4\x24\x88\x00\x00\x00")                      # lea rsp, [rsp + 0x88]
    code = place_stub(code, at, resume)
    return code + b"\xcc" * (_GRAPH_STUB_POINTER - len(code)) + struct.pack("<Q", routine)


def graph_exit_source(layout: RingLayout, graph: GraphLayout, *, lossless: bool = True,
                      nr: int = arch.SLOT_SYSCALL_NR) -> str:
    """The exit trampoline, one per address space, where a recorded function
    returns: find the call's frame by the slot its return address had (frames
    deeper than it were left by longjmp: counted as lost), record the exit,
    and jump to the original return address. Only rax and rdx (the return
    value) are kept: every other general register is dead after a return, and
    so are the flags and the stack below rsp. A call with no frame (a stack
    switched under ptprobe's feet) stops at the slot syscall for ptprobe to
    resolve, and with no tracer, traps (ud2)."""
    lines = ["push rax", "push rdx"]
    lines += _find_shadow(graph, "x_broken", "x_")
    lines += [
        "lea rdi, [rsp + 0x8]",                  # the slot of this call's return address
        "mov rdx, qword ptr [rsi]",
        "xor r8d, r8d",
        "x_pop:",
        "test rdx, rdx",
        "jz x_broken",
        "dec rdx",
        "mov r9, rdx",
        "shl r9, 5",
        f"lea r9, [rsi + r9 + {SHADOW_HEADER:#x}]",
        "cmp qword ptr [r9 + 0x8], rdi",
        "je x_matched",
        "ja x_broken",
        "inc r8",
        "jmp x_pop",
        "x_matched:",
        "mov qword ptr [rsi], rdx",
        "mov rsi, rax",                          # the thread pointer, for the record
        "mov r10, qword ptr [r9]",
        "mov r9, qword ptr [r9 + 0x10]",
    ]
    lines += _reserve_source(EXIT_RECORD, layout, lossless, nr, "r9", "x_done", "x_", "rsi")
    lines += ["mov qword ptr [rcx + 0x18], r8", "mov qword ptr [rcx], r9", "x_done:",
              "pop rdx", "pop rax", "jmp r10",
              "x_broken:", f"mov eax, {nr:#x}", "syscall", "ud2"]
    return "\n".join(lines)

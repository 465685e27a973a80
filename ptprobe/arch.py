"""x86-64 instruction knowledge for ptprobe: decoding, probe sites, slots, out-of-line code.

Everything here is a pure function of its arguments: no I/O, no tracee access. This
module is the only one that talks to capstone (decoding) and keystone (assembling);
their exceptions are translated where they enter.

Main pieces (see docs/design.md):

* :func:`decode`, :func:`iter_instructions`, :func:`is_instruction_start` -- decode with
  capstone and never guess instruction boundaries.
* :func:`classify_site` -- recognise the nop5 / nop1+nop5 / nop1+nop10 jump sites.
* :func:`seed_slot_code`, :func:`return_slot_code` -- the code of the two slot kinds,
  assembled by keystone from readable Intel-syntax source; :func:`seed_slot_code_at`
  and :func:`seed_restore_code`, a seed slot's way back when nobody finishes it.
* :func:`seed_slot_frame` -- how far a thread inside a seed slot has got (for detach).
* :func:`displaced_code` -- an out-of-line (XOL) copy of a displaced instruction.
* :func:`jmp_rel32`, :func:`rel32_reachable`, :func:`page_in_reach` -- rel32 reach.
* :data:`RETURN_TRAMPOLINES`, :func:`return_trampoline_code` -- the return trampoline
  of return probes and the frame it builds (docs/design.md, "Return probes").
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, Optional, Tuple

import capstone
import keystone
from capstone import x86_const as _x86

from ptprobe.errors import InstructionBoundaryError

__all__ = [
    "SLOT_SYSCALL_NR",
    "NOP5",
    "NOP10",
    "SEED_SLOT_SIZE",
    "SEED_SLOT_STRIDE",
    "SEED_RESTORE_OFFSET",
    "SEED_PAGE_SLOTS",
    "SEED_RESTORE_SOURCE",
    "RETURN_SLOT_SIZE",
    "RETURN_SLOT_JMP_OFFSET",
    "SLOT_SAVED_REGISTERS",
    "SLOT_SAVED",
    "SLOT_FRAME_SIZE",
    "PAGE_SIZE",
    "XOL_ENTRY_SIZE",
    "JMP_REL32_SIZE",
    "INT3",
    "SEED_SLOT_SOURCE",
    "RETURN_SLOT_TAIL_SOURCE",
    "FLOW_PLAIN",
    "FLOW_JMP",
    "FLOW_JCC",
    "FLOW_CALL",
    "FLOW_RET",
    "FLOW_LOOP",
    "FLOW_JMP_INDIRECT",
    "FLOW_CALL_INDIRECT",
    "FLOW_SPECIAL",
    "Instruction",
    "JmpSite",
    "SeedSlotProgress",
    "decode",
    "iter_instructions",
    "is_instruction_start",
    "require_instruction_start",
    "describe",
    "is_nop",
    "classify_site",
    "jmp_rel32",
    "rel32_reachable",
    "page_in_reach",
    "assemble",
    "seed_slot_code",
    "seed_slot_code_at",
    "seed_restore_code",
    "return_slot_code",
    "seed_slot_frame",
    "slot_index",
    "displaced_code",
    "ARGUMENT_REGISTERS",
    "ENDBR64",
    "ReturnTrampoline",
    "RETURN_TRAMPOLINES",
    "return_trampoline_code",
]

# --------------------------------------------------------------------------- constants

#: The syscall number every slot makes. Fixed here and nowhere else: below the x32 bit
#: (0x40000000), far above any number the kernel assigns, and not 335/336 (uretprobe /
#: uprobe, which seccomp passes through without running filters). Unintercepted, the
#: kernel answers it with -ENOSYS.
SLOT_SYSCALL_NR: int = 0x3FF0_7E57

#: The 5-byte NOP of a nop5 site (``nop dword ptr [rax+rax*1+0]``).
NOP5: bytes = bytes.fromhex("0f1f440000")
#: The 10-byte NOP of USDT nop1+nop10 sites (``nop word ptr cs:[rax+rax*1+0]``).
NOP10: bytes = bytes.fromhex("662e0f1f840000000000")

SEED_SLOT_SIZE: int = 16
RETURN_SLOT_SIZE: int = 64
PAGE_SIZE: int = 4096
#: Size of one out-of-line entry; :func:`displaced_code` always returns exactly this much.
XOL_ENTRY_SIZE: int = 32
JMP_REL32_SIZE: int = 5
INT3: int = 0xCC

#: Source (Intel syntax, hex literals: keystone 0.9.2 misreads AT&T decimals) of a seed
#: slot, and of the first 16 bytes of a self-returning slot. ``{nr:#x}`` is the syscall.
SEED_SLOT_SOURCE: str = (
    "lea rsp, [rsp - 0x80]\n"  # step over the 128-byte red zone
    "push rcx\n"  # syscall clobbers rcx
    "push r11\n"  # syscall clobbers r11
    "push rax\n"  # rax carries the syscall number
    "mov eax, {nr:#x}\n"
    "syscall\n"
)
#: Seed slots lie SEED_SLOT_STRIDE bytes apart: after the 16 bytes of the slot, a way
#: back for a syscall that returns because nobody finished the slot (the tracer was
#: killed, or a seccomp filter of the program's answered with an error):
#: ``call`` the page's restore routine, then ``jmp rel32`` to the site's resume address.
SEED_SLOT_STRIDE: int = 32
#: A seed page's restore routine sits in its last SEED_SLOT_STRIDE bytes, after
#: SEED_PAGE_SLOTS slots. Called from slot + 16 (the return address on top of the slot
#: frame), it reloads rax, r11 and rcx from the frame and returns over it: ``ret``
#: pops the return address and the frame (three registers, then the red zone), so
#: rsp is the program's again, the flags untouched, and the thread goes on at the
#: slot's ``jmp`` back to its site. Everything it reads lies at or above rsp (a signal
#: arriving meanwhile cannot overwrite it), and the call and ret pair up (a CET shadow
#: stack stays in step).
SEED_RESTORE_OFFSET: int = 4096 - SEED_SLOT_STRIDE
SEED_PAGE_SLOTS: int = SEED_RESTORE_OFFSET // SEED_SLOT_STRIDE
SEED_RESTORE_SOURCE: str = (
    "mov rax, qword ptr [rsp + 0x8]\n"
    "mov r11, qword ptr [rsp + 0x10]\n"
    "mov rcx, qword ptr [rsp + 0x18]\n"
    "ret 0x98\n"  # the return address, then SLOT_FRAME_SIZE bytes of frame
)
#: Offset of the ``jmp rel32`` back to the site in a seed slot (after ``call rel32``).
SEED_SLOT_JMP_OFFSET: int = 21

#: Source of the way back of a self-returning slot (before its final ``jmp rel32``).
#: ``lea`` rather than ``add``: the flags survive.
RETURN_SLOT_TAIL_SOURCE: str = (
    "pop rax\n"
    "pop r11\n"
    "pop rcx\n"
    "lea rsp, [rsp + 0x80]\n"
)
#: Offset of the ``jmp rel32`` back to the site's resume address in a self-returning slot.
RETURN_SLOT_JMP_OFFSET: int = 28

#: The frame a slot has built on the stack when its syscall stops the thread:
#: from rsp up, the program's rax, r11 and rcx (pushed in the reverse order), then
#: the 128-byte red zone. The program's rsp is rsp + SLOT_FRAME_SIZE. (The same as
#: ``seed_slot_frame(SEED_SLOT_SIZE)`` describes.)
SLOT_SAVED_REGISTERS: tuple = ("rax", "r11", "rcx")
SLOT_SAVED: struct.Struct = struct.Struct("<3Q")
SLOT_FRAME_SIZE: int = 0x80 + SLOT_SAVED.size

#: SysV integer argument registers, in order: a function's arguments at its entry.
ARGUMENT_REGISTERS: tuple = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")
#: ``endbr64``: a function that starts with it can be entered after it as well.
ENDBR64: bytes = bytes.fromhex("f30f1efa")

_INT32_MIN = -(1 << 31)
_INT32_MAX = (1 << 31) - 1
_ADDR_MASK = (1 << 64) - 1

# --------------------------------------------------------------------------- capstone

_tls = threading.local()


def _disassembler() -> capstone.Cs:
    """One capstone handle per OS thread (handles are not safe to share)."""
    md = getattr(_tls, "cs", None)
    if md is None:
        md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        md.detail = True
        _tls.cs = md
    return md


def _assembler() -> keystone.Ks:
    """One keystone handle per OS thread."""
    ks = getattr(_tls, "ks", None)
    if ks is None:
        ks = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_64)
        _tls.ks = ks
    return ks


# Control-flow kinds stored in Instruction.flow.
FLOW_PLAIN = "plain"  # falls through to the next instruction
FLOW_JMP = "jmp"  # jmp rel8/rel32
FLOW_JCC = "jcc"  # conditional jump rel8/rel32
FLOW_CALL = "call"  # call rel32
FLOW_RET = "ret"  # near ret / ret imm16
FLOW_LOOP = "loop"  # loop/loope/loopne/jrcxz/jecxz rel8
FLOW_JMP_INDIRECT = "jmp_indirect"  # jmp r/m64
FLOW_CALL_INDIRECT = "call_indirect"  # call r/m64
FLOW_SPECIAL = "special"  # cannot run out of line (int n, far branch, xbegin, ...)

_JCC_IDS = frozenset(
    {
        _x86.X86_INS_JA, _x86.X86_INS_JAE, _x86.X86_INS_JB, _x86.X86_INS_JBE,
        _x86.X86_INS_JE, _x86.X86_INS_JNE, _x86.X86_INS_JG, _x86.X86_INS_JGE,
        _x86.X86_INS_JL, _x86.X86_INS_JLE, _x86.X86_INS_JO, _x86.X86_INS_JNO,
        _x86.X86_INS_JP, _x86.X86_INS_JNP, _x86.X86_INS_JS, _x86.X86_INS_JNS,
    }
)
_LOOP_IDS = frozenset(
    {
        _x86.X86_INS_LOOP, _x86.X86_INS_LOOPE, _x86.X86_INS_LOOPNE,
        _x86.X86_INS_JRCXZ, _x86.X86_INS_JECXZ,
    }
)
_SPECIAL_IDS = frozenset(
    {
        _x86.X86_INS_SYSENTER, _x86.X86_INS_SYSEXIT,
        _x86.X86_INS_SYSEXITQ, _x86.X86_INS_SYSRET, _x86.X86_INS_SYSRETQ,
        _x86.X86_INS_UD0, _x86.X86_INS_UD1, _x86.X86_INS_UD2, _x86.X86_INS_HLT,
        _x86.X86_INS_LJMP, _x86.X86_INS_LCALL, _x86.X86_INS_RETF, _x86.X86_INS_RETFQ,
        _x86.X86_INS_IRET, _x86.X86_INS_IRETD, _x86.X86_INS_IRETQ,
        _x86.X86_INS_XBEGIN, _x86.X86_INS_JCXZ,
        _x86.X86_INS_VMCALL, _x86.X86_INS_VMMCALL,
    }
)
_SPECIAL_GROUPS = frozenset({_x86.X86_GRP_INT, _x86.X86_GRP_IRET, _x86.X86_GRP_PRIVILEGE})

# Legacy prefixes and REX, in the order they may precede an opcode.
_LEGACY_PREFIXES = frozenset({0x66, 0x67, 0xF0, 0xF2, 0xF3, 0x2E, 0x3E, 0x26, 0x36, 0x64, 0x65})


@dataclass(frozen=True)
class Instruction:
    """One decoded x86-64 instruction.

    ``flow`` is one of ``plain``, ``jmp``, ``jcc``, ``call``, ``ret``, ``loop``,
    ``jmp_indirect``, ``call_indirect`` or ``special`` (cannot be run out of line:
    int n, far branches, xbegin, eip-relative operands, ...).
    ``target`` is the absolute target of a direct (relative) branch, else None.
    ``rip_disp_offset`` is the offset in ``raw`` of the disp32 of a rip-relative memory
    operand, else None.
    """

    address: int
    size: int
    mnemonic: str
    op_str: str
    raw: bytes
    rip_disp_offset: int | None = None
    flow: str = FLOW_PLAIN
    target: int | None = None

    @property
    def end(self) -> int:
        """Address of the next instruction (``address + size``)."""
        return self.address + self.size

    @property
    def rip_target(self) -> int | None:
        """Effective address of the rip-relative memory operand, or None."""
        if self.rip_disp_offset is None:
            return None
        disp = _read_int32(self.raw, self.rip_disp_offset)
        return (self.end + disp) & _ADDR_MASK

    def __str__(self) -> str:
        return f"{self.address:#x}: {describe(self)}"


def _read_int32(data: bytes, offset: int) -> int:
    return int(struct.unpack_from("<i", data, offset)[0])


def _flow_of(ci: capstone.CsInsn) -> tuple[str, int | None]:
    """Classify a capstone instruction's control flow; return (flow, direct target)."""
    if ci.id == _x86.X86_INS_SYSCALL:
        # runs out of line like any plain instruction: it has no operand, a restart
        # (rip -= 2) runs the copy again, and the return address the kernel keeps in
        # rcx is a register the ABI lets syscall clobber. Stepping it in place, with
        # the other threads stopped, would stall on a blocking call and deadlock on vfork.
        return FLOW_PLAIN, None
    groups = set(ci.groups)
    if ci.id in _SPECIAL_IDS or groups & _SPECIAL_GROUPS:
        return FLOW_SPECIAL, None
    relative = _x86.X86_GRP_BRANCH_RELATIVE in groups
    target: int | None = None
    if relative:
        imms = [op.imm for op in ci.operands if op.type == _x86.X86_OP_IMM]
        if len(imms) != 1:
            return FLOW_SPECIAL, None
        target = imms[0] & _ADDR_MASK
    if not relative and ci.id in (_x86.X86_INS_JMP, _x86.X86_INS_CALL):
        # capstone 5 names far "ff /3" and "ff /5" plain call/jmp ("call ptr [rsp]").
        raw = bytes(ci.bytes)
        i = _skip_prefixes(raw)
        if i + 1 >= len(raw) or raw[i] != 0xFF or (raw[i + 1] >> 3) & 7 not in (2, 4):
            return FLOW_SPECIAL, None
    if ci.id == _x86.X86_INS_JMP:
        return (FLOW_JMP, target) if relative else (FLOW_JMP_INDIRECT, None)
    if ci.id == _x86.X86_INS_CALL:
        return (FLOW_CALL, target) if relative else (FLOW_CALL_INDIRECT, None)
    if ci.id in _JCC_IDS and relative:
        return FLOW_JCC, target
    if ci.id in _LOOP_IDS and relative:
        return FLOW_LOOP, target
    if ci.id == _x86.X86_INS_RET:
        return FLOW_RET, None
    if relative or _x86.X86_GRP_JUMP in groups or _x86.X86_GRP_CALL in groups or _x86.X86_GRP_RET in groups:
        return FLOW_SPECIAL, None  # some branch this module does not know
    return FLOW_PLAIN, None


def _from_capstone(ci: capstone.CsInsn) -> Instruction:
    flow, target = _flow_of(ci)
    rip_disp_offset: int | None = None
    for op in ci.operands:
        if op.type != _x86.X86_OP_MEM:
            continue
        if op.mem.base == _x86.X86_REG_RIP:
            # rip-relative is always ModRM mod=00 rm=101 followed by a disp32. Do not trust
            # capstone's disp_size (5.0 reports 2 for "66 0f 6f 05 <disp32>"); check that
            # the bytes at disp_offset are the ModRM's disp32 and hold the reported value.
            off = int(ci.disp_offset)
            raw = bytes(ci.bytes)
            if (
                0 < off <= ci.size - 4
                and raw[off - 1] & 0xC7 == 0x05
                and _read_int32(raw, off) == op.mem.disp
            ):
                rip_disp_offset = off
            else:  # refuse to relocate what we cannot locate
                flow = FLOW_SPECIAL
        elif op.mem.base == _x86.X86_REG_EIP:
            flow = FLOW_SPECIAL  # 32-bit wrap-around: not relocatable
    return Instruction(
        address=int(ci.address),
        size=int(ci.size),
        mnemonic=str(ci.mnemonic),
        op_str=str(ci.op_str),
        raw=bytes(ci.bytes),
        rip_disp_offset=rip_disp_offset,
        flow=flow,
        target=target,
    )


def _disasm(code: bytes, address: int, count: int = 0) -> Iterator[capstone.CsInsn]:
    try:
        yield from _disassembler().disasm(bytes(code), address, count)
    except capstone.CsError as exc:  # pragma: no cover - capstone only fails on misuse
        raise ValueError(f"capstone failed to decode at {address:#x}: {exc}") from exc


def decode(code: bytes, address: int) -> Instruction | None:
    """Decode the first instruction of ``code`` (located at ``address``).

    Returns None when the bytes are not a valid instruction (or are truncated).
    """
    for ci in _disasm(code[:15], address, 1):
        return _from_capstone(ci)
    return None


def iter_instructions(code: bytes, address: int) -> Iterator[Instruction]:
    """Linear sweep over ``code`` (located at ``address``); stops at the first undecodable byte."""
    for ci in _disasm(code, address):
        yield _from_capstone(ci)


def is_instruction_start(code: bytes, start: int, target: int) -> bool:
    """True if a linear sweep of ``code`` (a function beginning at ``start``) hits ``target``."""
    if not start <= target < start + len(code):
        return False
    for insn in iter_instructions(code, start):
        if insn.address == target:
            return True
        if insn.address > target:
            return False
    return False


def require_instruction_start(code: bytes, start: int, target: int) -> Instruction:
    """Return the instruction at ``target``, found by linear sweep of ``code`` from ``start``.

    Raises :class:`InstructionBoundaryError` (naming the instruction that covers
    ``target``, when there is one) if ``target`` is not an instruction start.
    """
    if start <= target < start + len(code):
        for insn in iter_instructions(code, start):
            if insn.address == target:
                return insn
            if insn.address < target < insn.end:
                raise InstructionBoundaryError(
                    f"{target:#x} is not an instruction start: it is byte "
                    f"{target - insn.address} of `{describe(insn)}` at {insn.address:#x}",
                    target,
                )
            if insn.address > target:
                break
        else:
            raise InstructionBoundaryError(
                f"{target:#x} is not an instruction start: code from {start:#x} "
                "does not decode up to it",
                target,
            )
    raise InstructionBoundaryError(
        f"{target:#x} is not an instruction start of the code at {start:#x}", target
    )


def describe(insn: Instruction) -> str:
    """Readable text of an instruction, e.g. ``push rbp`` or ``ret``."""
    return f"{insn.mnemonic} {insn.op_str}".strip()


def _skip_prefixes(raw: bytes) -> int:
    """Index of the opcode byte: after legacy prefixes and one optional REX."""
    i = 0
    while i < len(raw) and raw[i] in _LEGACY_PREFIXES:
        i += 1
    if i < len(raw) and 0x40 <= raw[i] <= 0x4F:
        i += 1
    return i


def is_nop(insn: Instruction) -> bool:
    """True if ``insn`` is a NOP that may be emulated by ``rip += size``.

    Accepted: ``90`` (capstone reports ``41 90`` as ``xchg r8d, eax``, which it is),
    ``66 90`` / ``48 90``, and ``0f 1f /0`` of any length with segment / operand-size
    prefixes. Not accepted: ``pause`` (f3 90), ``fnop``, ``xchg eax, eax`` (zero-extends
    rax), endbr64, hint NOPs outside ``0f 1f /0``, anything with a lock/rep prefix.
    """
    if insn.mnemonic != "nop":
        return False
    raw = insn.raw
    i = _skip_prefixes(raw)
    if any(b in (0xF0, 0xF2, 0xF3, 0x67) for b in raw[:i]):
        return False
    op = raw[i:]
    if op == b"\x90":
        return not (i > 0 and 0x40 <= raw[i - 1] <= 0x4F and raw[i - 1] & 1)
    return len(op) >= 3 and op[0] == 0x0F and op[1] == 0x1F and (op[2] >> 3) & 7 == 0


# --------------------------------------------------------------------------- probe sites


@dataclass(frozen=True)
class JmpSite:
    """A site that can take a ``jmp rel32``: where the jmp goes and where the thread resumes.

    ``kind`` is ``nop5``, ``nop1+nop5``, ``nop1+nop10`` or ``5*nop1`` (the five one-byte
    NOPs of ``gcc -fpatchable-function-entry=5``: a thread may sit between them, so
    they are patched only after such threads are moved past them); ``jmp_offset``
    (0 or 1) and ``resume_offset`` (5, 6 or 11) are relative to the probe (note)
    address.
    """

    kind: str
    jmp_offset: int
    resume_offset: int


_SITE_NOP5 = JmpSite("nop5", 0, 5)
_SITE_NOP1_NOP5 = JmpSite("nop1+nop5", 1, 6)
_SITE_NOP1_NOP10 = JmpSite("nop1+nop10", 1, 11)
_SITE_5_NOP1 = JmpSite("5*nop1", 0, 5)


def classify_site(code: bytes, entry_nops: bool = False) -> JmpSite | None:
    """Recognise a jmp-capable probe site from the bytes at the probe address (exact bytes only).

    Five one-byte NOPs are a site only with *entry_nops*: at a function's patchable
    entry (``-fpatchable-function-entry=5``); elsewhere a run of NOPs may be padding
    that a branch enters in the middle."""
    code = bytes(code)
    if code[:5] == NOP5:
        return _SITE_NOP5
    if code[:1] == b"\x90":
        if code[1:6] == NOP5:
            return _SITE_NOP1_NOP5
        if code[1:11] == NOP10:
            return _SITE_NOP1_NOP10
        if entry_nops and code[1:5] == b"\x90" * 4:
            return _SITE_5_NOP1
    return None


# --------------------------------------------------------------------------- reach


def rel32_reachable(src_end: int, dst: int) -> bool:
    """True if ``dst - src_end`` fits a signed 32-bit displacement."""
    return _INT32_MIN <= dst - src_end <= _INT32_MAX


def jmp_rel32(src: int, dst: int) -> bytes:
    """``e9 rel32`` for a jmp located at ``src`` going to ``dst``; ValueError if out of reach."""
    return _rel32_insn(b"\xe9", src, dst)


def _rel32_insn(opcode: bytes, src: int, dst: int) -> bytes:
    end = src + len(opcode) + 4
    if not rel32_reachable(end, dst):
        raise ValueError(f"{dst:#x} is out of rel32 reach of a branch at {src:#x}")
    return opcode + struct.pack("<i", dst - end)


#: Extra bytes of margin on each side in :func:`page_in_reach`.
_REACH_MARGIN = 64


def page_in_reach(page: int, addresses: Iterable[int]) -> bool:
    """True if every byte of ``[page, page + PAGE_SIZE)`` is within rel32 reach of each address.

    Both directions are checked (a jmp at the address into any byte of the page, and a
    jmp from any byte of the page back to the address), with a margin of 64 bytes
    around both the page and each address. ``page`` must be page-aligned.
    """
    if page % PAGE_SIZE:
        raise ValueError(f"page address {page:#x} is not page-aligned")
    lo = page - _REACH_MARGIN
    hi = page + PAGE_SIZE + _REACH_MARGIN
    for address in addresses:
        a_lo = address - _REACH_MARGIN
        a_hi = address + _REACH_MARGIN
        # The extreme differences between the two ranges, in both directions.
        if not (rel32_reachable(a_lo, hi) and rel32_reachable(hi, a_lo)):
            return False
        if not (rel32_reachable(a_hi, lo) and rel32_reachable(lo, a_hi)):
            return False
    return True


# --------------------------------------------------------------------------- assembling


def assemble(source: str, address: int = 0) -> bytes:
    """Assemble Intel-syntax ``source`` (one instruction per line or ``;``-separated) at ``address``.

    Use hex literals. Raises ValueError with keystone's message on failure.
    """
    try:
        encoding, _count = _assembler().asm(source, address)
    except keystone.KsError as exc:
        raise ValueError(f"cannot assemble {source!r}: {exc}") from exc
    if not encoding:
        if source.strip():
            raise ValueError(f"cannot assemble {source!r}: no code produced")
        return b""
    return bytes(encoding)


_slot_cache: dict[tuple[str, int], bytes] = {}


def _cached_assemble(key: str, source: str, nr: int) -> bytes:
    code = _slot_cache.get((key, nr))
    if code is None:
        code = assemble(source)
        _slot_cache[(key, nr)] = code
    return code


def seed_slot_code(nr: int = SLOT_SYSCALL_NR) -> bytes:
    """The 16 bytes of a seed slot (docs/design.md, "Slots and pages") making syscall ``nr``."""
    if not 0 <= nr <= 0xFFFF_FFFF:
        raise ValueError(f"syscall number {nr:#x} does not fit in 32 bits")
    code = _cached_assemble("seed", SEED_SLOT_SOURCE.format(nr=nr), nr)
    if len(code) != SEED_SLOT_SIZE:  # pragma: no cover - keystone picked another encoding
        raise ValueError(f"seed slot assembled to {len(code)} bytes, not {SEED_SLOT_SIZE}")
    return code


def seed_slot_code_at(slot_address: int, resume_address: int, nr: int = SLOT_SYSCALL_NR) -> bytes:
    """The SEED_SLOT_STRIDE bytes of the seed slot at ``slot_address`` (in a seed page)
    serving a site that resumes at ``resume_address``: the 16 bytes of
    :func:`seed_slot_code`, ``call`` the page's restore routine, ``jmp rel32`` to the
    resume address, padded with int3. The tracer finishes a hit at the syscall and
    never lets the thread run past it; the rest is for a syscall that returns."""
    restore = (slot_address & ~(PAGE_SIZE - 1)) + SEED_RESTORE_OFFSET
    code = (seed_slot_code(nr) + _rel32_insn(b"\xe8", slot_address + SEED_SLOT_SIZE, restore)
            + jmp_rel32(slot_address + SEED_SLOT_JMP_OFFSET, resume_address))
    return code.ljust(SEED_SLOT_STRIDE, bytes([INT3]))


def seed_restore_code() -> bytes:
    """The SEED_SLOT_STRIDE bytes at SEED_RESTORE_OFFSET of a seed page (see
    SEED_RESTORE_SOURCE), padded with int3."""
    code = _cached_assemble("restore", SEED_RESTORE_SOURCE, 0)
    if len(code) > SEED_SLOT_STRIDE:  # pragma: no cover
        raise ValueError(f"seed restore routine assembled to {len(code)} bytes")
    return code.ljust(SEED_SLOT_STRIDE, bytes([INT3]))


def return_slot_code(slot_address: int, resume_address: int, nr: int = SLOT_SYSCALL_NR) -> bytes:
    """The 64 bytes of a self-returning slot at ``slot_address`` that resumes at ``resume_address``.

    The seed bytes, then ``pop rax; pop r11; pop rcx; lea rsp, [rsp + 0x80]``, then
    ``jmp rel32 resume_address`` at offset 28, padded with int3. ValueError if the
    resume address is out of rel32 reach.
    """
    tail = _cached_assemble("tail", RETURN_SLOT_TAIL_SOURCE, 0)
    head = seed_slot_code(nr) + tail
    if len(head) != RETURN_SLOT_JMP_OFFSET:  # pragma: no cover
        raise ValueError(f"return slot head assembled to {len(head)} bytes")
    code = head + jmp_rel32(slot_address + RETURN_SLOT_JMP_OFFSET, resume_address)
    return code.ljust(RETURN_SLOT_SIZE, bytes([INT3]))


def slot_index(rip: int, page: int, stride: int) -> int | None:
    """Index of the slot of ``page`` whose syscall ``rip`` (just after it) belongs to, or None.

    ``stride`` is SEED_SLOT_SIZE or RETURN_SLOT_SIZE (docs/design.md, "Catching a slot's syscall").
    """
    if not page < rip <= page + PAGE_SIZE:
        return None
    delta = rip - page - SEED_SLOT_SIZE
    if delta < 0 or delta % stride:
        return None
    index = delta // stride
    return index if index < PAGE_SIZE // stride else None


@dataclass(frozen=True)
class SeedSlotProgress:
    """What a thread stopped at ``offset`` inside a seed slot has already done.

    ``red_zone_skipped``: ``lea rsp, [rsp - 0x80]`` has run.
    ``pushed``: registers pushed, in push order (``rcx``, ``r11``, ``rax``).
    ``clobbered``: registers whose program value is now only on the stack (``rax``
    after ``mov eax``; ``rcx`` and ``r11`` too after the syscall).
    """

    offset: int
    red_zone_skipped: bool
    pushed: tuple[str, ...]
    clobbered: tuple[str, ...]

    @property
    def frame_size(self) -> int:
        """How far rsp is below the program's rsp."""
        return (0x80 if self.red_zone_skipped else 0) + 8 * len(self.pushed)

    def program_rsp(self, rsp: int) -> int:
        """The program's rsp, given the thread's current rsp."""
        return rsp + self.frame_size

    def stack_offsets(self) -> dict[str, int]:
        """Offset from the current rsp of each pushed register's saved value."""
        return {reg: 8 * i for i, reg in enumerate(reversed(self.pushed))}


_SEED_PROGRESS: dict[int, SeedSlotProgress] = {
    0: SeedSlotProgress(0, False, (), ()),
    5: SeedSlotProgress(5, True, (), ()),
    6: SeedSlotProgress(6, True, ("rcx",), ()),
    8: SeedSlotProgress(8, True, ("rcx", "r11"), ()),
    9: SeedSlotProgress(9, True, ("rcx", "r11", "rax"), ()),
    14: SeedSlotProgress(14, True, ("rcx", "r11", "rax"), ("rax",)),
    16: SeedSlotProgress(16, True, ("rcx", "r11", "rax"), ("rax", "r11", "rcx")),
}


def seed_slot_frame(offset: int) -> SeedSlotProgress:
    """Describe a thread whose rip is ``slot + offset`` inside a seed slot.

    To finish the slot by hand: read each register in ``clobbered`` from
    ``rsp + stack_offsets()[reg]``, set rsp to ``program_rsp(rsp)`` and rip to the
    resume address. Valid offsets are 0, 5, 6, 8, 9, 14 and 16; ValueError otherwise.
    Also valid for the first 16 bytes of a self-returning slot.
    """
    try:
        return _SEED_PROGRESS[offset]
    except KeyError:
        raise ValueError(
            f"offset {offset} is not an instruction boundary of a seed slot "
            f"(expected one of {sorted(_SEED_PROGRESS)})"
        ) from None


# --------------------------------------------------------------------------- out of line


def _relocated(insn: Instruction, at: int, raw: bytes | None = None) -> bytes | None:
    """``raw`` (default ``insn.raw``) placed at ``at``, its rip-relative disp32 patched.

    ``raw`` must have the same length and disp32 offset as ``insn.raw``. None if the
    operand's effective address is out of rel32 reach from ``at``.
    """
    code = bytes(insn.raw if raw is None else raw)
    off = insn.rip_disp_offset
    if off is None:
        return code
    ea = insn.end + _read_int32(insn.raw, off)
    new_disp = ea - (at + insn.size)
    if not _INT32_MIN <= new_disp <= _INT32_MAX:
        return None
    return code[:off] + struct.pack("<i", new_disp) + code[off + 4 :]


def _jmp_or_none(src: int, dst: int) -> bytes | None:
    try:
        return jmp_rel32(src, dst)
    except ValueError:
        return None


def _has_prefix(insn: Instruction, prefix: int) -> bool:
    return prefix in insn.raw[: _skip_prefixes(insn.raw)]


def _push_return_address(ret: int) -> bytes:
    """``push imm32`` (sign-extended low half) then ``mov dword [rsp+4], high half``.

    Leaves the 64-bit ``ret`` on the stack exactly as a call would, without touching
    flags or registers other than rsp.
    """
    lo = ret & 0xFFFF_FFFF
    hi = (ret >> 32) & 0xFFFF_FFFF
    return b"\x68" + struct.pack("<I", lo) + b"\xc7\x44\x24\x04" + struct.pack("<I", hi)


def _pad(code: bytes | None) -> bytes | None:
    if code is None or len(code) > XOL_ENTRY_SIZE:
        return None
    return code.ljust(XOL_ENTRY_SIZE, bytes([INT3]))


def displaced_code(
    insn: Instruction, xol_address: int, *, keep_return_address: bool = False
) -> bytes | None:
    """Out-of-line code at ``xol_address`` with the effect of ``insn`` executed in place.

    The result is exactly XOL_ENTRY_SIZE bytes (padded with int3); after the displaced
    instruction it continues at ``insn.end`` or at the instruction's own target:

    * plain instructions: a copy (rip-relative disp32 patched) then ``jmp insn.end``;
    * ``jmp rel`` -> ``jmp rel32 target``; ``jcc rel`` -> ``jcc rel32 target; jmp end``;
    * ``call rel32`` -> ``call rel32 target; jmp end``: the callee returns into the XOL
      entry (so the return address the callee sees is in the XOL page, but a CET shadow
      stack stays in step). With ``keep_return_address=True`` the call pushes
      ``insn.end`` itself and jumps (the callee sees the true return address; not
      shadow-stack safe);
    * ``ret`` / ``ret imm16``, indirect ``jmp``: a copy; indirect ``call``: a copy then
      ``jmp end`` (or, with ``keep_return_address``, push + the jmp form, when the
      operand does not involve rsp);
    * loop/loope/loopne/jrcxz/jecxz: the real instruction to a local trampoline.

    Returns None when this cannot be done correctly: a target, memory operand or the
    way back out of rel32 reach, an operand-size prefix on a relative branch, or an
    instruction of flow ``special`` (int n, far branches, xbegin, ...). The
    caller should then single-step the original instruction instead.
    """
    x = xol_address
    flow = insn.flow
    if flow == FLOW_SPECIAL:
        return None
    if flow in (FLOW_JMP, FLOW_JCC, FLOW_CALL, FLOW_LOOP):
        assert insn.target is not None
        if _has_prefix(insn, 0x66):
            return None  # 16-bit operand size truncates rip on some CPUs
        target = insn.target
        if flow == FLOW_JMP:
            return _pad(_jmp_or_none(x, target))
        if flow == FLOW_JCC:
            op = insn.raw[_skip_prefixes(insn.raw) :]
            if 0x70 <= op[0] <= 0x7F:
                cc = op[0] & 0x0F
            elif op[0] == 0x0F and len(op) > 1 and 0x80 <= op[1] <= 0x8F:
                cc = op[1] & 0x0F
            else:
                return None
            try:
                jcc = _rel32_insn(bytes([0x0F, 0x80 | cc]), x, target)
            except ValueError:
                return None
            back = _jmp_or_none(x + len(jcc), insn.end)
            return None if back is None else _pad(jcc + back)
        if flow == FLOW_CALL:
            if keep_return_address:
                push = _push_return_address(insn.end)
                jmp = _jmp_or_none(x + len(push), target)
                return None if jmp is None else _pad(push + jmp)
            try:
                call = _rel32_insn(b"\xe8", x, target)
            except ValueError:
                return None
            back = _jmp_or_none(x + len(call), insn.end)
            return None if back is None else _pad(call + back)
        # FLOW_LOOP: [prefixes] opcode rel8=+2; jmp short +5; jmp target; jmp back.
        loop = insn.raw[:-1] + b"\x02"
        n = len(loop)
        to_target = _jmp_or_none(x + n + 2, target)
        back = _jmp_or_none(x + n + 7, insn.end)
        if to_target is None or back is None:
            return None
        return _pad(loop + b"\xeb\x05" + to_target + back)
    if flow == FLOW_CALL_INDIRECT and keep_return_address:
        i = _skip_prefixes(insn.raw)
        if i + 1 >= insn.size or insn.raw[i] != 0xFF or (insn.raw[i + 1] >> 3) & 7 != 2:
            return None
        if "sp" in insn.op_str:  # rsp/esp/spl operand: the push would move it
            return None
        as_jmp = bytearray(insn.raw)
        as_jmp[i + 1] = (as_jmp[i + 1] & 0xC7) | (4 << 3)  # ff /2 -> ff /4
        push = _push_return_address(insn.end)
        body = _relocated(insn, x + len(push), bytes(as_jmp))
        return None if body is None else _pad(push + body)
    body = _relocated(insn, x)
    if body is None:
        return None
    if flow in (FLOW_RET, FLOW_JMP_INDIRECT):
        return _pad(body)
    back = _jmp_or_none(x + len(body), insn.end)  # plain, call_indirect
    return None if back is None else _pad(body + back)


# --------------------------------------------------------------------------- return trampolines


@dataclass(frozen=True)
class ReturnTrampoline:
    """One form of the return trampoline (docs/design.md, "Return probes").

    A return probe replaces a function's return address with the trampoline's
    address; the function's ``ret`` lands on its first byte with rsp one word
    above the *slot*, the stack word that held the return address (the entry
    rsp). Every form first steps back onto the slot (``lea rsp, [rsp - 8]``, no
    flags changed), stops, and ends with ``ret``: the tracer writes the original
    return address into the slot at the stop, so the thread returns there with
    every register as the function left it.

    ``stop_offset``: rip at the stop, from the trampoline's start. ``slot_offset``:
    the slot, from rsp at the stop. ``saved``: registers the form keeps on the
    stack at the stop, from rsp up (their program values; the registers hold
    something else). ``idle``: (offset, bytes) that make the trampoline stop no
    more (written at detach: a thread a signal handler interrupted inside it then
    goes back to the slot, which holds the original address again), or None when
    it needs no change (the syscall of the ``syscall`` form fails with ENOSYS
    once no tracer is there, and the rest of the code runs on).
    """

    form: str
    source: str
    stop_offset: int
    slot_offset: int
    saved: Tuple[str, ...]
    idle: Optional[Tuple[int, bytes]]


#: The forms: ``syscall`` (the slot syscall, caught by ptprobe's seccomp filter:
#: the same stop as a slot's) and ``int3`` (no filter).
RETURN_TRAMPOLINES: Dict[str, ReturnTrampoline] = {
    "syscall": ReturnTrampoline(
        "syscall",
        "lea rsp, [rsp - 0x8]\n"   # back onto the slot
        "push rcx\n"
        "push r11\n"
        "push rax\n"               # rax:rdx hold the return value
        "mov eax, {nr:#x}\n"
        "syscall\n"                # the stop; the tracer writes the slot
        "pop rax\n"
        "pop r11\n"
        "pop rcx\n"
        "ret\n",
        stop_offset=16, slot_offset=8 * len(SLOT_SAVED_REGISTERS), saved=SLOT_SAVED_REGISTERS, idle=None),
    "int3": ReturnTrampoline(
        "int3",
        "lea rsp, [rsp - 0x8]\n"
        "int3\n"                   # the stop (rip one past it); the tracer writes the slot
        "ret\n",
        stop_offset=6, slot_offset=0, saved=(), idle=(5, b"\x90")),
}


def return_trampoline_code(form: str, nr: int = SLOT_SYSCALL_NR) -> bytes:
    """The XOL_ENTRY_SIZE bytes of return trampoline *form* (padded with int3)."""
    trampoline = RETURN_TRAMPOLINES[form]
    code = _cached_assemble("ret-" + form, trampoline.source.format(nr=nr), nr)
    if form == "syscall" and code[:SEED_SLOT_SIZE][-2:] != b"\x0f\x05":  # pragma: no cover
        raise ValueError("return trampoline: the syscall is not where its stop is expected")
    return code.ljust(XOL_ENTRY_SIZE, bytes([INT3]))

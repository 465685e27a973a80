"""Tests of ptprobe.arch with real capstone and keystone (no mocks)."""

from __future__ import annotations

import struct

import pytest

from ptprobe import arch
from ptprobe.arch import Instruction
from ptprobe.errors import InstructionBoundaryError

SITE = 0x401000
XOL = 0x500000  # a nearby out-of-line page
FAR = 0x7F00_0000_0000  # out of rel32 reach of SITE

# Bytes from docs/design.md, "Slots and pages".
SEED_HEX = "48 8d 64 24 80 51 41 53 50 b8 57 7e f0 3f 0f 05"
TAIL_HEX = "58 41 5b 59 48 8d a4 24 80 00 00 00"


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def insn_at(hex_bytes: str, address: int = SITE) -> Instruction:
    insn = arch.decode(h(hex_bytes), address)
    assert insn is not None, hex_bytes
    return insn


def xol_listing(code: bytes, address: int = XOL) -> list[Instruction]:
    """Decode an XOL entry, dropping the int3 padding."""
    assert len(code) == arch.XOL_ENTRY_SIZE
    out = []
    for insn in arch.iter_instructions(code, address):
        if insn.mnemonic == "int3":
            assert code[insn.address - address :] == b"\xcc" * (len(code) - (insn.address - address))
            break
        out.append(insn)
    return out


# --------------------------------------------------------------------------- constants and slots


def test_slot_syscall_number_is_unassigned_and_below_x32() -> None:
    assert arch.SLOT_SYSCALL_NR == 0x3FF07E57
    assert arch.SLOT_SYSCALL_NR < 0x40000000
    assert arch.SLOT_SYSCALL_NR not in (335, 336)
    assert arch.NOP5 == h("0f 1f 44 00 00")


def test_seed_slot_bytes_are_pinned() -> None:
    code = arch.seed_slot_code()
    assert code == h(SEED_HEX)
    assert len(code) == arch.SEED_SLOT_SIZE
    assert arch.seed_slot_code(0x1234) == h("48 8d 64 24 80 51 41 53 50 b8 34 12 00 00 0f 05")


def test_seed_slot_decodes_as_designed() -> None:
    listing = [arch.describe(i) for i in arch.iter_instructions(arch.seed_slot_code(), 0)]
    assert listing == [
        "lea rsp, [rsp - 0x80]",
        "push rcx",
        "push r11",
        "push rax",
        "mov eax, 0x3ff07e57",
        "syscall",
    ]


def test_seed_slot_rejects_oversized_number() -> None:
    with pytest.raises(ValueError):
        arch.seed_slot_code(1 << 32)


def test_seed_slot_with_its_way_back_is_pinned() -> None:
    """A seed slot in its page: the 16 bytes, ``call`` the page's restore routine,
    ``jmp`` back to the site (for a syscall nobody finished), padded to the stride."""
    page, resume = 0x7000_0000, 0x7000_9000
    slot = page + 3 * arch.SEED_SLOT_STRIDE
    code = arch.seed_slot_code_at(slot, resume)
    restore = page + arch.SEED_RESTORE_OFFSET
    call = b"\xe8" + struct.pack("<i", restore - (slot + 16 + 5))
    jmp = b"\xe9" + struct.pack("<i", resume - (slot + 21 + 5))
    assert code == h(SEED_HEX) + call + jmp + b"\xcc" * 6
    assert (arch.SEED_SLOT_STRIDE, arch.SEED_RESTORE_OFFSET, arch.SEED_PAGE_SLOTS) == (32, 4064, 127)
    listing = [arch.describe(i) for i in arch.iter_instructions(code[16:26], slot + 16)]
    assert listing == [f"call {restore:#x}", f"jmp {resume:#x}"]


def test_seed_restore_routine_is_pinned() -> None:
    """mov rax/r11/rcx from the slot frame above the return address, then ``ret 0x98``:
    the return address and the frame (SLOT_FRAME_SIZE) popped, rsp the program's."""
    code = arch.seed_restore_code()
    assert code == h("48 8b 44 24 08 4c 8b 5c 24 10 48 8b 4c 24 18 c2 98 00") + b"\xcc" * 14
    assert arch.SLOT_FRAME_SIZE == 0x98
    listing = [arch.describe(i) for i in arch.iter_instructions(code[:18], 0)]
    assert listing == ["mov rax, qword ptr [rsp + 8]", "mov r11, qword ptr [rsp + 0x10]",
                       "mov rcx, qword ptr [rsp + 0x18]", "ret 0x98"]
    # the three registers in the order the slot pushed them (rax on top)
    assert arch.SLOT_SAVED_REGISTERS == ("rax", "r11", "rcx")


def test_return_slot_bytes_are_pinned() -> None:
    slot, resume = 0x10000, 0x20000
    code = arch.return_slot_code(slot, resume)
    rel = resume - (slot + 28 + 5)
    expected = h(SEED_HEX) + h(TAIL_HEX) + b"\xe9" + struct.pack("<i", rel)
    assert code == expected + b"\xcc" * (64 - len(expected))
    assert len(code) == arch.RETURN_SLOT_SIZE
    assert arch.RETURN_SLOT_JMP_OFFSET == 28


def test_return_slot_jumps_back_to_resume_address() -> None:
    slot, resume = 0x7F12_3456_7000, 0x7F12_3400_1006  # backwards jump
    insns = list(arch.iter_instructions(arch.return_slot_code(slot, resume), slot))
    assert [i.mnemonic for i in insns[6:11]] == ["pop", "pop", "pop", "lea", "jmp"]
    assert arch.describe(insns[9]) == "lea rsp, [rsp + 0x80]"
    assert insns[10].target == resume
    assert all(i.mnemonic == "int3" for i in insns[11:])


def test_return_slot_out_of_reach_raises() -> None:
    with pytest.raises(ValueError):
        arch.return_slot_code(0x10000, FAR)


def test_seed_slot_frame_offsets_are_instruction_boundaries() -> None:
    starts = [i.address for i in arch.iter_instructions(arch.seed_slot_code(), 0)] + [16]
    assert starts == [0, 5, 6, 8, 9, 14, 16]
    for offset in starts:
        assert arch.seed_slot_frame(offset).offset == offset
    for bad in (1, 4, 7, 10, 15, 17, -1):
        with pytest.raises(ValueError):
            arch.seed_slot_frame(bad)


def test_seed_slot_frame_contents() -> None:
    rsp = 0x7FFF_0000_1000
    nothing = arch.seed_slot_frame(0)
    assert (nothing.red_zone_skipped, nothing.pushed, nothing.program_rsp(rsp)) == (False, (), rsp)
    assert arch.seed_slot_frame(5).program_rsp(rsp) == rsp + 0x80
    assert arch.seed_slot_frame(6).pushed == ("rcx",)
    assert arch.seed_slot_frame(8).stack_offsets() == {"r11": 0, "rcx": 8}
    full = arch.seed_slot_frame(9)
    assert full.program_rsp(rsp) == rsp + 152
    assert full.stack_offsets() == {"rax": 0, "r11": 8, "rcx": 16}
    assert full.clobbered == ()
    assert arch.seed_slot_frame(14).clobbered == ("rax",)
    after = arch.seed_slot_frame(16)
    assert set(after.clobbered) == {"rax", "rcx", "r11"}
    assert after.program_rsp(rsp) == rsp + 152


def test_slot_index() -> None:
    page = 0x7000_0000
    assert arch.slot_index(page + 16, page, 16) == 0
    assert arch.slot_index(page + 16 + 5 * 64, page, 64) == 5
    assert arch.slot_index(page + 4096, page, 16) == 255
    assert arch.slot_index(page + 4096, page, 64) is None  # 4080 is not 16 + k*64
    assert arch.slot_index(page + 4096 - 48, page, 64) == 63
    assert arch.slot_index(page + 17, page, 16) is None
    assert arch.slot_index(page, page, 16) is None
    assert arch.slot_index(page + 8, page, 16) is None


# --------------------------------------------------------------------------- assembling


def test_assemble_and_errors() -> None:
    assert arch.assemble("push rbp; mov rbp, rsp") == h("55 48 89 e5")
    assert arch.assemble("") == b""
    with pytest.raises(ValueError, match="cannot assemble"):
        arch.assemble("frobnicate rax")


# --------------------------------------------------------------------------- decoding


def test_decode_fields() -> None:
    insn = insn_at("8b 05 00 01 00 00")
    assert (insn.size, insn.mnemonic, arch.describe(insn)) == (6, "mov", "mov eax, dword ptr [rip + 0x100]")
    assert insn.rip_disp_offset == 2
    assert insn.rip_target == SITE + 6 + 0x100
    assert insn.flow == "plain"
    assert insn_at("48 89 e5").rip_disp_offset is None
    # disp32 followed by an imm32: the offset must be that of the disp
    store = insn_at("c7 05 f0 ff ff ff 01 00 00 00")
    assert store.rip_disp_offset == 2
    assert store.rip_target == SITE + 10 - 0x10


def test_decode_invalid_and_truncated() -> None:
    assert arch.decode(b"\x06", SITE) is None  # push es: invalid in 64-bit mode
    assert arch.decode(b"\x0f", SITE) is None
    assert arch.decode(b"", SITE) is None


@pytest.mark.parametrize(
    "hex_bytes,flow,target",
    [
        ("eb 10", "jmp", SITE + 0x12),
        ("e9 00 01 00 00", "jmp", SITE + 0x105),
        ("74 fe", "jcc", SITE),
        ("0f 8c 00 00 00 70", "jcc", SITE + 6 + 0x70000000),
        ("e8 00 00 00 00", "call", SITE + 5),
        ("e2 fe", "loop", SITE),
        ("c3", "ret", None),
        ("c2 08 00", "ret", None),
        ("ff e0", "jmp_indirect", None),
        ("ff 15 00 10 00 00", "call_indirect", None),
        ("0f 05", "plain", None),  # syscall: runs out of line
        ("cc", "special", None),
        ("c7 f8 00 00 00 00", "special", None),  # xbegin
        ("ff 2c 24", "special", None),  # jmp far [rsp] (capstone: "jmp ptr [rsp]")
        ("ff 1c 24", "special", None),  # call far [rsp] (capstone: "call ptr [rsp]")
        ("48 ff 2c 24", "special", None),  # ljmp [rsp]
        ("8b 05 00 01 00 00", "plain", None),
    ],
)
def test_decode_flow(hex_bytes: str, flow: str, target: int | None) -> None:
    insn = insn_at(hex_bytes)
    assert (insn.flow, insn.target) == (flow, target)


def test_iter_instructions_stops_at_invalid_byte() -> None:
    code = h("55 48 89 e5 06 c3")
    assert [i.address for i in arch.iter_instructions(code, SITE)] == [SITE, SITE + 1]


FUNC_SOURCE = "push rbp; mov rbp, rsp; mov eax, dword ptr [rip + 0x100]; ret"


def test_is_instruction_start_on_real_code() -> None:
    code = arch.assemble(FUNC_SOURCE, SITE)
    assert code == h("55 48 89 e5 8b 05 00 01 00 00 c3")
    starts = {SITE, SITE + 1, SITE + 4, SITE + 10}
    for address in range(SITE - 1, SITE + len(code) + 2):
        assert arch.is_instruction_start(code, SITE, address) == (address in starts), hex(address)


def test_require_instruction_start() -> None:
    code = arch.assemble(FUNC_SOURCE, SITE)
    assert arch.require_instruction_start(code, SITE, SITE + 4).mnemonic == "mov"
    with pytest.raises(InstructionBoundaryError, match="byte 2 of `mov eax") as info:
        arch.require_instruction_start(code, SITE, SITE + 6)
    assert info.value.address == SITE + 6
    with pytest.raises(InstructionBoundaryError):
        arch.require_instruction_start(code, SITE, SITE + 100)
    with pytest.raises(InstructionBoundaryError):
        arch.require_instruction_start(h("55 06 c3"), SITE, SITE + 2)


@pytest.mark.parametrize(
    "hex_bytes,expected",
    [
        ("90", True),
        ("66 90", True),
        ("48 90", True),
        ("0f 1f 00", True),
        ("0f 1f 40 00", True),
        ("0f 1f 44 00 00", True),
        ("66 0f 1f 44 00 00", True),
        ("0f 1f 80 00 00 00 00", True),
        ("66 2e 0f 1f 84 00 00 00 00 00", True),
        ("66 66 2e 0f 1f 84 00 00 00 00 00", True),
        ("41 90", False),  # xchg r8d, eax
        ("87 c0", False),  # xchg eax, eax zero-extends rax
        ("f3 90", False),  # pause
        ("f2 90", False),
        ("d9 d0", False),  # fnop
        ("f3 0f 1e fa", False),  # endbr64
        ("0f 19 00", False),  # hint nop outside 0f 1f /0
        ("55", False),
    ],
)
def test_is_nop(hex_bytes: str, expected: bool) -> None:
    assert arch.is_nop(insn_at(hex_bytes)) is expected


# --------------------------------------------------------------------------- sites


@pytest.mark.parametrize(
    "hex_bytes,kind,jmp_offset,resume_offset",
    [
        ("0f 1f 44 00 00", "nop5", 0, 5),
        ("0f 1f 44 00 00 55 48 89 e5 90 90", "nop5", 0, 5),
        ("90 0f 1f 44 00 00", "nop1+nop5", 1, 6),
        ("90 0f 1f 44 00 00 c3 cc cc cc cc", "nop1+nop5", 1, 6),
        ("90 66 2e 0f 1f 84 00 00 00 00 00", "nop1+nop10", 1, 11),
        ("90 66 2e 0f 1f 84 00 00 00 00 00 c3", "nop1+nop10", 1, 11),
    ],
)
def test_classify_site_forms(hex_bytes: str, kind: str, jmp_offset: int, resume_offset: int) -> None:
    assert arch.classify_site(h(hex_bytes)) == arch.JmpSite(kind, jmp_offset, resume_offset)


@pytest.mark.parametrize(
    "hex_bytes",
    [
        "",
        "90",
        "90 90 90 90 90 90",
        "0f 1f 44 00 01",  # disp8 != 0
        "0f 1f 44 00",  # truncated nop5
        "0f 1f 40 00 90",  # nop4 + nop1
        "66 0f 1f 44 00 00",  # nop6
        "90 0f 1f 44 00",  # truncated nop1+nop5
        "90 66 2e 0f 1f 84 00 00 00 00",  # truncated nop1+nop10
        "90 66 2e 0f 1f 84 00 00 00 00 01",  # nop10 with nonzero disp
        "90 66 66 2e 0f 1f 84 00 00 00 00 00",  # nop1 + nop11
        "cc 0f 1f 44 00 00",
        "e9 00 00 00 00",
        "55 48 89 e5 90 90 90 90 90 90 90",
    ],
)
def test_classify_site_near_misses(hex_bytes: str) -> None:
    assert arch.classify_site(h(hex_bytes)) is None


# --------------------------------------------------------------------------- reach


def test_rel32_reachable_bounds() -> None:
    assert arch.rel32_reachable(0x1000, 0x1000 + 0x7FFFFFFF)
    assert not arch.rel32_reachable(0x1000, 0x1000 + 0x80000000)
    assert arch.rel32_reachable(0x80001000, 0x1000)
    assert not arch.rel32_reachable(0x80001001, 0x1000)


def test_jmp_rel32() -> None:
    assert arch.jmp_rel32(0x1000, 0x1005) == h("e9 00 00 00 00")
    assert arch.jmp_rel32(0x1000, 0x1000) == h("e9 fb ff ff ff")
    code = arch.jmp_rel32(SITE, XOL)
    assert insn_at(code.hex(), SITE).target == XOL
    with pytest.raises(ValueError):
        arch.jmp_rel32(SITE, FAR)


def test_page_in_reach() -> None:
    site = 0x5555_5555_4000
    assert arch.page_in_reach(site + 0x10000, [site, site + 5])
    assert arch.page_in_reach(site - 0x10000, [site])
    assert arch.page_in_reach(0x1000, [])
    # Page 2 GiB above: its far end is out of reach even though its start might not be.
    assert not arch.page_in_reach(site + 0x7FFF_F000, [site])
    assert not arch.page_in_reach(site - 0x8000_0000, [site])
    # Reach of one address is not enough: every address must be in reach.
    assert not arch.page_in_reach(site + 0x10000, [site, FAR])
    # Exactly at the edge the check is conservative.
    edge = (site + 0x7FFF_0000) & ~0xFFF
    assert arch.page_in_reach(edge - 0x10000, [site])
    with pytest.raises(ValueError):
        arch.page_in_reach(site + 1, [site])


def test_page_in_reach_keeps_a_margin() -> None:
    """A page whose far byte is barely in reach (by < 64 bytes) is refused: conservative."""
    base = 0x5555_5555_4000
    a = base + 0x40
    barely = base + 0x7FFF_F000  # last byte is base + 0x7fffffff: in strict reach of a + 5
    assert arch.rel32_reachable(a + 5, barely + arch.PAGE_SIZE - 1)
    assert arch.rel32_reachable(barely + arch.PAGE_SIZE, a)
    assert not arch.page_in_reach(barely, [a])
    assert arch.page_in_reach(barely - arch.PAGE_SIZE, [a])


# --------------------------------------------------------------------------- displaced code


def test_displaced_plain_copy_then_jmp_back() -> None:
    insn = insn_at("48 89 e5")
    out = xol_listing(arch.displaced_code(insn, XOL))
    assert out[0].raw == insn.raw
    assert (out[1].mnemonic, out[1].target) == ("jmp", insn.end)
    assert len(out) == 2


HIGH = 0x5555_5555_0000  # a site with room for 2 GiB on either side


@pytest.mark.parametrize(
    "hex_bytes",
    [
        "8b 05 00 01 00 00",  # mov eax, [rip+0x100]
        "c7 05 f0 ff ff ff 01 00 00 00",  # mov dword [rip-0x10], 1 (disp then imm)
        "48 8d 3d 00 00 00 80",  # lea rdi, [rip-0x80000000]
        "66 0f 6f 05 00 10 00 00",  # movdqa xmm0, [rip+0x1000] (capstone misreports disp_size)
        "c4 e1 7d 6f 05 00 10 00 00",  # vmovdqa ymm0, [rip+0x1000] (VEX)
        "62 f1 7d 48 6f 05 00 10 00 00",  # vmovdqa32 zmm0, [rip+0x1000] (EVEX)
        "80 3d ff ff ff 7f 00",  # cmp byte [rip+0x7fffffff], 0
    ],
)
@pytest.mark.parametrize("delta", [0x100000, -0x10000, 0x7000_0000])
def test_displaced_rip_relative_keeps_effective_address(hex_bytes: str, delta: int) -> None:
    insn = insn_at(hex_bytes, HIGH)
    assert insn.rip_disp_offset is not None and insn.flow == "plain"
    xol = HIGH + delta
    code = arch.displaced_code(insn, xol)
    assert insn.rip_target is not None
    if not arch.rel32_reachable(xol + insn.size, insn.rip_target):
        assert code is None
        return
    assert code is not None
    out = xol_listing(code, xol)
    assert (out[0].mnemonic, out[0].size) == (insn.mnemonic, insn.size)
    assert out[0].rip_target == insn.rip_target
    assert out[0].raw[out[0].rip_disp_offset + 4 :] == insn.raw[insn.rip_disp_offset + 4 :]
    assert (out[1].mnemonic, out[1].target) == ("jmp", insn.end)


def test_displaced_rip_relative_out_of_reach() -> None:
    assert arch.displaced_code(insn_at("8b 05 00 01 00 00"), FAR) is None
    # disp -0x80000000: a XOL page above the site cannot reach it
    assert arch.displaced_code(insn_at("48 8d 3d 00 00 00 80", HIGH), HIGH + 0x1000) is None
    assert arch.displaced_code(insn_at("80 3d ff ff ff 7f 00", HIGH), HIGH - 0x1000) is None


@pytest.mark.parametrize("hex_bytes", ["eb 10", "eb 80", "e9 00 01 00 00", "f2 e9 00 00 00 00"])
def test_displaced_jmp(hex_bytes: str) -> None:
    insn = insn_at(hex_bytes)
    out = xol_listing(arch.displaced_code(insn, XOL))
    assert len(out) == 1
    assert (out[0].raw[0], out[0].target) == (0xE9, insn.target)


@pytest.mark.parametrize("hex_bytes", ["74 10", "7f f0", "2e 75 05", "0f 8c 00 01 00 00", "0f 83 f0 ff ff ff"])
def test_displaced_jcc(hex_bytes: str) -> None:
    insn = insn_at(hex_bytes)
    out = xol_listing(arch.displaced_code(insn, XOL))
    assert out[0].mnemonic == insn.mnemonic.split()[-1]  # same condition ("2e 75" decodes as "jne")
    assert (out[0].size, out[0].target) == (6, insn.target)
    assert (out[1].mnemonic, out[1].target) == ("jmp", insn.end)
    assert len(out) == 2


def test_displaced_call_returns_into_xol_then_jumps_back() -> None:
    insn = insn_at("e8 f0 0f 00 00")
    out = xol_listing(arch.displaced_code(insn, XOL))
    assert (out[0].mnemonic, out[0].target) == ("call", insn.target)
    assert (out[1].address, out[1].mnemonic, out[1].target) == (XOL + 5, "jmp", insn.end)
    assert len(out) == 2


def _pushed_qword(out: list[Instruction]) -> int:
    """Value left at [rsp] by ``push imm32; mov dword ptr [rsp + 4], imm32``."""
    assert out[0].raw[0] == 0x68 and arch.describe(out[1]).startswith("mov dword ptr [rsp + 4], ")
    low = struct.unpack("<i", out[0].raw[1:5])[0] & 0xFFFF_FFFF_FFFF_FFFF
    high = struct.unpack("<I", out[1].raw[-4:])[0]
    return (low & 0xFFFF_FFFF) | (high << 32)


@pytest.mark.parametrize("site", [SITE, 0x7F12_8000_0000])  # second: low half >= 2**31
def test_displaced_call_keep_return_address(site: int) -> None:
    insn = insn_at("e8 f0 0f 00 00", site)
    xol = site + 0x100000
    out = xol_listing(arch.displaced_code(insn, xol, keep_return_address=True), xol)
    assert _pushed_qword(out) == insn.end
    assert (out[2].mnemonic, out[2].target) == ("jmp", insn.target)
    assert len(out) == 3


def test_displaced_indirect_call_keep_return_address() -> None:
    insn = insn_at("ff 15 00 10 00 00")  # call [rip+0x1000]
    out = xol_listing(arch.displaced_code(insn, XOL, keep_return_address=True))
    assert _pushed_qword(out) == insn.end
    assert out[2].mnemonic == "jmp" and out[2].rip_target == insn.rip_target
    reg = xol_listing(arch.displaced_code(insn_at("41 ff d3"), XOL, keep_return_address=True))
    assert arch.describe(reg[2]) == "jmp r11"
    # operands through rsp would be shifted by the push
    assert arch.displaced_code(insn_at("ff 54 24 08"), XOL, keep_return_address=True) is None


@pytest.mark.parametrize("hex_bytes", ["c3", "c2 08 00", "f3 c3"])
def test_displaced_ret_is_a_copy(hex_bytes: str) -> None:
    insn = insn_at(hex_bytes)
    out = xol_listing(arch.displaced_code(insn, XOL))
    assert [i.raw for i in out] == [insn.raw]


@pytest.mark.parametrize(
    "hex_bytes,mnemonic",
    [("e2 fe", "loop"), ("e1 10", "loope"), ("e0 f0", "loopne"), ("e3 05", "jrcxz"), ("67 e3 05", "jecxz"), ("67 e2 fd", "loop")],
)
def test_displaced_loop_family(hex_bytes: str, mnemonic: str) -> None:
    insn = insn_at(hex_bytes)
    out = xol_listing(arch.displaced_code(insn, XOL))
    loop, skip, taken, back = out
    assert (loop.mnemonic, loop.raw[:-1]) == (mnemonic, insn.raw[:-1])  # same prefixes (67 = ecx)
    assert loop.target == taken.address
    assert (skip.mnemonic, skip.target) == ("jmp", back.address)
    assert (taken.mnemonic, taken.target) == ("jmp", insn.target)
    assert (back.mnemonic, back.target) == ("jmp", insn.end)


def test_displaced_indirect_jmp_and_call() -> None:
    jmp = insn_at("ff e0")
    assert [i.raw for i in xol_listing(arch.displaced_code(jmp, XOL))] == [jmp.raw]
    call = insn_at("ff 50 08")  # call [rax+8]
    out = xol_listing(arch.displaced_code(call, XOL))
    assert out[0].raw == call.raw
    assert (out[1].mnemonic, out[1].target) == ("jmp", call.end)
    via_rip = insn_at("ff 25 00 10 00 00")  # jmp [rip+0x1000]
    out = xol_listing(arch.displaced_code(via_rip, XOL))
    assert len(out) == 1 and out[0].rip_target == via_rip.rip_target
    call_rip = insn_at("ff 15 00 10 00 00")
    out = xol_listing(arch.displaced_code(call_rip, XOL))
    assert out[0].rip_target == call_rip.rip_target
    assert (out[1].mnemonic, out[1].target) == ("jmp", call_rip.end)


@pytest.mark.parametrize(
    "hex_bytes",
    [
        "cc",  # int3
        "cd 80",  # int 0x80
        "0f 0b",  # ud2
        "c7 f8 00 00 00 00",  # xbegin (rel32 abort target)
        "ff 1c 24",  # lcall far [rsp]
        "cb",  # retf
        "48 cf",  # iretq
        "67 8b 05 00 01 00 00",  # mov eax, [eip+0x100]
    ],
)
def test_displaced_special_is_refused(hex_bytes: str) -> None:
    assert arch.displaced_code(insn_at(hex_bytes), XOL) is None


def test_displaced_syscall_is_a_copy_then_jmp_back() -> None:
    """A syscall runs out of line (stepping it in place would stall every other
    thread for as long as it blocks, and deadlock on vfork)."""
    insn = insn_at("0f 05")
    out = xol_listing(arch.displaced_code(insn, XOL))
    assert [i.mnemonic for i in out[:2]] == ["syscall", "jmp"]
    assert out[1].target == insn.end


@pytest.mark.parametrize("hex_bytes", ["48 89 e5", "eb 10", "74 10", "e8 00 00 00 00", "e2 fe", "ff d0"])
def test_displaced_way_back_out_of_reach(hex_bytes: str) -> None:
    assert arch.displaced_code(insn_at(hex_bytes), FAR) is None


def test_displaced_target_out_of_reach() -> None:
    site = XOL - 0x7FFF_FF00
    # jmp rel32 near the end of the site's reach: the target lies beyond the XOL page's reach
    insn = insn_at("e9 00 00 00 80", site + 0x100)  # target = site + 0x105 - 2**31
    assert insn.target is not None and not arch.rel32_reachable(XOL + 5, insn.target)
    assert arch.displaced_code(insn, XOL) is None
    jcc = insn_at("0f 84 00 00 00 80", site + 0x100)
    assert arch.displaced_code(jcc, XOL) is None
    call = insn_at("e8 00 00 00 80", site + 0x100)
    assert arch.displaced_code(call, XOL) is None


def test_five_one_byte_nops_are_a_site_only_at_a_patchable_entry() -> None:
    """-fpatchable-function-entry=5: five 1-byte NOPs take a jmp at a function's
    entry (the graph recorder says so); elsewhere a run of NOPs may be padding."""
    site = arch.classify_site(h("90 90 90 90 90 55"), entry_nops=True)
    assert site is not None and (site.kind, site.jmp_offset, site.resume_offset) == ("5*nop1", 0, 5)
    assert arch.classify_site(h("90 90 90 90 90 55")) is None
    assert arch.classify_site(h("90 90 90 90 55"), entry_nops=True) is None

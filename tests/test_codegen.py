"""The code of the in-program actions (ptprobe.codegen): bytes pinned, structure
checked by decoding with capstone. (They run for real in tests/test_inprogram.py.)"""

from __future__ import annotations

import pytest

from ptprobe import arch, codegen

SLOT = 0x400000
RESUME = 0x401000
COUNTER = 0x7F0000002000
LAYOUT = codegen.RingLayout(head=0x7F0000000040, tail=0x7F0000000080, drops=0x7F00000000C0,
                            ring=0x7F0000100000, capacity=1 << 20, counters=0x7F0000001000, cpu_shift=16)
UPROBE_LOADS = tuple(codegen.Load("reg", reg=r) for r in ("rdi", "rsi", "rdx", "rcx", "r8", "r9"))


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def listing(code: bytes, at: int = SLOT):
    return [(i.mnemonic, i.op_str) for i in arch.iter_instructions(code.rstrip(b"\xcc"), at)]


def test_count_slot_bytes_are_pinned():
    code = codegen.count_slot_code(SLOT, RESUME, COUNTER, cpu_shift=16, save_flags=False)
    assert code == h("488d642480 50 51 f30fc7f8 25ff0f0000 c1e010 48b900200000007f0000 f048ff0401 59 58 "
                     "488da42480000000 e9cf0f0000") + b"\xcc" * 15
    assert len(code) == codegen.COUNT_SLOT_SIZE


def test_count_slot_saves_flags_where_they_may_be_live():
    code = codegen.count_slot_code(SLOT, RESUME, COUNTER, cpu_shift=16, save_flags=True)
    ops = [m for m, _ in listing(code)]
    assert ops[:2] == ["lea", "pushfq"] and ops[-3:] == ["popfq", "lea", "jmp"]
    assert ops.count("pushfq") == ops.count("popfq") == 1


def test_count_slot_structure():
    code = codegen.count_slot_code(SLOT, RESUME, COUNTER, cpu_shift=16, save_flags=False)
    lines = listing(code)
    assert lines[0] == ("lea", "rsp, [rsp - 0x80]")            # the red zone first
    assert ("rdpid", "rax") in lines                            # this CPU
    assert ("shl", "eax, 0x10") in lines                        # its block of counters
    assert ("movabs", f"rcx, {COUNTER:#x}") in lines
    assert ("lock inc", "qword ptr [rcx + rax]") in lines
    assert lines[-2:] == [("lea", "rsp, [rsp + 0x80]"), ("jmp", f"{RESUME:#x}")]
    inc = codegen.count_slot_inc_offset(cpu_shift=16, save_flags=False)
    assert code[inc:inc + 5] == h("f048ff0401")                 # lock inc qword [rcx + rax]


def test_count_slot_with_a_single_counter_line():
    code = codegen.count_slot_code(SLOT, RESUME, COUNTER, cpu_shift=16, save_flags=False, per_cpu=False)
    assert ("xor", "eax, eax") in listing(code) and ("rdpid", "rax") not in listing(code)


def test_count_slot_resume_out_of_reach():
    with pytest.raises(ValueError):
        codegen.count_slot_code(SLOT, SLOT + (1 << 40), COUNTER, cpu_shift=16, save_flags=False)


def stub(**changes) -> codegen.RecordStub:
    values = dict(stub_id=3, site=0x400100, resume=0x400105, counter=0x7F0000001008, loads=UPROBE_LOADS,
                  save_flags=False)
    values.update(changes)
    return codegen.RecordStub(**values)


def test_record_stub_bytes_are_pinned():
    code = codegen.record_stub_code(0x500000, stub(), LAYOUT)
    assert code == h(
        "488d6424805051524153f30fc7f825ff0f0000c1e01048b908100000007f0000f048ff040148b940000000007f0000"
        "488b01488d504849bb80000000007f0000492b134881fa00001000761cb8577ef03f0f054885c074cd48b9c000000000"
        "7f0000f048ff01eb64488d5048f0480fb11175bf4825ffff0f0048b900001000007f00004801c148c701040090100f31"
        "48c1e2204809d048894108f3480faec0488941104889791848897120488b44240848894128488b442410488941304c89"
        "41384c89494048c70104009000415b5a5958488da42480000000e92700f0ff")


def test_record_stub_structure():
    s = stub()
    code = codegen.record_stub_code(0x500000, s, LAYOUT)
    lines = listing(code, 0x500000)
    ops = [m for m, _ in lines]
    assert lines[0] == ("lea", "rsp, [rsp - 0x80]")
    assert ops[1:5] == ["push"] * 4 and ops[-6:-2] == ["pop"] * 4
    assert lines[-1] == ("jmp", "0x400105")
    assert ("lock cmpxchg", "qword ptr [rcx], rdx") in lines      # the reservation
    assert ("rdtsc", "") in lines and ("rdfsbase", "rax") in lines
    # the pending header right after the reservation, the final header last: the commit
    headers = [op for m, op in lines if m == "mov" and op.startswith("qword ptr [rcx], ")]
    assert headers == [f"qword ptr [rcx], {s.header | codegen.HEADER_PENDING:#x}", f"qword ptr [rcx], {s.header:#x}"]
    # the six argument registers, rdx and rcx from the stub's own frame
    stores = [op for m, op in lines if m == "mov" and op.startswith("qword ptr [rcx + 0x")]
    assert stores[-6:] == ["qword ptr [rcx + 0x18], rdi", "qword ptr [rcx + 0x20], rsi", "qword ptr [rcx + 0x28], rax",
                          "qword ptr [rcx + 0x30], rax", "qword ptr [rcx + 0x38], r8", "qword ptr [rcx + 0x40], r9"]
    stop = codegen.syscall_return_offset(code, 0x500000)
    assert stop is not None and code[stop - 2:stop] == b"\x0f\x05"


def test_record_stub_drop_mode_has_no_syscall():
    code = codegen.record_stub_code(0x500000, stub(lossless=False), LAYOUT)
    assert codegen.syscall_return_offset(code, 0x500000) is None
    assert ("syscall", "") not in listing(code, 0x500000)


def test_record_stub_memory_operands():
    loads = (codegen.Load("mem", base="rsp", index="rax", scale=8, disp=-0x10, size=4, address_bits=64),
             codegen.Load("abs", disp=0x601040, size=2), codegen.Load("none"), codegen.Load("reg", reg="xmm1"))
    lines = listing(codegen.record_stub_code(0x500000, stub(loads=loads, save_flags=True), LAYOUT), 0x500000)
    assert ("pushfq", "") in lines and ("popfq", "") in lines
    assert ("lea", "rax, [rsp + 0xa8]") in lines                 # the program's rsp: 4 pushes, flags, red zone
    assert ("mov", "rdx, qword ptr [rsp + 0x18]") in lines       # the program's rax, from the frame
    assert ("lea", "rax, [rax + rdx*8]") in lines
    assert ("mov", "eax, dword ptr [rax]") in lines              # 4 bytes, zero-extended
    assert ("movzx", "eax, word ptr [rax]") in lines
    assert ("movq", "rax, xmm1") in lines


def test_headers():
    header = codegen.make_header(5, 72)
    assert codegen.parse_header(header) == (5, 72)
    assert codegen.parse_header(header | codegen.HEADER_PENDING) == (5, 72)
    assert header < (1 << 31)                                    # a mov imm32 writes it
    with pytest.raises(ValueError):
        codegen.make_header(1, 12)
    with pytest.raises(ValueError):
        codegen.make_header(1 << 20, 8)


def test_ring_capacity_must_be_a_power_of_two():
    bad = codegen.RingLayout(**{**LAYOUT.__dict__, "capacity": 3 << 20})
    with pytest.raises(ValueError):
        codegen.record_stub_code(0x500000, stub(), bad)


def test_graph_entry_stub_calls_the_routine_through_its_pointer():
    """A function's entry stub: over the red zone, the entry header pushed, the
    space's entry routine called through the address stored after the code (any
    distance), back, and jmp to the site's resume; the routine returns with ret."""
    routine = 0x7F00DEAD0000
    header = codegen.make_header(6, codegen.ENTRY_RECORD)
    code = codegen.graph_entry_stub(header, routine, SLOT, RESUME)
    assert len(code) == codegen.GRAPH_STUB_SIZE
    ops = [(i.mnemonic, i.op_str) for i in arch.iter_instructions(code[:29], SLOT)]
    assert ops == [("lea", "rsp, [rsp - 0x80]"), ("push", hex(header)), ("call", "qword ptr [rip + 0x10]"),
                   ("lea", "rsp, [rsp + 0x88]"), ("jmp", hex(RESUME))]
    assert int.from_bytes(code[32:40], "little") == routine            # rip after the call: SLOT + 16
    assert codegen.make_header(7, codegen.EXIT_RECORD) - header == codegen.GRAPH_EXIT_HEADER_DELTA
    graph = codegen.GraphLayout(table=0x7F0000200000, entries=4096, trampoline=0x7F0000300000, frames=2047)
    body = arch.assemble(codegen.graph_entry_source(LAYOUT, graph))
    assert [i.mnemonic for i in arch.iter_instructions(body, SLOT)][-1] == "ret"
    assert len(codegen.syscall_return_offsets(body)) == 2               # a thread not entered; the ring full
    with pytest.raises(ValueError):
        codegen.graph_entry_stub(1 << 31, routine, SLOT, RESUME)

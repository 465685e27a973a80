"""Sessions: starting or attaching, arming probes, the event loop, detaching.

The engine never prints. What it has to say (a site that fell back to int3, a
library that is not loaded yet, a handler that raised) goes to an
:class:`Observer`; the default one logs through :mod:`logging`.

Threading: every ptrace request for a thread must come from the OS thread
that attached it, so use a session from one Python thread. The event loop
waits with ``waitpid(-1, __WALL | __WNOTHREAD)``: it reaps only children of the
calling OS thread. Children that this thread started itself (with
:mod:`subprocess`, say) while a session waits can be reaped by it; their exit
statuses are kept in :attr:`Session.foreign_exits`.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
import signal
import struct
import threading
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

from . import arch, linux, usdt
from .errors import (FaultError, InstructionBoundaryError, NoSuchProcessError, ProgramStartError,
                     PtprobeError, SymbolNotFoundError, TracePermissionError, TracerError)
from .hit import Hit, Regs
from .patching import Patcher, Site
from .placement import Placement
from .process import LoadedObject, Process, Thread, open_elf
from .spec import ProbeSpec, parse_spec

log = logging.getLogger("ptprobe")

Handler = Callable[[Hit], None]
_U64 = (1 << 64) - 1
_STOP_SIGNALS = (signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)
_SLOT_FRAME = 152                      # red zone 128 + rcx, r11, rax
_SAVED = struct.Struct("<3Q")          # rax, r11, rcx as a slot pushed them, from rsp up
_EPROTO = 71
# wait statuses of the two hit stops: a seccomp trace stop, a SIGTRAP signal stop
_SLOT_STOP = (linux.PTRACE_EVENT_SECCOMP << 16) | (signal.SIGTRAP << 8) | 0x7F
_TRAP_STOP = (signal.SIGTRAP << 8) | 0x7F
_ARG_REGISTERS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")      # SysV integer arguments
_BASE_OPTIONS = (linux.PTRACE_O_TRACECLONE | linux.PTRACE_O_TRACEFORK | linux.PTRACE_O_TRACEVFORK
                 | linux.PTRACE_O_TRACEEXEC | linux.PTRACE_O_TRACESECCOMP)


class Observer:
    """Receives what the engine has to report. Subclass and override."""

    def notice(self, text: str) -> None:
        """Something the user should know (a fallback, a pending library)."""
        log.warning("%s", text)

    def handler_error(self, probe: "Probe", hit: Hit, error: BaseException) -> None:
        """A handler raised; the hit is counted and the thread resumes unchanged."""
        log.error("handler of probe %s raised %s: %s", probe.name, type(error).__name__, error)


class Probe:
    """A probe armed at one or more sites; returned by :meth:`Session.probe`."""

    def __init__(self, spec: ProbeSpec, handler: Optional[Handler], internal: bool = False) -> None:
        self.spec = spec
        self.name = spec.text
        self._handler = handler
        self.internal = internal
        self.hits = 0
        self.errors = 0
        self.sites: List[Site] = []
        self._identity: Optional[Tuple[int, int]] = None
        self._notes: Dict[int, List[usdt.UsdtArg]] = {}     # usdt: site address -> parsed args
        self._semaphores: Dict[int, int] = {}              # usdt: site address -> runtime semaphore address

    @property
    def handler(self) -> Optional[Handler]:
        """Called with each :class:`Hit`; None: the probe only counts. May be changed
        while armed (a site keeps the counting-only hot path only while none of its
        probes has a handler)."""
        return self._handler

    @handler.setter
    def handler(self, handler: Optional[Handler]) -> None:
        self._handler = handler
        for site in self.sites:
            site.refresh_counting()

    def _argument_count(self, hit: Hit) -> int:
        if self.spec.kind == "usdt":
            return len(self._notes.get(hit.address, ()))
        return len(_ARG_REGISTERS)

    def _arguments(self, hit: Hit) -> List[Union[int, float]]:
        if self.spec.kind != "usdt":
            get = hit.regs._get
            return [get(name) for name in _ARG_REGISTERS]
        return [self._argument(hit, index) for index in range(self._argument_count(hit))]

    def _argument(self, hit: Hit, index: int) -> Union[int, float]:
        if self.spec.kind != "usdt":
            return hit.regs._get(_ARG_REGISTERS[index])
        spec = self._notes[hit.address][index]
        obj = hit.site.obj

        def resolve(sym: str) -> int:
            if obj is None:
                raise SymbolNotFoundError(f"no object for symbol {sym}", sym)
            return obj.runtime(obj.elf.get_symbol(sym).address)

        return usdt.evaluate(spec, hit.regs._get, hit.read, get_xmm=hit.xmm, resolve_symbol=resolve,
                             rip=hit.address)

    def __repr__(self) -> str:
        return f"<Probe {self.name} hits={self.hits} sites={len(self.sites)}>"


class Session:
    """A traced program. Create with :func:`run` or :func:`attach`."""

    def __init__(self, *, mode: str, slots: str = "return", seccomp: bool = True,
                 allow_no_new_privs: Optional[bool] = None, max_trampoline_pages: int = 64,
                 follow: bool = True, observer: Optional[Observer] = None,
                 colocate: Union[bool, str] = True) -> None:
        if slots not in ("return", "seed"):
            raise ValueError("slots must be 'return' or 'seed'")
        self.mode = mode
        self.slots = slots
        self.seccomp = seccomp
        self.allow_no_new_privs = (mode == "run") if allow_no_new_privs is None else allow_no_new_privs
        self.max_trampoline_pages = max_trampoline_pages
        self.follow = follow
        self.observer = observer or Observer()
        self.placement = Placement({True: "single", False: "off"}.get(colocate, colocate))
        self.probes: List[Probe] = []
        self.processes: Dict[int, Process] = {}
        self.patchers: Dict[int, Patcher] = {}
        self.threads: Dict[int, Thread] = {}
        self.foreign_exits: Dict[int, int] = {}
        self.main_pid = 0
        self.returncode: Optional[int] = None
        self.attached = False
        self._holding = 0
        self._stop_requested = False
        self._pause = False
        self._counting = False          # some site's probes only count: try the hot path
        self._owner = threading.get_ident()
        self._armed: Dict[int, Set[Tuple[int, Tuple[int, int]]]] = {}   # pid -> {(id(probe), obj identity)}
        self._semaphores: Dict[int, Dict[int, int]] = {}                 # pid -> {address: increments}
        self._loader_probe = Probe(parse_spec("uprobe:ld.so:_dl_debug_state"), self._on_loader, internal=True)
        self._startup = False
        self._unclaimed: Dict[int, int] = {}

    # ------------------------------------------------------------------ starting
    def _options(self) -> int:
        options = _BASE_OPTIONS
        if self.mode == "run":
            options |= linux.PTRACE_O_EXITKILL
        return options

    def _start(self, argv: Sequence[str], env: Optional[Dict[str, str]]) -> None:
        if not argv:
            raise ProgramStartError("no program given", "")
        program = argv[0]
        path = program if "/" in program else shutil.which(program)
        if path is None or not os.path.exists(path):
            raise ProgramStartError(f"{program}: no such file or directory", program)
        if os.path.isdir(path) or not os.access(path, os.X_OK):
            raise ProgramStartError(f"{program}: permission denied (not an executable file)", program)
        go_r, go_w = os.pipe()
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                os.close(go_w)
                os.close(err_r)
                os.read(go_r, 1)
                os.close(go_r)
                if env is None:
                    os.execv(path, list(argv))
                os.execve(path, list(argv), env)
            except OSError as exc:
                os.write(err_w, f"{exc.errno}".encode())
            finally:
                os._exit(127)
        os.close(go_r)
        os.close(err_w)
        try:
            linux.seize(pid, self._options())
        except PtprobeError:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
        finally:
            os.write(go_w, b"g")
            os.close(go_w)
        self.main_pid = pid
        self.attached = True
        proc = self._add_process(pid)
        thread = proc.add_thread(pid)
        self.threads[pid] = thread
        self._holding = 1
        # run until the exec stop
        while proc.pid in self.processes and not proc.exec_seen:
            self._step_loop()
        err = os.read(err_r, 64)
        os.close(err_r)
        if pid not in self.processes or self.returncode is not None:
            code = int(err) if err.strip().isdigit() else 0
            self.attached = False
            raise ProgramStartError(f"{program}: cannot execute: {os.strerror(code) if code else 'exited'}",
                                    program)
        self._advance_startup(proc)

    def _advance_startup(self, proc: Process) -> None:
        """Run the new image until the dynamic loader has mapped its libraries."""
        if not self._arm_loader(proc):
            return
        self._startup = True
        self._pause = False
        self._resume_world()
        try:
            while not self._pause and proc.pid in self.processes:
                self._step_loop()
        finally:
            self._startup = False
        if proc.pid not in self.processes:
            return
        self._stop_world()
        self._pause = False

    def _attach(self, pid: int) -> None:
        if pid <= 0:
            raise NoSuchProcessError(f"no such process: {pid}", pid)
        if pid == os.getpid():
            raise TracePermissionError("ptprobe cannot trace itself", pid)
        status = linux.read_status(pid)
        tgid = int(status.get("Tgid", pid))
        if tgid != pid:
            raise NoSuchProcessError(f"{pid} is a thread of process {tgid}: give the process id", pid)
        if status.get("State", "").startswith("Z"):
            raise NoSuchProcessError(f"process {pid} is a zombie", pid)
        if status.get("Kthread") == "1" or "VmSize" not in status:
            raise TracePermissionError(f"process {pid} is a kernel thread: there is no user code to probe", pid)
        tracer = int(status.get("TracerPid", "0"))
        if tracer:
            raise TracePermissionError(f"process {pid} is already traced by process {tracer}", pid)
        try:
            os.stat(f"/proc/{pid}/exe")
            exe = os.readlink(f"/proc/{pid}/exe")
        except PermissionError:
            raise TracePermissionError(f"no permission to trace process {pid}", pid) from None
        except OSError:
            exe = ""
        self.main_pid = pid
        proc = self._add_process(pid)
        options = self._options()
        try:
            seen: Set[int] = set()
            while True:
                tids = set(linux.iter_threads(pid)) - seen
                if not tids:
                    break
                for tid in sorted(tids):
                    seen.add(tid)
                    try:
                        linux.seize(tid, options)
                    except NoSuchProcessError:
                        continue
                    except TracePermissionError:
                        if tid != pid and self._traced_by_us(pid, tid):
                            pass   # created by a seized thread: already auto-attached
                        elif tid != pid and self._exiting(pid, tid):
                            continue
                        else:
                            raise TracePermissionError(f"no permission to trace process {pid}"
                                                       f"{' (' + exe + ')' if exe else ''}", pid) from None
                    thread = proc.add_thread(tid)
                    self.threads[tid] = thread
                    self.attached = True
        except PtprobeError:
            self._abandon()
            raise
        self._stop_world()
        proc.refresh_objects()
        self._arm_loader(proc)

    @staticmethod
    def _exiting(pid: int, tid: int) -> bool:
        """A thread that is exiting (ptrace refuses to attach to it)."""
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        return state in ("Z", "X", "x")

    @staticmethod
    def _traced_by_us(pid: int, tid: int) -> bool:
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as fh:
                for line in fh:
                    if line.startswith("TracerPid:"):
                        return int(line.split()[1]) == os.getpid()
        except OSError:
            pass
        return False

    def _abandon(self) -> None:
        for tid, thread in list(self.threads.items()):
            try:
                linux.detach(tid, 0)
            except PtprobeError:
                pass
        self.threads.clear()
        self.attached = False

    def _add_process(self, pid: int) -> Process:
        proc = Process(pid)
        self.processes[pid] = proc
        self.patchers[pid] = self._new_patcher(proc)
        self._armed[pid] = set()
        self._semaphores[pid] = {}
        return proc

    def _new_patcher(self, proc: Process) -> Patcher:
        return Patcher(proc, slots=self.slots, seccomp=self.seccomp,
                       allow_no_new_privs=self.allow_no_new_privs,
                       max_pages=self.max_trampoline_pages, notice=self.observer.notice)

    # ------------------------------------------------------------------ probes
    def probe(self, spec: Union[str, ProbeSpec], handler: Optional[Handler] = None) -> Probe:
        """Arm a probe in every traced process; *handler(hit)* runs on each hit."""
        self._check_thread()
        parsed = parse_spec(spec) if isinstance(spec, str) else spec
        probe = Probe(parsed, handler)
        if parsed.is_path:
            path = parsed.path
            elf = open_elf(path)
            probe._identity = linux.exe_identity(path)
            self._validate(probe, elf)
        if not self.processes:
            raise TracerError("the session has ended: nothing to probe")
        held = self._holding == 0
        if held:
            self._stop_world()
        try:
            armed_any = False
            for proc in list(self.processes.values()):
                if proc.exited:
                    continue
                proc.refresh_objects()
                armed_any |= self._arm_probe(proc, probe, raise_errors=True)
            self.probes.append(probe)
            if not armed_any:
                self.observer.notice(f"{probe.name}: {parsed.path} is not loaded yet; "
                                     "the probe is armed when it is")
        finally:
            if held:
                self._resume_world()
        return probe

    def _validate(self, probe: Probe, elf) -> None:
        for _ in self._locations(probe, elf):
            pass

    def _locations(self, probe: Probe, elf) -> Iterable[Tuple[int, Optional[object]]]:
        """Yield (link-time address, usdt note or None) for *probe* in *elf*; raise on bad input."""
        spec = probe.spec
        if spec.kind == "usdt":
            found = False
            for note in elf.iter_usdt_notes():
                if fnmatch.fnmatchcase(note.provider, spec.provider or "*") and \
                        fnmatch.fnmatchcase(note.name, spec.name or "*"):
                    found = True
                    yield note.address, note
            if not found:
                raise SymbolNotFoundError(f"no USDT probe {spec.provider}:{spec.name} in {elf.path}",
                                          f"{spec.provider}:{spec.name}")
            return
        if spec.symbol is not None:
            sym = elf.get_symbol(spec.symbol)
            address = sym.address + spec.offset
            if spec.offset and sym.size and spec.offset >= sym.size:
                raise InstructionBoundaryError(
                    f"{spec.symbol}+{spec.offset:#x} is past the end of {spec.symbol} "
                    f"(size {sym.size:#x})", address)
            start, size = sym.address, sym.size
        else:
            address = spec.address or 0
            sym = elf.symbol_at(address)
            if sym is not None:
                start, size = sym.address, sym.size
            else:
                start, size = self._sweep_start(elf, address)
        if not elf.is_executable_address(address):
            raise InstructionBoundaryError(f"{address:#x} is not in executable code of {elf.path}", address)
        if address != start:
            code = elf.read(start, max(size, address - start + 16), partial=True)
            if not arch.is_instruction_start(code, start, address):
                raise InstructionBoundaryError(
                    f"{address:#x} is not on an instruction boundary in {elf.path}", address)
        if arch.decode(elf.read(address, 16, partial=True), address) is None:
            raise InstructionBoundaryError(f"no valid instruction at {address:#x} in {elf.path}", address)
        yield address, None

    @staticmethod
    def _sweep_start(elf, address: int) -> Tuple[int, int]:
        best = None
        for sym in elf.iter_symbols():
            if sym.kind == "func" and sym.address <= address and (best is None or sym.address > best.address):
                best = sym
        if best is None:
            for seg in elf.segments:
                if seg.vaddr <= address < seg.vaddr + seg.memsz:
                    return seg.vaddr, address - seg.vaddr + 16
            return address, 16
        return best.address, address - best.address + 16

    def _matches(self, probe: Probe, obj: LoadedObject) -> bool:
        spec = probe.spec
        if probe._identity is not None:
            return obj.identity == probe._identity
        base = os.path.basename(obj.path)
        return base == spec.path or base.startswith(spec.path + ".so") or \
            (spec.path == "ld.so" and base.startswith("ld-linux"))

    def _arm_probe(self, proc: Process, probe: Probe, raise_errors: bool) -> bool:
        armed = False
        for obj in list(proc.objects.values()):
            if not self._matches(probe, obj):
                continue
            key = (id(probe), obj.identity)
            if key in self._armed[proc.pid]:
                armed = True
                continue
            try:
                self._arm_in_object(proc, probe, obj)
                armed = True
            except PtprobeError as exc:
                if raise_errors:
                    raise
                self.observer.notice(f"{probe.name}: not armed in process {proc.pid}: {exc}")
        return armed

    def _arm_in_object(self, proc: Process, probe: Probe, obj: LoadedObject) -> None:
        patcher = self.patchers[proc.pid]
        sites: List[Site] = []
        notes = []
        for vaddr, note in self._locations(probe, obj.elf):
            address = obj.runtime(vaddr)
            code = obj.elf.read(vaddr, 16, partial=True)
            insn = arch.decode(code, address)
            if insn is None:
                raise InstructionBoundaryError(f"no valid instruction at {address:#x}", address)
            site = patcher.prepare(address, obj, code, insn)
            sites.append(site)
            notes.append(note)
        patcher.write(sites)
        self._armed[proc.pid].add((id(probe), obj.identity))
        for site, note in zip(sites, notes):
            site.internal = site.internal or probe.internal
            if probe not in site.probes:
                site.probes.append(probe)
                self._refresh_fast_path(site)
            if site not in probe.sites:
                probe.sites.append(site)
                if site.fallback_reason and not probe.internal:
                    self.observer.notice(f"{probe.name}: site {site.address:#x} uses int3 "
                                         f"({site.fallback_reason})")
            if not site.label:
                site.label = self._label(probe, obj, obj.link_time(site.address), note)
            if note is not None:
                probe._notes[site.address] = usdt.parse_args(note.args)
                if note.semaphore:
                    sem = obj.runtime(note.semaphore) if obj.elf.is_pie else note.semaphore
                    probe._semaphores[site.address] = sem
                    self._adjust_semaphore(proc, sem, +1)

    def _refresh_fast_path(self, site: Site) -> None:
        """A site whose probes only count needs no register view per hit."""
        self._counting = site.refresh_counting() or self._counting

    @staticmethod
    def _label(probe: Probe, obj: LoadedObject, vaddr: int, note) -> str:
        if note is not None:
            return f"{note.provider}:{note.name}"
        sym = obj.elf.symbol_at(vaddr)
        if sym is None:
            return f"{obj.name}:{vaddr:#x}"
        return sym.name if vaddr == sym.address else f"{sym.name}+{vaddr - sym.address:#x}"

    def _adjust_semaphore(self, proc: Process, address: int, delta: int) -> None:
        counts = self._semaphores[proc.pid]
        value = int.from_bytes(proc.mem.read(address, 2), "little")
        value = max(0, min(0xFFFF, value + delta))
        proc.mem.write(address, value.to_bytes(2, "little"))
        counts[address] = counts.get(address, 0) + delta

    # ------------------------------------------------------------------ the loader
    def _arm_loader(self, proc: Process) -> bool:
        proc.refresh_objects()
        for obj in proc.objects.values():
            if os.path.basename(obj.path).startswith("ld-linux") and obj.elf.find_symbol("_dl_debug_state"):
                try:
                    self._arm_in_object(proc, self._loader_probe, obj)
                except PtprobeError as exc:
                    self.observer.notice(f"cannot watch the dynamic loader in process {proc.pid}: {exc}")
                    return False
                self._r_debug = obj.elf.find_symbol("_r_debug")
                return True
        return False

    def _on_loader(self, hit: Hit) -> None:
        proc = hit.site.process
        obj = hit.site.obj
        r_debug = obj.elf.find_symbol("_r_debug") if obj is not None else None
        if r_debug is not None and obj is not None:
            state = int.from_bytes(proc.mem.read(obj.runtime(r_debug.address) + 24, 4), "little")
            if state != 0:          # RT_ADD / RT_DELETE: not consistent yet
                return
        new = proc.refresh_objects()
        self._forget_unmapped(proc)
        if self._startup and proc.pid == self.main_pid:
            self._pause = True
            return
        if not new:
            return
        self._stop_world()
        try:
            for probe in self.probes:
                self._arm_probe(proc, probe, raise_errors=False)
        finally:
            self._resume_world()

    def _forget_unmapped(self, proc: Process) -> None:
        """Sites and semaphores of objects the program unmapped (dlclose) are gone with them."""
        patcher = self.patchers.get(proc.pid)
        for obj in proc.unmapped:
            if patcher is not None:
                patcher.forget_object(obj)
            self._armed[proc.pid] = {k for k in self._armed[proc.pid] if k[1] != obj.identity}
            counts = self._semaphores.get(proc.pid, {})
            for address in list(counts):
                if obj.start <= address < obj.end:
                    del counts[address]
        proc.unmapped.clear()

    # ------------------------------------------------------------------ the loop
    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """Run until the traced program exits; return its status like
        :attr:`subprocess.Popen.returncode` (exit code, or minus the signal).
        With *timeout* (seconds; main thread only), return None if it is
        still running then; the probes stay armed."""
        self._check_thread()
        if self.returncode is not None or not self.attached:
            return self.returncode
        self._stop_requested = False
        old = None
        if timeout is not None:
            if threading.current_thread() is not threading.main_thread():
                raise ValueError("wait(timeout=...) works only in the main thread")
            old = signal.signal(signal.SIGALRM, lambda *_: self.request_stop())
            signal.setitimer(signal.ITIMER_REAL, max(timeout, 0.001), 0.05)
        try:
            tids = sorted(self.threads, key=lambda tid: tid != self.main_pid)   # the main thread first
            self.placement.engage(tids)
            self._resume_world()
            while self.returncode is None and self.threads and not self._stop_requested:
                self._step_loop()
        finally:
            self.placement.release()
            if timeout is not None:
                signal.setitimer(signal.ITIMER_REAL, 0, 0)
                signal.signal(signal.SIGALRM, old)
        return self.returncode

    def request_stop(self) -> None:
        """Make :meth:`wait` return soon. Call it from the session's thread, or
        from a signal handler when the session runs in the main thread."""
        self._stop_requested = True
        # wake a blocking waitpid: interrupting one running thread makes a stop
        for thread in list(self.threads.values()):
            if not thread.stopped and not thread.exited and not thread.interrupted:
                try:
                    linux.interrupt(thread.tid)
                    thread.interrupted = True
                except PtprobeError:
                    continue
                break

    def _step_loop(self) -> None:
        """Wait for one event and handle it."""
        try:
            tid, status = linux.wait_any()
        except ChildProcessError:
            self._all_gone()
            return
        if self._counting and (status == _SLOT_STOP or status == _TRAP_STOP) and self._counted(tid, status):
            return
        self._dispatch(tid, status)

    def _counted(self, tid: int, status: int) -> bool:
        """The hot path: a hit on a site whose probes only count, resumed at
        once with the fewest system calls (self-returning slot: read rip and
        continue; int3: read rip, write it, continue; seed slot: read the
        registers and the saved ones, write them, continue). False leaves the
        stop to :meth:`_dispatch`: not such a hit, or a thread or session state
        (held, pausing, signals to deliver) that needs the general path."""
        thread = self.threads.get(tid)
        if thread is None or thread.deferred_signals or thread.group_stop or self._holding or self._pause:
            return False
        proc = thread.process
        patcher = self.patchers.get(proc.pid)
        if patcher is None or proc.release_on_stop:
            return False
        try:
            if status == _TRAP_STOP:
                site = patcher.int3_sites.get(linux.get_rip(tid))
                if site is None or not site.counting_only:
                    return False
                if site.emulate:
                    linux.set_rip(tid, site.resume)
                elif site.xol is not None:
                    linux.set_rip(tid, site.xol)
                else:
                    return False
            elif self.slots == "return":
                site = patcher.slot_sites.get(linux.get_rip(tid))
                if site is None or not site.counting_only or site.slot_kind != "return":
                    return False
            else:
                raw = linux.get_regs(tid)
                site = patcher.slot_sites.get(raw.rip)
                if site is None or not site.counting_only or site.slot_kind != "seed":
                    return False
                # what the seed slot's missing tail would do: pop rax, r11, rcx, skip the red zone
                raw.rax, raw.r11, raw.rcx = _SAVED.unpack(proc.mem.read(raw.rsp, _SAVED.size))
                raw.rsp += _SLOT_FRAME
                raw.rip = site.resume
                raw.orig_rax = _U64
                linux.set_regs(tid, raw)
        except (NoSuchProcessError, FaultError):
            return False            # killed meanwhile: the general path sees its end
        for probe in site.probes:
            probe.hits += 1
        try:
            linux.cont(tid)
        except NoSuchProcessError:
            thread.exited = True
        return True

    def _all_gone(self) -> None:
        for tid in list(self.threads):
            self.threads[tid].exited = True
        self.threads.clear()
        if self.returncode is None:
            self.returncode = 0
        self.attached = False
        self.placement.release()

    def _dispatch(self, tid: int, status: int) -> None:
        try:
            self._handle(tid, status)
        except NoSuchProcessError as exc:
            thread = self.threads.get(tid)
            if thread is None:
                return
            if exc.pid == tid:
                # the thread was killed while we handled its stop: its exit comes next
                thread.stopped = False
                thread.in_hit = None
            else:
                # another process vanished meanwhile: this thread goes on
                thread.in_hit = None
                self._done(thread)

    def _handle(self, tid: int, status: int) -> None:
        thread = self.threads.get(tid)
        if thread is None:
            thread = self._claim(tid, status)
            if thread is None:
                return
        proc = thread.process
        if (status == _SLOT_STOP or status == _TRAP_STOP) and not proc.release_on_stop:
            thread.stopped = True         # the hit stops come first: they are the most frequent
            if status == _SLOT_STOP:
                self._slot_stop(thread)
            else:
                self._sigtrap(thread)
            return
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            self._thread_gone(thread, status)
            return
        thread.stopped = True
        sig = os.WSTOPSIG(status)
        event = status >> 16
        if proc.release_on_stop:
            self._release_child(proc)
            return
        if event == 0:
            if sig == signal.SIGTRAP:
                self._sigtrap(thread)
                return
            thread.pending_signal = sig
        elif event == linux.PTRACE_EVENT_SECCOMP:
            self._slot_stop(thread)
            return
        elif event == linux.PTRACE_EVENT_STOP:
            thread.interrupted = False
            if sig in _STOP_SIGNALS:
                thread.group_stop = True
            else:
                thread.group_stop = False
        elif event in (linux.PTRACE_EVENT_CLONE, linux.PTRACE_EVENT_FORK, linux.PTRACE_EVENT_VFORK):
            self._new_child(thread, event, linux.get_event_msg(tid))
        elif event == linux.PTRACE_EVENT_EXEC:
            self._exec(thread)
            thread = self.threads.get(thread.tid, thread)
        self._done(thread)

    def _done(self, thread: Thread) -> None:
        if self._holding == 0 and not self._pause:
            thread.resume()

    def _claim(self, tid: int, status: int) -> Optional[Thread]:
        """A stop from a tid we do not know yet: a new thread or child."""
        if not os.WIFSTOPPED(status):
            if tid not in self.processes:
                self.foreign_exits[tid] = status
            return None
        tgid = linux.thread_group(tid)
        if tgid is None:
            return None
        proc = self.processes.get(tgid)
        if proc is None:
            parent = None
            try:
                ppid = int(linux.read_status(tid).get("PPid", "0"))
            except PtprobeError:
                ppid = 0
            parent = self.processes.get(ppid)
            if parent is None:
                # keep it stopped until its parent's event tells us about it
                self._unclaimed[tid] = status
                return None
            proc = self._fork_process(parent, tid)
        thread = proc.add_thread(tid)
        self.threads[tid] = thread
        return thread

    def _new_child(self, parent: Thread, event: int, child: int) -> None:
        self.placement.adopt(child, parent.tid)
        if child in self.threads:
            return
        pproc = parent.process
        group = linux.thread_group(child)
        if group is None:
            return      # its first stop came first, and it has run and exited since
        if event == linux.PTRACE_EVENT_CLONE and group == pproc.pid:
            thread = pproc.add_thread(child)
            self.threads[child] = thread
        else:
            try:
                proc = self._fork_process(pproc, child)
            except NoSuchProcessError:
                return
            thread = proc.add_thread(child)
            self.threads[child] = thread
        status = self._unclaimed.pop(child, None)
        if status is not None:
            self._dispatch(child, status)

    def _fork_process(self, parent: Process, pid: int) -> Process:
        proc = Process(pid)
        proc.filter_state = parent.filter_state
        proc.objects = dict(parent.objects)
        self.processes[pid] = proc
        ppatcher = self.patchers[parent.pid]
        try:
            shared = linux.share_memory(parent.pid, pid)
        except PtprobeError:
            shared = False
        if shared:
            # vfork / CLONE_VM: the same memory; never clean it
            proc.mem.close()
            proc.mem = parent.mem
            proc.syscall_gadget = parent.syscall_gadget
            self.patchers[pid] = ppatcher
            proc.shared_with = parent.pid
        else:
            self.patchers[pid] = ppatcher.fork(proc)
            proc.syscall_gadget = parent.syscall_gadget
            # --no-follow: a copy of the memory is cleaned and let go at its first stop
            proc.release_on_stop = not self.follow
        self._armed[pid] = set(self._armed[parent.pid])
        self._semaphores[pid] = dict(self._semaphores[parent.pid]) if not shared else {}
        return proc

    def _release_child(self, proc: Process) -> None:
        """Restore the sites and semaphores of a forked child, then detach it (--no-follow)."""
        patcher = self.patchers.get(proc.pid)
        try:
            if patcher is not None:
                patcher.disarm_all()
            for address, count in self._semaphores.get(proc.pid, {}).items():
                if count > 0:
                    self._adjust_semaphore(proc, address, -count)
        except PtprobeError as exc:
            self.observer.notice(f"child {proc.pid}: cannot restore every site: {exc}")
        for thread in list(proc.threads.values()):
            self.placement.unpin(thread.tid)
            try:
                if thread.stopped:
                    linux.detach(thread.tid, thread.pending_signal)
            except PtprobeError:
                pass
            thread.exited = True
            self.threads.pop(thread.tid, None)
        proc.threads.clear()
        self._forget_process(proc)

    def _thread_gone(self, thread: Thread, status: int) -> None:
        self.placement.forget(thread.tid)
        thread.exited = True
        thread.stopped = False
        self.threads.pop(thread.tid, None)
        proc = thread.process
        proc.threads.pop(thread.tid, None)
        if thread.tid == proc.pid:
            proc.exited = True
            proc.exit_status = status
            for tid in list(proc.threads):
                self.threads.pop(tid, None)
                self.placement.forget(tid)
            proc.threads.clear()
            self._forget_process(proc)
            if proc.pid == self.main_pid:
                if os.WIFEXITED(status):
                    self.returncode = os.WEXITSTATUS(status)
                else:
                    self.returncode = -os.WTERMSIG(status)
        if not self.threads:
            self.attached = False
            self.placement.release()

    def _forget_process(self, proc: Process) -> None:
        self.processes.pop(proc.pid, None)
        self.patchers.pop(proc.pid, None)
        if proc.shared_with is None:
            proc.close()

    def _exec(self, thread: Thread) -> None:
        proc = thread.process
        former = linux.get_event_msg(thread.tid)
        for tid in list(proc.threads):
            if tid != thread.tid:
                proc.threads.pop(tid, None)
                self.threads.pop(tid, None)
                if tid != former:
                    self.placement.forget(tid)
        if former != thread.tid:
            self.threads.pop(former, None)
            self.placement.moved(former, thread.tid)     # the exec'ing thread took the leader's tid
        for probe in self.probes + [self._loader_probe]:
            probe.sites = [s for s in probe.sites if s.process is not proc]
        if proc.shared_with is not None:
            proc.mem = linux.Memory(proc.pid)
            proc.shared_with = None
        else:
            proc.mem.close()
            proc.mem = linux.Memory(proc.pid)
        proc.objects = {}
        proc.syscall_gadget = None
        proc.invalidate_maps()
        filter_state = proc.filter_state
        self.patchers[proc.pid] = self._new_patcher(proc)
        proc.filter_state = filter_state
        self._armed[proc.pid] = set()
        self._semaphores[proc.pid] = {}
        proc.exec_seen = True
        if not self.follow and proc.pid != self.main_pid:
            proc.release_on_stop = True     # a vfork-style child has left our memory: let it go
            self._release_child(proc)
            return
        if self._holding == 0 and self.probes:
            # re-arm probes given by path in the new image, and watch its loader
            self._holding += 1
            try:
                proc.refresh_objects()
                for probe in self.probes:
                    if probe._identity is not None:
                        self._arm_probe(proc, probe, raise_errors=False)
                self._arm_loader(proc)
            finally:
                self._holding -= 1

    # ------------------------------------------------------------------ hits
    def _sigtrap(self, thread: Thread) -> None:
        raw = linux.get_regs(thread.tid)
        patcher = self.patchers.get(thread.process.pid)
        site = patcher.int3_sites.get(raw.rip) if patcher else None
        if site is not None:
            self._int3_hit(thread, site, raw)
            return
        if patcher is not None and raw.rip in patcher.retired:
            # a trap from a site disarmed since: run the restored instruction
            raw.rip -= 1
            linux.set_regs(thread.tid, raw)
            self._done(thread)
            return
        thread.pending_signal = signal.SIGTRAP
        self._done(thread)

    def _run_handlers(self, site: Site, hit_regs: Regs, tid: int) -> None:
        self._call_probes(site, hit_regs, tid)
        values = hit_regs._values
        for extra in site.chained:
            # the next instruction, inside this site's patch: as if the thread had gone on
            if values["rip"] != site.address:
                break                       # a handler moved the thread elsewhere
            values["rip"] = extra.address
            self._call_probes(extra, hit_regs, tid)
            if values["rip"] == extra.address:
                values["rip"] = site.address

    def _call_probes(self, site: Site, hit_regs: Regs, tid: int) -> None:
        for probe in site.probes:
            probe.hits += 1
            if probe.handler is None:
                continue
            hit = Hit(probe, site, tid, hit_regs)
            try:
                probe.handler(hit)
            except PtprobeError as exc:
                probe.errors += 1
                self.observer.handler_error(probe, hit, exc)
            except Exception as exc:  # noqa: BLE001 - reported, tracing goes on
                probe.errors += 1
                self.observer.handler_error(probe, hit, exc)
            hit._forget()

    def _int3_hit(self, thread: Thread, site: Site, raw: linux.Registers) -> None:
        regs = Regs(raw, {"rip": site.address})
        thread.in_hit = site
        self._run_handlers(site, regs, thread.tid)
        values = regs._values
        rip = values["rip"]
        for name in regs._dirty:
            setattr(raw, name, values[name])
        if rip != site.address:
            raw.rip = rip
        elif site.emulate:
            raw.rip = site.resume
        elif site.xol is not None:
            raw.rip = site.xol
        else:
            self._step_over(thread, site, raw)
            thread.in_hit = None
            self._done(thread)
            return
        if regs._dirty <= {"rip"}:
            linux.set_rip(thread.tid, raw.rip)      # PTRACE_POKEUSER costs the kernel a third of SETREGS
        else:
            linux.set_regs(thread.tid, raw)
        thread.in_hit = None
        self._done(thread)

    def _step_over(self, thread: Thread, site: Site, raw: linux.Registers) -> None:
        """Execute the original instruction in place, the other threads stopped."""
        proc = thread.process
        patcher = self.patchers[proc.pid]
        self._stop_world()
        try:
            raw.rip = site.address
            linux.set_regs(thread.tid, raw)
            proc.mem.write(site.patch_at, site.original)
            try:
                thread.stepping = True
                linux.singlestep(thread.tid)
                while True:
                    status = linux.wait_tid(thread.tid)
                    if not os.WIFSTOPPED(status):
                        self._thread_gone(thread, status)
                        return
                    sig = os.WSTOPSIG(status)
                    if (status >> 16) == 0 and sig == signal.SIGTRAP:
                        break
                    if (status >> 16) == 0:
                        thread.deferred_signals.append(sig)
                    linux.singlestep(thread.tid)
            finally:
                thread.stepping = False
                if site.armed and patcher.sites.get(site.address) is site:
                    proc.mem.write(site.patch_at, site.patched)
        finally:
            self._resume_world()

    def _slot_stop(self, thread: Thread) -> None:
        tid = thread.tid
        proc = thread.process
        raw = linux.get_regs(tid)
        patcher = self.patchers.get(proc.pid)
        site = patcher.slot_sites.get(raw.rip) if patcher else None
        if site is None:
            if patcher is not None and patcher.slot_frame_at(raw.rip, after_syscall=True):
                # a slot whose site was disarmed: finish the slot, no handlers
                self._finish_slot(thread, raw, patcher, after_syscall=True)
                self._done(thread)
                return
            raw.orig_rax = _U64
            raw.rax = (-_EPROTO) & _U64
            linux.set_regs(tid, raw)
            self._done(thread)
            return
        mem = proc.mem
        sp = raw.rsp

        def load(r: Regs) -> None:
            data = mem.read(sp, 24)
            v = r._values
            v.setdefault("rax", int.from_bytes(data[0:8], "little"))
            v.setdefault("r11", int.from_bytes(data[8:16], "little"))
            v.setdefault("rcx", int.from_bytes(data[16:24], "little"))

        regs = Regs(raw, {"rip": site.address, "rsp": sp + _SLOT_FRAME}, load)
        thread.in_hit = site
        self._run_handlers(site, regs, tid)
        dirty = regs._dirty
        values = regs._values
        if site.slot_kind == "return" and "rip" not in dirty and "rsp" not in dirty:
            if dirty:
                if dirty & {"rax", "r11", "rcx"}:
                    mem.write(sp, b"".join(values[n].to_bytes(8, "little") for n in ("rax", "r11", "rcx")))
                others = dirty - {"rax", "r11", "rcx"}
                if others:
                    for name in others:
                        setattr(raw, name, values[name])
                    linux.set_regs(tid, raw)
            thread.in_hit = None
            self._done(thread)
            return
        if regs._loader is not None:
            load(regs)
        for name in ("rax", "r11", "rcx", "rsp"):
            setattr(raw, name, values[name])
        for name in dirty:
            setattr(raw, name, values[name])
        raw.rip = values["rip"] if values["rip"] != site.address else site.resume
        raw.orig_rax = _U64
        linux.set_regs(tid, raw)
        thread.in_hit = None
        self._done(thread)

    def _finish_slot(self, thread: Thread, raw: linux.Registers, patcher: Patcher,
                     after_syscall: bool = False) -> None:
        """Complete by hand the slot *thread* is in (at a syscall stop, or anywhere in a seed slot)."""
        frame = patcher.slot_frame_at(raw.rip, after_syscall)
        if frame is None:
            return
        slot, offset, resume = frame
        if patcher.pages[slot & ~0xFFF].kind == "return":
            return            # self-returning slots finish by themselves
        progress = arch.seed_slot_frame(offset)
        sp = raw.rsp
        offsets = progress.stack_offsets()
        if progress.pushed:
            data = thread.process.mem.read(sp, 8 * len(progress.pushed))
            for name in progress.clobbered:
                setattr(raw, name, int.from_bytes(data[offsets[name]:offsets[name] + 8], "little"))
        sp = progress.program_rsp(sp)
        raw.rsp = sp
        raw.rip = resume
        if offset == arch.SEED_SLOT_SIZE:
            raw.orig_rax = _U64
        linux.set_regs(thread.tid, raw)

    # ------------------------------------------------------------------ stopping
    def _stop_world(self) -> None:
        """Stop every traced thread (events that arrive meanwhile are handled)."""
        self._holding += 1
        for thread in list(self.threads.values()):
            # interrupted or not: an earlier PTRACE_INTERRUPT may have been used up by a
            # stop that was not reported as its own; a second one merges with a pending one
            if not thread.stopped and not thread.exited:
                try:
                    linux.interrupt(thread.tid)
                    thread.interrupted = True
                except NoSuchProcessError:
                    thread.exited = True
        while any(not t.stopped and not t.exited for t in self.threads.values()):
            self._step_loop()

    def _resume_world(self) -> None:
        self._holding = max(0, self._holding - 1)
        if self._holding:
            return
        for thread in list(self.threads.values()):
            if thread.stopped and thread.in_hit is None:
                thread.resume()

    # ------------------------------------------------------------------ detaching
    def detach(self) -> None:
        """Restore every site, then let every traced process go, running."""
        self._check_thread()
        if not self.attached:
            return
        try:
            self._stop_world()
            self._drain_traps()
        except PtprobeError:
            pass
        for pid, proc in list(self.processes.items()):
            patcher = self.patchers.get(pid)
            if patcher is None or proc.exited:
                continue
            if proc.shared_with is None:
                try:
                    proc.refresh_objects()
                    self._forget_unmapped(proc)
                except PtprobeError:
                    pass
                for site in patcher.disarm_all():
                    self.observer.notice(f"process {pid}: cannot restore the site at {site.address:#x}")
                for address, count in self._semaphores.get(pid, {}).items():
                    if count > 0:
                        try:
                            self._adjust_semaphore(proc, address, -count)
                        except PtprobeError:
                            pass
            for thread in list(proc.threads.values()):
                self._release_thread(thread, patcher)
        self.threads.clear()
        self.attached = False
        self._holding = 0
        self.placement.release()

    def _drain_traps(self) -> None:
        """Let threads with a SIGTRAP still queued take it while the sites are armed."""
        for _ in range(100):
            pending = []
            for thread in list(self.threads.values()):
                if thread.exited or not thread.stopped or thread.group_stop:
                    continue
                try:
                    with open(f"/proc/{thread.process.pid}/task/{thread.tid}/status") as fh:
                        for line in fh:
                            if line.startswith("SigPnd:"):
                                if int(line.split()[1], 16) & (1 << (signal.SIGTRAP - 1)):
                                    pending.append(thread)
                                break
                except OSError:
                    continue
            if not pending:
                return
            for thread in pending:
                thread.stopped = False
                sig, thread.pending_signal = thread.pending_signal, 0
                linux.cont(thread.tid, sig)
            while any(not t.stopped and not t.exited for t in self.threads.values()):
                self._step_loop()

    def _release_thread(self, thread: Thread, patcher: Patcher) -> None:
        if thread.exited:
            return
        try:
            if thread.stopped:
                raw = linux.get_regs(thread.tid)
                if thread.in_hit is not None:
                    # interrupted while its hit was handled: back to the site
                    self._rewind(thread, raw, patcher)
                elif patcher.slot_frame_at(raw.rip) is not None:
                    self._finish_slot(thread, raw, patcher)
            sig = thread.pending_signal
            if not sig and thread.deferred_signals:
                sig = thread.deferred_signals[0]
            linux.detach(thread.tid, sig)
        except NoSuchProcessError:
            pass

    def _rewind(self, thread: Thread, raw: linux.Registers, patcher: Patcher) -> None:
        site = thread.in_hit
        thread.in_hit = None
        if site is None:
            return
        if site.mechanism == "int3":
            if raw.rip == site.address + 1:
                raw.rip = site.address
                linux.set_regs(thread.tid, raw)
        elif patcher.slot_frame_at(raw.rip, after_syscall=True) is not None:
            self._finish_slot(thread, raw, patcher, after_syscall=True)

    def close(self) -> None:
        """Detach (attach mode) or detach and wait for the program (run mode)."""
        if self.attached:
            self.detach()
        if self.mode == "run" and self.returncode is None and self.main_pid:
            try:
                _, status = os.waitpid(self.main_pid, 0)
                self.returncode = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
            except ChildProcessError:
                pass

    def kill(self) -> None:
        """Kill the traced program (run mode) and reap it."""
        if self.main_pid and self.returncode is None:
            try:
                os.kill(self.main_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            while self.returncode is None and self.threads:
                self._step_loop()
            self.attached = False

    def _check_thread(self) -> None:
        if threading.get_ident() != self._owner:
            raise TracerError("a session must be used from the thread that created it")

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.mode == "run" and self.returncode is None:
            try:
                self.detach()
            finally:
                if self.main_pid:
                    try:
                        os.kill(self.main_pid, signal.SIGKILL)
                        os.waitpid(self.main_pid, 0)
                    except (ProcessLookupError, ChildProcessError):
                        pass
            return
        self.close()


def run(argv: Sequence[str], *, env: Optional[Dict[str, str]] = None, **options) -> Session:
    """Start *argv* under tracing; returns a session whose program is stopped
    after the dynamic loader has mapped its libraries, before any of the
    program's own code (constructors included) has run.

    Options: ``slots`` ("return" or "seed"), ``seccomp`` (False: int3 only),
    ``max_trampoline_pages``, ``follow``, ``observer``, ``colocate`` (True:
    share one CPU with a single-threaded program, "all": with every thread,
    False: never; see :mod:`ptprobe.placement`).
    """
    session = Session(mode="run", **options)
    try:
        session._start(list(argv), env)
    except BaseException:
        if session.main_pid and session.returncode is None:
            try:
                os.kill(session.main_pid, signal.SIGKILL)
                os.waitpid(session.main_pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        raise
    return session


def attach(pid: int, **options) -> Session:
    """Attach to the running process *pid* (all its threads); it stays
    stopped until :meth:`Session.wait`.

    Options: as :func:`run`, plus ``allow_no_new_privs`` (needed for jmp slots
    when the process lacks CAP_SYS_ADMIN).
    """
    session = Session(mode="attach", **options)
    try:
        session._attach(pid)
    except BaseException:
        session.detach() if session.attached else None
        raise
    return session

"""ptprobe: a userspace probe agent for Linux x86-64, built on ptrace.

    import ptprobe
    with ptprobe.run(["./prog", "arg"]) as session:        # or ptprobe.attach(pid)
        probe = session.probe("uprobe:./prog:compute", handler)
        status = session.wait()
    probe.hits
"""

from .errors import (FaultError, HandlerError, InstructionBoundaryError, NoSuchProcessError,
                     ObjectFileError, ProbeSpecError, ProgramStartError, PtprobeError,
                     SitePatchedError, SymbolNotFoundError, TraceFormatError, TracePermissionError, TracerError)
from .aggregate import Aggregation
from .calltrace import Call, CallTrace
from .filter import Filter
from .hit import UNREADABLE, Hit, Record, Regs, ReturnHit
from .latency import Histogram
from .patching import Site
from .probes import Probe
from .session import Observer, Session, attach, run
from .spec import ProbeSpec, parse_spec, return_spec

__version__ = "0.1.0"

__all__ = [
    "run", "attach", "Session", "Probe", "Site", "Hit", "ReturnHit", "Record", "UNREADABLE", "Histogram", "Regs", "Observer", "ProbeSpec", "parse_spec", "return_spec",
    "Aggregation", "Filter", "Call", "CallTrace",
    "PtprobeError", "ProbeSpecError", "NoSuchProcessError", "TracePermissionError", "ObjectFileError",
    "SymbolNotFoundError", "InstructionBoundaryError", "SitePatchedError", "ProgramStartError",
    "FaultError", "TracerError", "HandlerError", "TraceFormatError", "__version__",
]

"""Text and JSON shapes of what return probes, stacks and timestamps add to a
hit, and of latency histograms: what the command line prints, kept apart from
its option handling. Uses only the public API of :mod:`ptprobe`.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional

import ptprobe
from ptprobe.unwind import Frame

__all__ = ["timestamp", "stack_lines", "stack_text", "stack_json", "return_text", "return_json",
           "histogram_lines", "latency_report"]

_BAR = 40
_INDENT = " " * 8


def timestamp(hit: ptprobe.Hit) -> str:
    """The hit's CLOCK_MONOTONIC time in seconds, as ``perf script`` shows it."""
    return f"{hit.time_ns // 1_000_000_000}.{hit.time_ns % 1_000_000_000 // 1000:06d}"


def stack_lines(frames: Iterable[Frame]) -> List[str]:
    """One indented line per frame: ``address symbol+0xoff (object)``."""
    return [f"{_INDENT}{frame.address:#x} {frame}" for frame in frames]


def stack_text(hit: ptprobe.Hit, max_frames: int = 64) -> str:
    """The hit's stack as lines after the hit's own (each starts with a newline)."""
    return "".join("\n" + line for line in stack_lines(hit.stack(max_frames)))


def stack_json(hit: ptprobe.Hit, max_frames: int = 64) -> List[Dict[str, Any]]:
    """The hit's stack as JSON values: address, symbol, offset, object."""
    return [{"address": f.address, "symbol": f.symbol, "offset": f.offset, "object": f.object}
            for f in hit.stack(max_frames)]


def _signed(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >> 63 else value


def return_text(hit: ptprobe.ReturnHit) -> str:
    """``retval=... duration=...us`` for a return hit's text line (the return value
    signed when it is small, else in hex)."""
    value = _signed(hit.retval)
    shown = str(value) if -0x10000 < value < 0x10000 else f"{hit.retval:#x}"
    return f"retval={shown} duration={hit.duration_ns / 1000:.3f}us"


def return_json(hit: ptprobe.ReturnHit) -> Dict[str, Any]:
    """The fields a return hit adds to its JSON object."""
    return {"return": True, "retval": hit.retval, "duration_ns": hit.duration_ns,
            "entry_time_ns": hit.entry_time_ns, "return_address": hit.return_address}


def histogram_lines(histogram: ptprobe.Histogram, unit: str = "nsecs") -> List[str]:
    """A log2 histogram drawn in text: one row per bucket (value range, count,
    a bar scaled to the largest bucket), then the average, total and count."""
    rows = histogram.buckets()
    top = max((count for _, _, count in rows), default=0)
    width = max([len(unit)] + [len(str(high)) for _, high, _ in rows])
    lines = [f"{unit:>{width}}    {'':<{width}} : count    distribution"]
    for low, high, count in rows:
        stars = "*" * (round(_BAR * count / top) if top else 0)
        lines.append(f"{low:>{width}} -> {high:<{width}} : {count:<8} |{stars:<{_BAR}}|")
    lines.append(f"avg = {histogram.mean:.0f} {unit}, total: {histogram.total} {unit}, count: {histogram.count}")
    return lines


def latency_report(probe: ptprobe.Probe, function: Optional[str] = None) -> List[str]:
    """The latency histograms of a return probe, one per function it saw
    (*function* alone if given), each headed by the function's name."""
    lines: List[str] = []
    for name, histogram in sorted(probe.latency.items()):
        if function is not None and name != function:
            continue
        lines.append(f"latency of {name} ({probe.name}):")
        lines.extend(histogram_lines(histogram))
        lines.append("")
    if not lines:
        lines = [f"latency of {probe.name}: no call returned", ""]
    return lines

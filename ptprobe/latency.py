"""Log2 histograms of durations, the data behind ``--latency``.

A return probe adds the duration of each call it sees (nanoseconds, from the
entry's stop to the return's) to a :class:`Histogram` per function
(``probe.latency[name]``). Bucket *i* counts the values whose bit length is *i*:
bucket 0 holds 0, bucket *i* > 0 holds ``2**(i-1)`` to ``2**i - 1``. Pure data;
``ptprobe.render`` prints it.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

__all__ = ["Histogram", "BUCKETS"]

#: Buckets of a histogram: values up to 2**64 - 1.
BUCKETS = 65


class Histogram:
    """Counts of values (durations in ns) in power-of-two buckets, with their count,
    sum, minimum and maximum."""

    __slots__ = ("counts", "count", "total", "min", "max")

    def __init__(self, values: Iterable[int] = ()) -> None:
        self.counts: List[int] = [0] * BUCKETS
        self.count = 0
        self.total = 0
        self.min: Optional[int] = None
        self.max: Optional[int] = None
        for value in values:
            self.add(value)

    def add(self, value: int) -> None:
        """Count one value (negative values count as 0)."""
        value = max(0, min(int(value), (1 << 64) - 1))
        self.counts[value.bit_length()] += 1
        self.count += 1
        self.total += value
        if self.min is None or value < self.min:
            self.min = value
        if self.max is None or value > self.max:
            self.max = value

    def update(self, other: "Histogram") -> None:
        """Add every value counted by *other*."""
        for i, n in enumerate(other.counts):
            self.counts[i] += n
        self.count += other.count
        self.total += other.total
        for value in (other.min, other.max):
            if value is not None:
                self.min = value if self.min is None else min(self.min, value)
                self.max = value if self.max is None else max(self.max, value)

    @property
    def mean(self) -> float:
        """The average value (0.0 when empty)."""
        return self.total / self.count if self.count else 0.0

    @staticmethod
    def bounds(index: int) -> Tuple[int, int]:
        """(lowest, highest) value of bucket *index*."""
        return (1 << index) >> 1, (1 << index) - 1

    def buckets(self) -> List[Tuple[int, int, int]]:
        """(lowest, highest, count) of every bucket from the first to the last that
        is not empty (empty ones between them included); [] when empty."""
        used = [i for i, n in enumerate(self.counts) if n]
        if not used:
            return []
        return [(*self.bounds(i), self.counts[i]) for i in range(used[0], used[-1] + 1)]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Histogram):
            return NotImplemented
        return (self.counts, self.count, self.total, self.min, self.max) == \
            (other.counts, other.count, other.total, other.min, other.max)

    def __repr__(self) -> str:
        return f"<Histogram count={self.count} mean={self.mean:.0f} ns>"

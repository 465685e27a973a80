"""Where the command line's output goes, and what a hit looks like in it.

:class:`Output` is the stream hit lines and aggregations are written to: a
write error ends it (a reader that went away quietly, a full disk with an
error) and tells its owner once, so that tracing can end instead of failing
on every hit.

The formatting functions take a *hit-like* object: anything with ``probe``
(with a ``name``), ``name``, ``pid``, ``tid``, ``address`` and ``args``, and
for strings ``read_str``. A :class:`ptprobe.Hit` is one; so can be a record
of a hit that did not stop the program. Nothing here touches a process.
"""

from __future__ import annotations

import errno
import os
import time
from typing import IO, Callable, Optional

#: Seconds a written line may wait in the buffer of an output that is not a terminal.
FLUSH_AFTER = 0.2


class Output:
    """A text stream for hit lines that ends, once, at its first write error.

    ``error`` is None after a reader went away (EPIPE: the usual end of
    ``ptprobe ... | head``), or the :class:`OSError` that ended it. Lines go out
    at once to a terminal, otherwise at most :data:`FLUSH_AFTER` seconds late
    (on a later write or :meth:`flush`)."""

    def __init__(self, stream: IO[str], name: str, on_close: Callable[[], None] = lambda: None,
                 line_buffered: Optional[bool] = None) -> None:
        self.stream = stream
        self.name = name
        self.on_close = on_close
        if line_buffered is None:
            try:
                line_buffered = stream.isatty()
            except (OSError, ValueError):
                line_buffered = False
        self.line_buffered = line_buffered
        self.closed = False
        self.error: Optional[OSError] = None
        self._flushed = time.monotonic()

    def write(self, text: str) -> None:
        if self.closed:
            return
        try:
            self.stream.write(text)
            if self.line_buffered:
                self.stream.flush()
            else:
                now = time.monotonic()
                if now - self._flushed >= FLUSH_AFTER:
                    self._flushed = now
                    self.stream.flush()
        except OSError as exc:
            self._fail(exc)

    def flush(self) -> None:
        if self.closed:
            return
        try:
            self.stream.flush()
        except OSError as exc:
            self._fail(exc)
        self._flushed = time.monotonic()

    def _fail(self, exc: OSError) -> None:
        self.closed = True
        self.error = None if exc.errno == errno.EPIPE else exc
        self._discard()
        self.on_close()

    def _discard(self) -> None:
        """Let what is still buffered go nowhere: the descriptor now writes to
        /dev/null, so that closing the stream (or the interpreter's last flush of
        stdout) does not fail again."""
        try:
            fd = self.stream.fileno()
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, fd)
            finally:
                os.close(null)
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        """Flush, then close the stream unless it is stdout or stderr."""
        self.flush()
        try:
            if self.stream.fileno() > 2:
                self.stream.close()
        except (OSError, ValueError):
            pass

    @property
    def problem(self) -> Optional[str]:
        """The write error as one line, None if there was none."""
        if self.error is None:
            return None
        return f"cannot write to {self.name}: {self.error.strerror or self.error}"

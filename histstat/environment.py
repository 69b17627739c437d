"""The streams histstat talks to, in one object that tests can swap."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import BinaryIO, TextIO

try:
    import select

    _poll = getattr(select, "poll", None)
except ImportError:  # pragma: no cover - every platform we know has select
    _poll = None


@dataclass
class Environment:
    """stdout (binary; None when the caller closed it), stderr (None when closed)."""

    stdout: BinaryIO | None
    stderr: TextIO | None
    stdout_encoding: str
    stdout_isatty: bool
    no_color: bool = False  # the NO_COLOR convention: set and not empty

    @classmethod
    def from_sys(cls) -> Environment:
        stdout = sys.stdout  # None when started with stdout closed (>&-)
        return cls(
            stdout=stdout.buffer if stdout is not None else None,
            stderr=sys.stderr,
            stdout_encoding=(stdout.encoding if stdout is not None else None) or "utf-8",
            stdout_isatty=stdout is not None and stdout.isatty(),
            no_color=bool(os.environ.get("NO_COLOR")),
        )

    def terminal_width(self) -> int | None:
        """Columns of the terminal on stdout, asked each time (it may be resized)."""
        if not self.stdout_isatty or self.stdout is None:
            return None
        try:
            columns = os.get_terminal_size(self.stdout.fileno()).columns
        except (OSError, ValueError):
            return None
        return columns or None  # 0: a terminal whose size was never set

    def say(self, line: str) -> None:
        """One line on stderr, or nowhere when stderr is closed: never on stdout,
        which carries rows only (print(file=None) would pick stdout)."""
        if self.stderr is None:
            return
        try:
            print(line, file=self.stderr, flush=True)
        except (OSError, ValueError):
            pass

    def notice(self, message: str) -> None:
        self.say(f"histstat: {message}")


def reader_gone(stream: BinaryIO) -> bool:
    """True when the reading end of stdout's pipe was closed (``histstat | head``).

    Checked between polls, so histstat ends within an interval even when it has no row
    to write (a write would only then fail with EPIPE). POSIX only; elsewhere the next
    write tells.
    """
    if _poll is None:
        return False
    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):
        return False
    poller = _poll()
    poller.register(fd, select.POLLOUT)
    events = poller.poll(0)
    return any(mask & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for _, mask in events)

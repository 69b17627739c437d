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
    stdout: BinaryIO
    stderr: TextIO
    stdout_encoding: str
    stdout_isatty: bool

    @classmethod
    def from_sys(cls) -> Environment:
        return cls(
            stdout=sys.stdout.buffer,
            stderr=sys.stderr,
            stdout_encoding=sys.stdout.encoding or "utf-8",
            stdout_isatty=sys.stdout.isatty(),
        )

    def notice(self, message: str) -> None:
        """One line on stderr; stdout carries rows only."""
        print(f"histstat: {message}", file=self.stderr, flush=True)


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


def silence_stdout() -> None:
    """Point stdout at the null device so the interpreter's final flush cannot fail
    on a closed pipe and print "Exception ignored" noise."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass

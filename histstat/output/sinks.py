"""Sinks own where lines go: stdout and log files, their handles, flushing and errors."""

from __future__ import annotations

import os
import stat
from typing import BinaryIO, Callable

from histstat.output.base import ReaderGone, SinkError
from histstat.output.files import LOG_KINDS, check_path, open_path


def _describe(exc: OSError) -> str:
    return exc.strerror or str(exc)


class StdoutSink:
    """Rows to stdout, in the terminal's encoding; undecodable text is escaped."""

    def __init__(self, stream: BinaryIO, encoding: str, newline: str = "\n") -> None:
        self._stream = stream
        self._encoding = encoding
        self._newline = newline
        self._abandoned = False

    def _set_blocking(self, blocking: bool) -> None:
        try:
            os.set_blocking(self._stream.fileno(), blocking)
        except (OSError, ValueError, AttributeError):
            pass

    def stop_blocking(self) -> None:
        """At the end of a run, a reader that stopped reading must not hold histstat:
        until ``finish``, a write that would block gives up on stdout (the log still
        gets every row)."""
        self._set_blocking(False)

    def finish(self) -> None:
        """Undo ``stop_blocking`` (the descriptor may be the shell's terminal too), and
        discard what stdout could not take."""
        self._set_blocking(True)
        if self._abandoned:
            self.discard()

    def discard(self) -> None:
        """Give up on stdout: point it at the null device, so that the interpreter's
        final flush cannot fail on a closed pipe and print "Exception ignored" noise."""
        self._abandoned = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass

    def open(self, header: str | None) -> None:
        if header is not None:
            self.write(header)
            self.flush()

    def write(self, line: str) -> None:
        if self._abandoned:
            return
        try:
            self._stream.write((line + self._newline).encode(self._encoding, "backslashreplace"))
        except BlockingIOError:
            self._abandoned = True
        except BrokenPipeError as exc:
            raise ReaderGone() from exc
        except OSError as exc:
            raise SinkError(f"cannot write to stdout: {_describe(exc)}") from exc

    def flush(self) -> None:
        if self._abandoned:
            return
        try:
            self._stream.flush()
        except BlockingIOError:
            self._abandoned = True
        except BrokenPipeError as exc:
            raise ReaderGone() from exc
        except OSError as exc:
            raise SinkError(f"cannot write to stdout: {_describe(exc)}") from exc

    def check(self) -> None:
        pass  # whether stdout is open at all is build_outputs' question

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        self.flush()


def warn_if_exposed(info: os.stat_result, what: str, warn: Callable[[str], None]) -> None:
    """Warn when a file of rows (other users' command lines) is readable by others."""
    if not stat.S_ISREG(info.st_mode):
        return
    if info.st_mode & 0o044:
        warn(
            f"{what} is readable by group or others (mode "
            f"{stat.S_IMODE(info.st_mode):04o}); it holds other users' command lines"
        )
    if hasattr(os, "geteuid") and info.st_uid != os.geteuid():
        warn(f"{what} belongs to another user (uid {info.st_uid}), who can read every row")


class LogSink:
    """Rows appended to a file, written one by one so ``tail -f`` and a crash lose nothing.

    A new file is created 0600 (rows hold other users' command lines); the header goes in
    only when the file is empty; ``reopen`` (on SIGHUP) follows a rotated log, through the
    same checks as the first open (``files.open_path``: no link, FIFO or socket, nothing
    another user owns or can swap). Writes go straight to the descriptor: no buffer can
    hold a row back, or fail again at close.
    """

    def __init__(self, path: str, warn: Callable[[str], None], newline: str = "\n") -> None:
        self.path = path
        self._warn = warn
        self._newline = newline
        self._fd: int | None = None
        self._header: str | None = None
        self._os_write = os.write  # tests replace it to simulate a disk filling up

    def check(self) -> None:
        check_path(self.path, self._what, LOG_KINDS)

    @property
    def _what(self) -> str:
        return f"log {self.path!r}"

    def open(self, header: str | None) -> None:
        self._header = header
        flags = os.O_WRONLY | os.O_APPEND | getattr(os, "O_BINARY", 0)
        self._fd, info = open_path(self.path, self._what, flags, LOG_KINDS)
        warn_if_exposed(info, f"log {self.path!r}", self._warn)
        if header is not None and info.st_size == 0:
            self.write(header)

    def write(self, line: str) -> None:
        assert self._fd is not None
        data = (line + self._newline).encode("utf-8", "backslashreplace")
        written = 0
        try:
            while written < len(data):
                written += self._os_write(self._fd, data[written:])
        except OSError as exc:
            self._take_back(written)
            raise SinkError(f"cannot write log {self.path!r}: {_describe(exc)}") from exc

    def _take_back(self, count: int) -> None:
        """Remove the start of a row that could not be written whole (disk full), so the
        log ends with a complete row: JSON readers choke on half a line."""
        if count:
            try:
                os.ftruncate(self._fd, os.fstat(self._fd).st_size - count)
            except OSError:
                pass

    def flush(self) -> None:
        pass  # every write reached the file already

    def reopen(self) -> None:
        self.close()
        self.open(self._header)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

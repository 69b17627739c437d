"""Sinks own where lines go: stdout and log files, their handles, flushing and errors."""

from __future__ import annotations

import errno
import math
import os
import stat
import time
from typing import Any, BinaryIO, Callable

from histstat.output.base import ReaderGone, SinkBusy, SinkError
from histstat.output.files import LOG_KINDS, check_path, open_path

try:
    import select

    _poll = getattr(select, "poll", None)
    _PIPE_BUF = getattr(select, "PIPE_BUF", 512)
except ImportError:  # pragma: no cover - every platform we know has select
    _poll = None
    _PIPE_BUF = 512


def _describe(exc: OSError) -> str:
    return exc.strerror or str(exc)


# stdout's bytes collect up to this much before they are written; a row longer than
# that is written as soon as it is whole.
_STDOUT_BUFFER = 1 << 16
# How long one wait for a stalled reader lasts before histstat looks again at whether
# the run is ending.
_WAIT_SLICE = 0.05
# Past ``give_up_at``, the row being written is still finished while the reader keeps
# making room, but a reader that makes none for this long is given up on.
_STALLED = 0.25


def _descriptor(stream: BinaryIO) -> int | None:
    """The descriptor to write rows to directly, or None for a stream that has none (or
    a platform without poll()): then rows go through the stream, blocking as it does."""
    if _poll is None:
        return None
    try:
        return stream.fileno()
    except (OSError, ValueError, AttributeError):
        return None


# How a write to stdout is made so that it never blocks (see ``_write_mode``).
_FILE, _NOWAIT, _SMALL = "file", "nowait", "small"
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", None)  # Linux 4.14+, Python 3.7+


def _write_mode(fd: int) -> str:
    """How to write to ``fd`` without ever blocking inside the write, where a signal
    could not be answered without cutting a row, and without making the descriptor
    non-blocking, which the shell and other jobs sharing it would see.

    Files and devices other than terminals do not wait for a reader: plain large
    writes (_FILE). Pipes and sockets take RWF_NOWAIT on recent kernels: a write of
    what fits (_NOWAIT, tried first, given up for _SMALL if refused). Otherwise, a
    write no larger than PIPE_BUF, made once poll() says there is room, does not block
    (_SMALL)."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return _SMALL
    if stat.S_ISREG(mode) or (stat.S_ISCHR(mode) and not os.isatty(fd)):
        return _FILE
    if (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)) and _RWF_NOWAIT is not None:
        return _NOWAIT
    return _SMALL


class StdoutSink:
    """Rows to stdout, in the terminal's encoding; undecodable text is escaped.

    Rows are written to the descriptor directly, as much at a time as the reader has
    made room for, so histstat never blocks inside a write (``_write_mode``). A reader
    that stops reading (a paused pager) is waited for between two writes until
    ``wait_until`` (the runner: until the next poll is due); then stdout stops between
    two rows, keeps the rest of a row it had started in its own buffer, to finish first,
    and says ``SinkBusy`` on ``flush``: the writer holds the rows it did not take, while
    the poll, the log and the database go on. Once the run is ending (SIGTERM, Ctrl-C,
    the end of --duration) rows keep going out until ``give_up_at``; past it no row is
    started, the row being written is finished only while the reader keeps making room,
    and a reader that stalls gets stdout abandoned for good. A row cut short is never
    followed by another one.
    """

    def __init__(self, stream: BinaryIO, encoding: str, newline: str = "\n") -> None:
        self._stream = stream
        self._encoding = encoding
        self._newline = newline
        self._abandoned = False
        self._fd = _descriptor(stream)
        self._buffer = bytearray()
        self._row_ends: list[int] = []  # where each row in the buffer ends
        # The buffer starts with the rest of a row that a stalled reader cut short: it is
        # no row of the writer's current chunk, and is finished before any other.
        self._carried = False
        self._accepted = 0  # rows of the writer's chunk that stdout took (sent or kept)
        self._stalled = False  # stdout takes no more rows until the next flush says so
        self._mode = _write_mode(self._fd) if self._fd is not None else _FILE
        self._room: Any = None
        if self._fd is not None and _poll is not None:
            self._room = _poll()
            self._room.register(self._fd, select.POLLOUT)
        # The monotonic time past which a reader that does not read is given up on; the
        # runner points it at the end of the grace a signal (or --duration's end) leaves.
        self.give_up_at: Callable[[], float] = lambda: math.inf
        # The monotonic time until which a write waits for a reader that does not read
        # before stdout says it is busy; the runner points it at the next poll.
        self.wait_until: Callable[[], float] = lambda: math.inf

    @property
    def abandoned(self) -> bool:
        """stdout was given up on (its reader stopped reading while the run ended)."""
        return self._abandoned

    @property
    def stalled(self) -> bool:
        """stdout's reader stopped reading: rows written now are not taken."""
        return self._stalled

    def discard(self) -> None:
        """Give up on stdout: point it at the null device, so that the interpreter's
        final flush cannot fail on a closed pipe and print "Exception ignored" noise."""
        self._abandoned = True
        self._buffer.clear()
        self._row_ends.clear()
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
        if self._abandoned or self._stalled:
            return
        if not self._buffer and time.monotonic() >= self.give_up_at():
            self._abandoned = True  # no row is in flight, and none is started any more
            return
        data = (line + self._newline).encode(self._encoding, "backslashreplace")
        if self._fd is None:
            self._write_stream(data)
            return
        self._buffer += data
        self._row_ends.append(len(self._buffer))
        self._accepted += 1
        if len(self._buffer) >= _STDOUT_BUFFER:
            self._send()

    def flush(self) -> None:
        if self._abandoned:
            return
        if self._fd is None:
            self._flush_stream()
            return
        if not self._stalled:
            self._send()
        accepted, self._accepted = self._accepted, 0
        if self._stalled and not self._abandoned:
            self._stalled = False  # the next chunk tries again
            raise SinkBusy("stdout", "not being read", taken=accepted, stdout=True)

    def _send(self) -> None:
        """Write the buffer out, waiting for room until ``wait_until`` (then the sink is
        stalled) or, once the run is ending, as ``give_up_at`` allows."""
        assert self._fd is not None
        data = memoryview(self._buffer)
        ends = self._row_ends
        sent = 0
        row = 0  # the row being written: it ends at ends[row]
        wait_until = self.wait_until()
        try:
            while sent < len(data):
                while ends[row] <= sent:
                    row += 1
                now = time.monotonic()
                late = now >= self.give_up_at()
                between = sent == (ends[row - 1] if row else 0)
                if late and between:
                    self._abandoned = True  # between two rows: nothing is cut
                    return
                if not late and now >= wait_until and not self._room.poll(0):
                    self._stalled = True
                    return
                # Past the deadline, only the rest of the row in flight.
                chunk = data[sent : ends[row] if late else len(data)]
                try:
                    written = self._write_some(chunk)
                finally:
                    # Released at once: a view left alive (in a raised exception's frame)
                    # keeps the buffer exported, and then cannot be cut below.
                    chunk.release()
                if written:
                    sent += written
                    continue
                slice_ = _STALLED if late else min(_WAIT_SLICE, max(wait_until - now, 0.0))
                if not self._room.poll(slice_ * 1000):
                    if late:
                        self._abandoned = True  # a row cut short, and nothing after it
                        return
        finally:
            data.release()
            self._keep_unsent(sent, row)

    def _keep_unsent(self, sent: int, row: int) -> None:
        """After a send: forget what went out; a stalled sink keeps only the rest of the
        row it had started (to finish first next time) and gives the writer back the
        rows it had not started, for the writer to hold and write again."""
        if self._abandoned:
            self._buffer.clear()
            self._row_ends.clear()
            return
        if sent >= len(self._buffer):
            self._buffer.clear()
            self._row_ends.clear()
            self._carried = False
            return
        started = sent > (self._row_ends[row - 1] if row else 0) or (row == 0 and self._carried)
        keep = row + 1 if started else row  # rows that went out or are in flight
        self._accepted -= len(self._row_ends) - keep
        end = self._row_ends[keep - 1] if keep else 0
        del self._buffer[end:]
        del self._buffer[:sent]
        self._row_ends = [len(self._buffer)] if self._buffer else []
        self._carried = bool(self._buffer)

    def _write_some(self, data: memoryview) -> int:
        """Write what stdout takes now, without waiting: 0 when it has no room."""
        assert self._fd is not None
        try:
            if self._mode == _FILE:
                return os.write(self._fd, data)
            if self._mode == _NOWAIT and _RWF_NOWAIT is not None:
                try:
                    return os.pwritev(self._fd, [data], -1, _RWF_NOWAIT)
                except BlockingIOError:
                    return 0
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ESPIPE):
                        raise
                    self._mode = _SMALL  # an older kernel: see _write_mode
            if not self._room.poll(0):
                return 0
            return os.write(self._fd, data[:_PIPE_BUF])
        except BlockingIOError:
            return 0  # the descriptor was made non-blocking by someone else
        except BrokenPipeError as exc:
            raise ReaderGone() from exc
        except OSError as exc:
            raise SinkError(f"cannot write to stdout: {_describe(exc)}") from exc

    def _write_stream(self, data: bytes) -> None:
        self._on_stream(lambda: self._stream.write(data))

    def _flush_stream(self) -> None:
        self._on_stream(self._stream.flush)

    def _on_stream(self, operation: Callable[[], object]) -> None:
        """One write or flush of the stream: a would-block gives stdout up, a closed pipe
        is the reader gone, anything else a one-line error."""
        try:
            operation()
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
        try:
            self.flush()
        except SinkBusy:
            self._abandoned = True  # a run ended by an error: no reader is waited for
        if self._abandoned:
            self.discard()


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
        if count and self._fd is not None:
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

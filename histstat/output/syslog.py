"""The syslog sink: each row as one datagram to the local syslog socket, framed as
syslog(3) frames it, and never holding the poll back."""

from __future__ import annotations

import errno
import math
import os
import re
import socket
import stat
import time
from typing import Callable

from histstat.enrich import COMMAND_MARKER, cut_arguments_at
from histstat.output.base import SinkError
from histstat.records import Row

DEFAULT_SOCKET = "/dev/log"

# The facilities of <syslog.h> by name, as logger(1) and rsyslog's selectors call them.
FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6,
    "news": 7, "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11,
    **{f"local{number}": 16 + number for number in range(8)},
}  # fmt: skip
DEFAULT_FACILITY = "user"

# Every row is sent at LOG_INFO: a row is an observation, not a fault of histstat's; an
# analyst's rules pick histstat's rows by app-name or facility, not by severity.
SEVERITY_INFO = 6

# --syslog-size: receivers cut longer records, which would leave half a JSON document.
# rsyslog's default maxMessageSize is 8 KiB, which it counts as 8096 bytes of the whole
# datagram, header included (measured: 8,096 bytes arrive whole, 8,097 are cut); journald
# and syslog-ng take more. The smallest size leaves room for the header and a row
# without its command line; the largest fits a Unix datagram in the kernel's default
# send buffer (net.core.wmem_default, 208 KiB).
DEFAULT_SIZE = 8096
MIN_SIZE = 1024
MAX_SIZE = 65536

TAG = "histstat"
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

# What a receiver could take for the end of a record, or use to make a line of its own:
# C0 controls (NUL, LF, CR) but the tab that separates plain columns, DEL, C1 (NEL) and
# the Unicode line and paragraph separators. The formatters already escape them; they
# are escaped here again, as JSON's \uXXXX, which stays valid inside a JSON string and
# reads as an escape in text.
_RECORD_BREAKERS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")

# The end of a command line that --command-limit cut: the characters it left out.
_CUT_MARKER = re.compile(re.escape(COMMAND_MARKER).replace(r"\{removed\}", r"([0-9]+)") + r"\Z")

# After the socket went away (its receiver restarted), a new connection is tried at
# once, then after this many seconds, doubling up to the most: a receiver that stays away
# costs one connect() per few seconds, and one back is used within seconds.
RECONNECT_FIRST = 0.25
RECONNECT_MAX = 5.0

# Rows dropped for syslog are told at once, then at most this often, with the count.
DROP_NOTICE_EVERY = 60.0

# Why rows did not reach the receiver, as the notice says it after their count.
FULL = "with the socket full (its receiver is not reading)"
GONE = "with the socket gone (its receiver restarting?)"
TOO_LARGE = "too large for --syslog-size even with the command line emptied"

_GONE_ERRORS = frozenset(
    {errno.ECONNREFUSED, errno.ENOENT, errno.ENOTCONN, errno.ECONNRESET, errno.EPROTOTYPE}
)


def priority(facility: str, severity: int = SEVERITY_INFO) -> int:
    """The PRI of a record: facility * 8 + severity."""
    return FACILITIES[facility] * 8 + severity


def syslog_timestamp(seconds: float) -> str:
    """The local time as syslog(3) writes it (strftime "%h %e %T" in the C locale):
    ``Nov  6 09:05:01``, whatever the process's locale."""
    local = time.localtime(seconds)
    clock = f"{local.tm_hour:02d}:{local.tm_min:02d}:{local.tm_sec:02d}"
    return f"{_MONTHS[local.tm_mon - 1]} {local.tm_mday:2d} {clock}"


def header_length(facility: str, pid: int) -> int:
    """The bytes a record spends before its message."""
    return len(f"<{priority(facility)}>{syslog_timestamp(0)} {TAG}[{pid}]: ")


def safe_message(text: str) -> str:
    """``text`` with nothing a receiver could read as the end of one record and the
    start of another."""
    if text.isascii() and text.isprintable():
        return text
    return _RECORD_BREAKERS.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def _encoded(text: str) -> bytes:
    return safe_message(text).encode("utf-8", "backslashreplace")


def _whole_command(row: Row) -> tuple[str, int]:
    """(the command text histstat has, the whole command line's length): a command that
    --command-limit already cut is taken without its marker, so that a cut here says how
    much of the whole was left out."""
    command = row.command or ""
    whole = row.command_length if row.command_length is not None else len(command)
    found = _CUT_MARKER.search(command) if whole != len(command) else None
    if found and found.start() + int(found.group(1)) == whole:
        return command[: found.start()], whole
    return command, max(whole, len(command))


def _shortened(row: Row, kept: str, keep: int, whole: int) -> Row:
    marker = COMMAND_MARKER.format(removed=whole - keep)
    args = cut_arguments_at(row.args, keep, marker) if row.args else row.args
    return row._replace(command=kept[:keep] + marker, args=args)


class MessageFitter:
    """The view of the syslog sink: a row in the chosen format (``format_row``), made
    safe for a record and encoded, fitted under ``budget`` bytes by shortening its
    command line (and argv) with --command-limit's marker, so that a JSON document stays
    whole. What does not fit even with the command emptied comes back as it is, too
    long: the sink drops it and says so."""

    def __init__(self, format_row: Callable[[Row], str], budget: int) -> None:
        self._format_row = format_row
        self.budget = budget

    def __call__(self, row: Row) -> bytes:
        command = row.command
        # A command longer than the budget cannot fit (each character costs a byte at
        # least): the whole row, which may hold megabytes, is then never formatted.
        if not command or len(command) <= self.budget:
            message = _encoded(self._format_row(row))
            if len(message) <= self.budget or not command:
                return message
        kept, whole = _whole_command(row)

        def fitted(keep: int) -> bytes:
            return _encoded(self._format_row(_shortened(row, kept, keep, whole)))

        best = fitted(0)
        if len(best) > self.budget:
            return best
        # The most that fits, by halving: each character kept costs a byte at least (more
        # when the format repeats the command, as argv), and the marker's count loses at
        # most its digits, so no more than ``high`` fit; with one copy of an ASCII
        # command, the bytes left over fit as many characters, which is tried first.
        room = self.budget - len(best)
        low, high = 0, min(len(kept), room + len(str(whole)))  # fitted(low) fits
        probes = [room] if room > 0 else []
        while low < high:
            probe = min(max(probes.pop() if probes else (low + high + 1) // 2, low + 1), high)
            candidate = fitted(probe)
            if len(candidate) <= self.budget:
                low, best = probe, candidate
                if probe == room:
                    probes.append(probe + 1)  # one more, to know it is the most
            else:
                high = probe - 1
        return best


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


class SyslogSink:
    """Rows to the local syslog socket (``/dev/log``, or another path), one Unix
    datagram each: ``<PRI>Mmm dd hh:mm:ss histstat[PID]: MESSAGE``, as syslog(3) sends
    them and journald, rsyslog and syslog-ng read them.

    The socket is non-blocking, so the poll never waits for a receiver: a full socket
    drops the row for syslog alone (the log, the database and stdout still get it), and
    so does a socket that went away, while a new one is tried at once and then every few
    seconds (``RECONNECT_FIRST`` doubling up to ``RECONNECT_MAX``). Dropped rows are
    counted and told on stderr at once, then at most once a minute.

    Only datagram sockets are used: glibc's syslog(3) falls back to a stream socket,
    where a non-blocking write can stop in the middle of a record; the receivers named
    above listen on datagrams, and a stream socket is refused at start.
    """

    def __init__(
        self,
        path: str,
        facility: str,
        size: int,
        warn: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.size = size
        self._warn = warn
        self._clock = clock
        self._wall_clock = wall_clock
        self._pid = os.getpid()
        self._prefix = f"<{priority(facility)}>".encode("ascii")
        self._tag = f" {TAG}[{self._pid}]: ".encode("ascii")
        self.message_budget = size - header_length(facility, self._pid)
        self._socket: socket.socket | None = None
        self._next_connect = -math.inf
        self._reconnect_delay = RECONNECT_FIRST
        self._told_at = -math.inf
        self._untold: dict[str, int] = {}  # reason → rows dropped since the last notice
        self.dropped = 0  # rows dropped for syslog in all

    @property
    def _what(self) -> str:
        return f"syslog socket {self.path!r}"

    def _connected_socket(self) -> socket.socket:
        """A new non-blocking datagram socket connected to the path; ``OSError`` if none."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            sock.connect(self.path)
        except BaseException:
            sock.close()
            raise
        return sock

    def _refusal(self, exc: OSError) -> SinkError:
        if exc.errno == errno.EPROTOTYPE:
            return SinkError(
                f"cannot send to {self._what}: it is a stream socket; histstat sends "
                "datagrams, as journald, rsyslog (imuxsock) and syslog-ng (unix-dgram) take"
            )
        reason = exc.strerror or str(exc)
        if exc.errno == errno.ECONNREFUSED and not _is_socket(self.path):
            reason = "not a socket"  # connect(2) says only "refused" to a file or directory
        elif exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
            reason += " (is a syslog daemon running?)"
        return SinkError(f"cannot send to {self._what}: {reason}")

    def check(self) -> None:
        try:
            self._connected_socket().close()  # a connect creates nothing
        except OSError as exc:
            raise self._refusal(exc) from exc

    def open(self, header: str | None) -> None:
        # A header (CSV, plain text) names columns for a file's reader; each record here
        # stands alone, so none is sent.
        try:
            self._socket = self._connected_socket()
        except OSError as exc:
            raise self._refusal(exc) from exc

    def record(self, message: bytes) -> bytes:
        """The datagram that carries ``message``."""
        stamp = syslog_timestamp(self._wall_clock()).encode("ascii")
        return self._prefix + stamp + self._tag + message

    def write(self, message: bytes) -> None:
        if len(message) > self.message_budget:
            self._drop(TOO_LARGE)
            return
        data = self.record(message)
        for attempt in range(2):  # a socket gone is replaced at once, and tried again
            sock = self._socket or self._reconnect()
            if sock is None:
                self._drop(GONE)
                return
            try:
                sock.send(data)
                return
            except BlockingIOError:
                self._drop(FULL)
                return
            except OSError as exc:
                self._close_socket()
                if exc.errno == errno.EMSGSIZE:  # a send buffer smaller than --syslog-size
                    self._drop(TOO_LARGE)
                    return
                if exc.errno not in _GONE_ERRORS or attempt:
                    gone = exc.errno in _GONE_ERRORS
                    self._drop(GONE if gone else f"with an error ({exc.strerror or exc})")
                    return
                self._next_connect = -math.inf

    def _reconnect(self) -> socket.socket | None:
        now = self._clock()
        if now < self._next_connect:
            return None
        try:
            self._socket = self._connected_socket()
        except OSError:
            self._next_connect = now + self._reconnect_delay
            self._reconnect_delay = min(self._reconnect_delay * 2, RECONNECT_MAX)
            return None
        self._reconnect_delay = RECONNECT_FIRST
        return self._socket

    def _drop(self, reason: str) -> None:
        self.dropped += 1
        self._untold[reason] = self._untold.get(reason, 0) + 1
        self._tell_if_due()

    def _tell_if_due(self) -> None:
        now = self._clock()
        if self._untold and now - self._told_at >= DROP_NOTICE_EVERY:
            self._told_at = now
            self._tell()

    def _tell(self) -> None:
        count = sum(self._untold.values())
        since = "" if self.dropped == count else " since the last notice"
        reasons = "; ".join(f"{number:,} {reason}" for reason, number in self._untold.items())
        rows = "1 row" if count == 1 else f"{count:,} rows"
        self._warn(f"{self._what}: {rows} dropped for syslog only{since}: {reasons}")
        self._untold.clear()

    def flush(self) -> None:
        self._tell_if_due()  # drops told as the minute allows, even when no row follows

    def reopen(self) -> None:
        # SIGHUP: a socket that went away is tried again with the next row, at once.
        self._next_connect = -math.inf
        self._reconnect_delay = RECONNECT_FIRST

    def _close_socket(self) -> None:
        if self._socket is not None:
            sock, self._socket = self._socket, None
            sock.close()

    def close(self) -> None:
        self._close_socket()
        if self._untold:
            self._tell()

"""Parsing of the kernel's text lines for the sock:inet_sock_set_state tracepoint into
connect events.

A line of an instance's ``trace_pipe`` (kernel/trace/trace_output.c,
trace_print_context, then the event's TP_printk in include/trace/events/sock.h) reads,
with ``record-tgid`` on and ``irq-info`` on or off::

    <name, %16s>-<tid> (<tgid, %7d or -------) [<cpu>] [flags ]<secs>.<usecs>: \
inet_sock_set_state: family=AF_INET protocol=IPPROTO_TCP sport=.. dport=.. saddr=.. \
daddr=.. saddrv6=.. daddrv6=.. oldstate=TCP_.. newstate=TCP_..

Everything right of the name is formatted by the kernel. The name is a process's comm,
printed raw: the process chose it, so it may hold spaces, brackets, colons, escapes,
bytes that are not UTF-8 and newlines (which split the line in pieces). The parser
therefore takes every field from the right-hand part, anchored on the event's marker
and the end of the line, and never reads structure from the name.
"""

from __future__ import annotations

import re
import socket
from typing import NamedTuple

# The kernel's TCP state names (include/net/tcp_states.h) without their "TCP_" prefix:
# they are psutil's status names too, for the states histstat reports.
TCP_STATE_NAMES = frozenset(
    {
        "ESTABLISHED",
        "SYN_SENT",
        "SYN_RECV",
        "FIN_WAIT1",
        "FIN_WAIT2",
        "TIME_WAIT",
        "CLOSE",
        "CLOSE_WAIT",
        "LAST_ACK",
        "LISTEN",
        "CLOSING",
        "NEW_SYN_RECV",
    }
)

# The kernel prints the name right-aligned in 16 columns (TASK_COMM_LEN - 1 = 15 bytes
# at most, plus padding): a piece of a name split by its newlines is never longer.
NAME_FIELD_WIDTH = 16
# Name fields whose decoding is kept (a few processes make most connects); past this
# many, the kept ones are forgotten at once.
MAX_NAMES = 256

EVENT_MARKER = b": inet_sock_set_state: "

_FAMILIES = {b"AF_INET": socket.AF_INET, b"AF_INET6": socket.AF_INET6}

# Left of the marker: the name (any bytes), then the kernel's context. Greedy ``.*``
# makes the name as long as possible, so the context is matched at the line's end.
_CONTEXT = re.compile(
    rb"(?P<name>.*)-(?P<tid>\d+) +(?:\( *(?P<tgid>\d+|-+)\) +)?\[\d+\] +(?:[^ ]+ +)?"
    rb"(?P<secs>\d+)\.(?P<usecs>\d{6})",
    re.DOTALL,
)
# Right of the marker: the event's fields, all of them, in the kernel's order.
_FIELDS = re.compile(
    rb"family=(?P<family>AF_INET6?) protocol=IPPROTO_TCP "
    rb"sport=(?P<sport>\d+) dport=(?P<dport>\d+) "
    rb"saddr=(?P<saddr>[0-9.]+) daddr=(?P<daddr>[0-9.]+) "
    rb"saddrv6=(?P<saddr6>[0-9a-f:.]+) daddrv6=(?P<daddr6>[0-9a-f:.]+) "
    rb"oldstate=TCP_(?P<old>[A-Z0-9_]+) newstate=TCP_(?P<new>[A-Z0-9_]+)"
)
_STATE_NAMES = {name.encode(): name for name in TCP_STATE_NAMES}


class ConnectEvent(NamedTuple):
    """One TCP state change of a socket, as the sock:inet_sock_set_state tracepoint
    reported it.

    ``tid`` is the thread that was running when the state changed: for CLOSE→SYN_SENT
    the thread calling connect(); for changes made on a packet's arrival (SYN_SENT→
    ESTABLISHED or →CLOSE, SYN_RECV→ESTABLISHED) whichever task the softirq interrupted.
    ``tgid`` and ``name`` are what the kernel's caches held for that thread id when the
    line was read (recorded at a context switch after the event), so they are hints:
    ``tgid`` is None when the cache had none, and may belong to an earlier thread with
    the same id (the cache is never cleared), so /proc/<tid>/status is the better word
    while the thread lives; ``name`` may be a later name of the process, or ``<...>``.
    """

    time: float  # wall clock (time.time()), microsecond resolution
    tid: int
    tgid: int | None
    name: str  # untrusted: undecodable bytes are surrogate escapes
    family: int  # socket.AF_INET or socket.AF_INET6
    sport: int  # 0 at CLOSE→SYN_SENT for a socket not bound before connect()
    dport: int
    saddr: str
    daddr: str
    oldstate: str  # TCP state names without "TCP_", as psutil spells them
    newstate: str


class ParsedLine(NamedTuple):
    """A line parsed, before its name and time are settled by the caller."""

    monotonic: float  # the trace clock "mono": CLOCK_MONOTONIC, in seconds
    tid: int
    tgid: int | None
    name: bytes  # the raw name field, padding included
    family: int
    sport: int
    dport: int
    saddr: str
    daddr: str
    oldstate: str
    newstate: str


def parse_line(line: bytes) -> ParsedLine | None:
    """The event on one complete trace_pipe line (without its newline), or None when the
    line is not a whole inet_sock_set_state line for TCP (a piece of a name split by a
    newline, a "[LOST n EVENTS]" notice, another event)."""
    head, marker, tail = line.rpartition(EVENT_MARKER)
    if not marker:
        return None
    fields = _FIELDS.fullmatch(tail)
    context = _CONTEXT.fullmatch(head)
    if fields is None or context is None:
        return None
    oldstate = fields["old"].decode()
    newstate = fields["new"].decode()
    if oldstate not in TCP_STATE_NAMES or newstate not in TCP_STATE_NAMES:
        return None
    family = _FAMILIES[fields["family"]]
    # The v4 fields of an IPv6 socket hold whatever inet_saddr was (127.0.0.6 was seen
    # for ::1), and the v6 fields of an IPv4 socket the mapped address: each family
    # reads its own pair.
    if family == socket.AF_INET:
        saddr, daddr = fields["saddr"], fields["daddr"]
    else:
        saddr, daddr = fields["saddr6"], fields["daddr6"]
    tgid_text = context["tgid"]
    tgid = int(tgid_text) if tgid_text is not None and tgid_text.isdigit() else None
    return ParsedLine(
        monotonic=int(context["secs"]) + int(context["usecs"]) / 1e6,
        tid=int(context["tid"]),
        tgid=tgid or None,
        name=context["name"],
        family=family,
        sport=int(fields["sport"]),
        dport=int(fields["dport"]),
        saddr=saddr.decode(),
        daddr=daddr.decode(),
        oldstate=oldstate,
        newstate=newstate,
    )


class ConnectLineParser:
    """Turns trace_pipe lines into ConnectEvents, one complete line at a time, and puts
    back together the names that newlines split across lines.

    A piece of a split name is a short line that is no event; it only ever becomes part
    of the name of the event line that follows it, never an event of its own.
    """

    def __init__(self) -> None:
        self._pieces: list[bytes] = []
        self._names: dict[bytes, str] = {}  # name fields decoded lately
        self.unparsed = 0  # complete lines that were neither an event nor a name's piece

    def parse(self, line: bytes, wall_offset: float) -> ConnectEvent | None:
        """The event on ``line`` (one line without its newline), or None. ``wall_offset``
        is time.time() - time.monotonic(), taken near the read."""
        parsed = parse_line(line)
        if parsed is None:
            if self._fits(line):
                self._pieces.append(line)
            else:
                self._pieces.clear()
                self.unparsed += 1
            return None
        name = parsed.name
        if self._pieces:
            if self._fits(name):
                name = b"\n".join([*self._pieces, name])
            self._pieces.clear()
        return ConnectEvent(
            time=parsed.monotonic + wall_offset,
            tid=parsed.tid,
            tgid=parsed.tgid,
            name=name.lstrip(b" ").decode("utf-8", "surrogateescape"),
            family=parsed.family,
            sport=parsed.sport,
            dport=parsed.dport,
            saddr=parsed.saddr,
            daddr=parsed.daddr,
            oldstate=parsed.oldstate,
            newstate=parsed.newstate,
        )

    def parse_lines(self, lines: list[bytes], wall_offset: float) -> list[ConnectEvent]:
        """The events on ``lines`` (complete lines without their newlines), in order:
        what ``parse`` gives for each, with the work done once per line rather than once
        per step (this runs on each of a reader's wake-ups, on cold caches)."""
        events: list[ConnectEvent] = []
        states = _STATE_NAMES
        names = self._names
        for line in lines:
            # As parse_line: split at the last marker (one regex over the whole line
            # would backtrack its greedy name over the fields: twice the time).
            head, marker, tail = line.rpartition(EVENT_MARKER)
            fields = _FIELDS.fullmatch(tail) if marker and not self._pieces else None
            context = _CONTEXT.fullmatch(head) if fields is not None else None
            if fields is None or context is None:  # no event, a name's piece or its line:
                event = self.parse(line, wall_offset)  # the careful way
                if event is not None:
                    events.append(event)
                continue
            name, tid, tgid_text, secs, usecs = context.groups()
            family_text, sport, dport, saddr, daddr, saddr6, daddr6, old, new = fields.groups()
            oldstate = states.get(old)
            newstate = states.get(new)
            if oldstate is None or newstate is None:
                self.parse(line, wall_offset)  # no event: counted as parse counts it
                continue
            decoded = names.get(name)
            if decoded is None:
                if len(names) >= MAX_NAMES:
                    names.clear()
                decoded = names[name] = name.lstrip(b" ").decode("utf-8", "surrogateescape")
            if family_text == b"AF_INET":
                family = socket.AF_INET
            else:
                family = socket.AF_INET6
                saddr, daddr = saddr6, daddr6
            tgid = int(tgid_text) if tgid_text is not None and tgid_text.isdigit() else None
            events.append(
                ConnectEvent(
                    (int(secs) + int(usecs) / 1e6) + wall_offset,
                    int(tid),
                    tgid or None,
                    decoded,
                    family,
                    int(sport),
                    int(dport),
                    saddr.decode(),
                    daddr.decode(),
                    oldstate,
                    newstate,
                )
            )
        return events

    def _fits(self, piece: bytes) -> bool:
        """Whether ``piece`` can continue the pieces held: together, with the newlines
        between them, they must fit in the name's field."""
        held = sum(len(each) + 1 for each in self._pieces)
        return held + len(piece) <= NAME_FIELD_WIDTH


class LineSplitter:
    """Cuts a stream of bytes into complete lines (without their newline), holding at
    most ``max_line`` bytes of a line still coming: a longer line is dropped whole and
    counted in ``dropped``, so no input makes the held bytes grow without bound."""

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self.dropped = 0
        self._partial = b""
        self._skipping = False  # inside an overlong line, already counted

    def feed(self, data: bytes) -> list[bytes]:
        """The lines that ``data`` completes, in order."""
        segments = data.split(b"\n")
        if not self._partial and not self._skipping and not segments[-1]:
            # Whole lines only, as trace_pipe gives them (it formats whole lines):
            # nothing held before, nothing to hold after.
            segments.pop()
            if max(map(len, segments), default=0) <= self.max_line:
                return segments
            segments.append(b"")
        rest = segments.pop()  # after the last newline: the start of a line still coming
        lines = []
        for segment in segments:
            if self._skipping:
                self._skipping = False  # the end of the overlong line
                continue
            line = self._partial + segment
            self._partial = b""
            if len(line) > self.max_line:
                self.dropped += 1
            else:
                lines.append(line)
        if not self._skipping:
            self._partial += rest
            if len(self._partial) > self.max_line:
                self._partial = b""
                self._skipping = True
                self.dropped += 1
        return lines

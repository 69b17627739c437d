"""The parser of sock:inet_sock_set_state trace lines, on lines captured from this
kernel's trace_pipe (Linux 6.18, record-tgid on, irq-info off unless said), hostile
process names included."""

from __future__ import annotations

import socket

import pytest

from histstat.sources.trace_lines import (
    NAME_FIELD_WIDTH,
    ConnectEvent,
    ConnectLineParser,
    LineSplitter,
    parse_line,
)

TAIL_V4 = b"saddr=127.0.0.1 daddr=127.0.0.1 saddrv6=::ffff:127.0.0.1 daddrv6=::ffff:127.0.0.1 "

# Captured: a client connecting to a listener on 127.0.0.1, then to a closed port.
IPV4_CONNECT = (
    b"         python3-12946   (  12946) [001]   9141.677848: inet_sock_set_state: "
    b"family=AF_INET protocol=IPPROTO_TCP sport=0 dport=56753 "
    + TAIL_V4
    + b"oldstate=TCP_CLOSE newstate=TCP_SYN_SENT"
)
IPV4_ACCEPTED_IRQ_INFO = (  # irq-info on: the flags column; a softirq ("s") context
    b"         python3-13013   (  13013) [001] ..s2.  9142.466917: inet_sock_set_state: "
    b"family=AF_INET protocol=IPPROTO_TCP sport=54127 dport=41668 "
    + TAIL_V4
    + b"oldstate=TCP_SYN_RECV newstate=TCP_ESTABLISHED"
)
IPV4_REFUSED = (
    b"         python3-12946   (  12946) [001]   9141.678080: inet_sock_set_state: "
    b"family=AF_INET protocol=IPPROTO_TCP sport=39576 dport=1 "
    + TAIL_V4
    + b"oldstate=TCP_SYN_SENT newstate=TCP_CLOSE"
)
# Captured on ::1: the v4 fields of an IPv6 socket hold junk (127.0.0.6 here).
IPV6_CONNECT = (
    b"         python3-12947   (  12947) [001]   9141.728765: inet_sock_set_state: "
    b"family=AF_INET6 protocol=IPPROTO_TCP sport=0 dport=42637 saddr=0.0.0.0 "
    b"daddr=0.0.0.0 saddrv6=::1 daddrv6=::1 oldstate=TCP_CLOSE newstate=TCP_SYN_SENT"
)
IPV6_ACCEPTED = (
    b"         python3-12947   (  12947) [001]   9141.728832: inet_sock_set_state: "
    b"family=AF_INET6 protocol=IPPROTO_TCP sport=42637 dport=46166 saddr=127.0.0.6 "
    b"daddr=127.0.0.6 saddrv6=::1 daddrv6=::1 oldstate=TCP_SYN_RECV "
    b"newstate=TCP_ESTABLISHED"
)
# Captured: a thread whose tgid and name the kernel had not cached yet when read.
UNKNOWN_TGID = (
    b"           <...>-13204   (-------) [001]   9147.128118: inet_sock_set_state: "
    b"family=AF_INET protocol=IPPROTO_TCP sport=0 dport=42045 "
    + TAIL_V4
    + b"oldstate=TCP_CLOSE newstate=TCP_SYN_SENT"
)
# Captured, process name b"a\nb (1) [0]: \x1b\xff" (15 bytes): the newline splits the line.
NEWLINE_NAME_LINES = [
    b" a",
    b"b (1) [0]: \x1b\xff-12963   (  12963) [001]   9141.783427: inet_sock_set_state: "
    b"family=AF_INET protocol=IPPROTO_TCP sport=0 dport=43051 "
    + TAIL_V4
    + b"oldstate=TCP_CLOSE newstate=TCP_SYN_SENT",
]
# Captured, name b"x-1 (2) [003] 9": a fake context of its own.
FAKE_CONTEXT_NAME = (
    b" x-1 (2) [003] 9-12993   (  12993) [001]   9141.899496: inet_sock_set_state: "
    b"family=AF_INET protocol=IPPROTO_TCP sport=0 dport=32923 "
    + TAIL_V4
    + b"oldstate=TCP_CLOSE newstate=TCP_SYN_SENT"
)
# Captured, name b"\xff\xfe:[]()": not UTF-8, brackets, a colon.
INVALID_UTF8_NAME = (
    b"         \xff\xfe:[]()-13000   (  13000) [001]   9142.023375: inet_sock_set_state: "
    b"family=AF_INET protocol=IPPROTO_TCP sport=0 dport=50495 "
    + TAIL_V4
    + b"oldstate=TCP_CLOSE newstate=TCP_SYN_SENT"
)
# Captured, name b"\n\n": three lines, two of them pieces of the name.
NEWLINES_ONLY_NAME_LINES = [
    b"              ",
    b"",
    b"-13010   (  13010) [001]   9142.080860: inet_sock_set_state: "
    b"family=AF_INET protocol=IPPROTO_TCP sport=0 dport=54543 "
    + TAIL_V4
    + b"oldstate=TCP_CLOSE newstate=TCP_SYN_SENT",
]

OFFSET = 1_000_000_000.0  # wall clock minus monotonic clock, for these tests


def parse_all(lines: list[bytes]) -> tuple[list[ConnectEvent], ConnectLineParser]:
    parser = ConnectLineParser()
    events = [parser.parse(line, OFFSET) for line in lines]
    return [event for event in events if event is not None], parser


def only_event(lines: list[bytes]) -> ConnectEvent:
    events, _ = parse_all(lines)
    assert len(events) == 1, events
    return events[0]


def test_ipv4_connect_line_gives_every_field():
    assert only_event([IPV4_CONNECT]) == ConnectEvent(
        time=OFFSET + 9141.677848,
        tid=12946,
        tgid=12946,
        name="python3",
        family=socket.AF_INET,
        sport=0,
        dport=56753,
        saddr="127.0.0.1",
        daddr="127.0.0.1",
        oldstate="CLOSE",
        newstate="SYN_SENT",
    )


def test_refused_connect_carries_the_source_port():
    event = only_event([IPV4_REFUSED])
    assert (event.sport, event.dport) == (39576, 1)
    assert (event.oldstate, event.newstate) == ("SYN_SENT", "CLOSE")


def test_irq_info_flags_column_is_accepted():
    event = only_event([IPV4_ACCEPTED_IRQ_INFO])
    assert (event.tid, event.tgid, event.name) == (13013, 13013, "python3")
    assert (event.sport, event.dport) == (54127, 41668)
    assert (event.oldstate, event.newstate) == ("SYN_RECV", "ESTABLISHED")
    assert event.time == pytest.approx(OFFSET + 9142.466917)


def test_ipv6_lines_take_the_v6_addresses():
    connect = only_event([IPV6_CONNECT])
    assert connect.family == socket.AF_INET6
    assert (connect.saddr, connect.daddr, connect.dport) == ("::1", "::1", 42637)
    accepted = only_event([IPV6_ACCEPTED])  # its v4 fields say 127.0.0.6
    assert (accepted.saddr, accepted.daddr) == ("::1", "::1")


def test_unknown_tgid_is_none():
    event = only_event([UNKNOWN_TGID])
    assert (event.tid, event.tgid, event.name) == (13204, None, "<...>")


def test_name_split_by_a_newline_is_one_event_with_the_whole_name():
    event = only_event(NEWLINE_NAME_LINES)
    assert event.name == "a\nb (1) [0]: \x1b\udcff"
    assert (event.tid, event.tgid, event.dport) == (12963, 12963, 43051)


def test_name_of_newlines_only_is_one_event():
    events, parser = parse_all(NEWLINES_ONLY_NAME_LINES)
    assert [(event.name, event.tid) for event in events] == [("\n\n", 13010)]
    assert parser.unparsed == 0


def test_piece_of_a_name_alone_is_no_event():
    piece = NEWLINE_NAME_LINES[0]
    assert parse_line(piece) is None
    events, _ = parse_all([piece, IPV4_REFUSED.replace(b"TCP_CLOSE", b"TCP_BOGUS"), piece])
    assert events == []


def test_pieces_never_join_a_name_they_cannot_belong_to():
    # Pieces longer together than the name's field are no name: the event keeps its own.
    events, _ = parse_all([b"x" * 10, b"y" * 10, IPV4_CONNECT])
    assert [event.name for event in events] == ["python3"]
    # A line that is no piece (too long) ends the pieces held before it.
    events, parser = parse_all([b" a", b"z" * (NAME_FIELD_WIDTH + 1), *NEWLINE_NAME_LINES[1:]])
    assert [event.name for event in events] == ["b (1) [0]: \x1b\udcff"]
    assert parser.unparsed == 1


def test_name_with_a_fake_context_keeps_the_kernels_fields():
    event = only_event([FAKE_CONTEXT_NAME])
    assert event.name == "x-1 (2) [003] 9"
    assert (event.tid, event.tgid, event.time) == (12993, 12993, OFFSET + 9141.899496)


def test_name_not_utf8_is_surrogate_escaped():
    event = only_event([INVALID_UTF8_NAME])
    assert event.name == "\udcff\udcfe:[]()"
    assert event.name.encode("utf-8", "surrogateescape") == b"\xff\xfe:[]()"
    assert event.tid == 13000


@pytest.mark.parametrize(
    "line",
    [
        IPV4_CONNECT[:-1],  # cut short
        IPV4_CONNECT.replace(b"IPPROTO_TCP", b"IPPROTO_SCTP"),
        IPV4_CONNECT.replace(b"TCP_SYN_SENT", b"TCP_NOT_A_STATE"),
        IPV4_CONNECT.replace(b"inet_sock_set_state", b"inet_sock_set_other"),
        IPV4_CONNECT.replace(b"(  12946)", b"(  12946) junk"),
        IPV4_CONNECT + b" extra=1",
        b"CPU:1 [LOST 12 EVENTS]",
    ],
)
def test_anything_but_a_whole_event_line_is_no_event(line):
    assert parse_line(line) is None


def test_name_cannot_forge_an_event_before_its_newline():
    # The piece before a name's newline is at most 15 bytes: shorter than the marker
    # alone, so it can never hold an event; the fields come from the kernel's part.
    forged_piece = b"0: inet_sock_se"
    real_rest = NEWLINE_NAME_LINES[1]
    events, _ = parse_all([forged_piece, real_rest])
    assert [(event.tid, event.dport) for event in events] == [(12963, 43051)]


def test_line_splitter_holds_partial_lines_across_reads():
    splitter = LineSplitter(max_line=64)
    assert splitter.feed(b"first li") == []
    assert splitter.feed(b"ne\nsecond\nthi") == [b"first line", b"second"]
    assert splitter.feed(b"rd\n") == [b"third"]
    assert splitter.dropped == 0


def test_line_splitter_drops_and_counts_overlong_lines_without_holding_them():
    splitter = LineSplitter(max_line=8)
    assert splitter.feed(b"ok\n" + b"x" * 5) == [b"ok"]
    for _ in range(1000):  # a line that never ends holds nothing and counts once
        assert splitter.feed(b"y" * 100) == []
    assert splitter.dropped == 1
    assert splitter.feed(b"tail\nnext\n" + b"z" * 20 + b"\nlast\n") == [b"next", b"last"]
    assert splitter.dropped == 2


# Every captured line, a line that is no event and name pieces, in an order where pieces
# come before events, after them and alone: parse_lines must say what parse says.
MIXED_LINES = [
    IPV4_CONNECT,
    *NEWLINE_NAME_LINES,
    IPV4_REFUSED,
    b"CPU:1 [LOST 12 EVENTS]",
    IPV6_CONNECT,
    *NEWLINES_ONLY_NAME_LINES,
    FAKE_CONTEXT_NAME,
    NEWLINE_NAME_LINES[0],  # a piece, then a line that is no event: it ends the piece
    IPV4_CONNECT.replace(b"TCP_SYN_SENT", b"TCP_NOT_A_STATE"),
    INVALID_UTF8_NAME,
    IPV4_ACCEPTED_IRQ_INFO,
    b"x" * 10,
    b"y" * 10,
    IPV6_ACCEPTED,  # pieces too long together for a name: the event keeps its own
    UNKNOWN_TGID,
    NEWLINE_NAME_LINES[0],  # a piece left held at the end
]


@pytest.mark.parametrize("cut", [0, 1, 5, 9, len(MIXED_LINES)])
def test_parse_lines_gives_what_parse_gives_one_line_at_a_time(cut):
    one_by_one = ConnectLineParser()
    expected = [one_by_one.parse(line, OFFSET) for line in MIXED_LINES]
    batched = ConnectLineParser()
    # In two batches, cut anywhere: what a batch leaves held carries into the next.
    got = batched.parse_lines(MIXED_LINES[:cut], OFFSET)
    got += batched.parse_lines(MIXED_LINES[cut:], OFFSET)
    assert got == [event for event in expected if event is not None]
    assert batched.unparsed == one_by_one.unparsed == 3  # LOST, NOT_A_STATE, y * 10
    names = [event.name for event in got]
    assert "a\nb (1) [0]: \x1b\udcff" in names and "\n\n" in names
    assert "x-1 (2) [003] 9" in names and "\udcff\udcfe:[]()" in names


def test_parse_lines_decodes_names_anew_once_it_forgot_them(monkeypatch):
    monkeypatch.setattr("histstat.sources.trace_lines.MAX_NAMES", 1)
    parser = ConnectLineParser()
    lines = [IPV4_CONNECT, INVALID_UTF8_NAME, IPV4_CONNECT]
    names = [event.name for event in parser.parse_lines(lines, OFFSET)]
    assert names == ["python3", "\udcff\udcfe:[]()", "python3"]


def test_line_splitter_takes_whole_lines_at_once_and_still_drops_overlong_ones():
    splitter = LineSplitter(max_line=8)
    assert splitter.feed(b"ok\n" + b"x" * 20 + b"\nend\n") == [b"ok", b"end"]
    assert splitter.dropped == 1
    assert splitter.feed(b"one\ntwo\n") == [b"one", b"two"]
    assert splitter.feed(b"three\nfo") == [b"three"]  # a line still coming is held
    assert splitter.feed(b"ur\n") == [b"four"]
    assert splitter.feed(b"") == [] and splitter.dropped == 1

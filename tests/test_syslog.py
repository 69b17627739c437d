"""The syslog sink: framing, facilities, fitting a row under the size, a full socket,
a receiver that goes away, and records no process can forge."""

from __future__ import annotations

import json
import os
import re
import socket
import syslog
import threading
import time

import pytest

from histstat.cli import parse_config
from histstat.enrich import COMMAND_MARKER
from histstat.output.base import SinkError
from histstat.output.ecs import format_ecs_row
from histstat.output.format import format_json_row, format_plain_row, json_fields, text_fields
from histstat.output.syslog import (
    DROP_NOTICE_EVERY,
    FACILITIES,
    RECONNECT_FIRST,
    RECONNECT_MAX,
    SEVERITY_INFO,
    MessageFitter,
    SyslogSink,
    header_length,
    priority,
    safe_message,
    syslog_timestamp,
)
from support.rows import sample_row

JSON_FIELDS = json_fields(False)
MARKER = re.compile(re.escape(COMMAND_MARKER).replace(r"\{removed\}", r"([0-9]+)") + r"\Z")


def json_view(row):
    return format_json_row(row, JSON_FIELDS)


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Receiver:
    """A syslog receiver's socket: a Unix datagram socket bound to a path."""

    def __init__(self, path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)

    def records(self) -> list[bytes]:
        """Every datagram waiting, without waiting for more."""
        found = []
        while True:
            try:
                found.append(self.sock.recv(1 << 20))
            except BlockingIOError:
                return found

    def close(self) -> None:
        self.sock.close()
        os.unlink(self.path)


@pytest.fixture
def receiver(tmp_path):
    made = Receiver(tmp_path / "log.sock")
    yield made
    made.sock.close()


WALL = time.mktime((2026, 11, 26, 13, 14, 15, 0, 0, -1))


def open_sink(path, facility="user", size=8192, clock=None, wall_clock=lambda: WALL):
    notices: list[str] = []
    sink = SyslogSink(
        str(path), facility, size, notices.append, clock=clock or Clock(), wall_clock=wall_clock
    )
    sink.check()
    sink.open(None)
    return sink, notices


def message_of(record: bytes) -> bytes:
    return record.split(b"]: ", 1)[1]


def test_a_record_is_framed_as_syslog3_frames_it(receiver):
    wall = time.mktime((2026, 3, 7, 9, 5, 1, 0, 0, -1))  # local time, one-digit day
    sink, _ = open_sink(receiver.path, "local3", wall_clock=lambda: wall)
    sink.write(b'{"a": 1}')
    (record,) = receiver.records()
    assert record == f'<158>Mar  7 09:05:01 histstat[{os.getpid()}]: {{"a": 1}}'.encode()
    assert syslog_timestamp(wall) == "Mar  7 09:05:01"
    assert header_length("local3", os.getpid()) == len(record) - len(b'{"a": 1}')
    sink.close()


def test_every_facility_has_its_syslog_h_number():
    missing = set()
    for name, number in FACILITIES.items():
        assert priority(name) == number * 8 + syslog.LOG_INFO
        if hasattr(syslog, f"LOG_{name.upper()}"):
            assert number << 3 == getattr(syslog, f"LOG_{name.upper()}"), name
        else:
            missing.add(name)
    assert missing <= {"ftp"} and FACILITIES["ftp"] == 11  # LOG_FTP (11<<3) in <syslog.h>
    assert SEVERITY_INFO == syslog.LOG_INFO
    assert (priority("kern"), priority("user"), priority("local7")) == (6, 14, 190)


def test_the_facility_and_size_options(tmp_path):
    config = parse_config(["--syslog"])
    assert (config.syslog, config.syslog_facility, config.syslog_size) == ("/dev/log", "user", 8096)
    config = parse_config(["--syslog", "/run/x.sock", "--syslog-facility", "local7", "-j"])
    assert (config.syslog, config.syslog_facility, config.output) == (
        "/run/x.sock",
        "local7",
        "json",
    )
    assert parse_config(["--syslog", "-q", "--syslog-size", "1024"]).syslog_size == 1024


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--syslog", "--syslog-facility", "local8"], "invalid choice: 'local8'"),
        (["--syslog-facility", "daemon"], "--syslog-facility is for --syslog"),
        (["--syslog", "--syslog-size", "1023"], "from 1024 to 65536, not '1023'"),
        (["--syslog", "--syslog-size", "8k"], "from 1024 to 65536, not '8k'"),
        (["--syslog", ""], "--syslog: needs a socket path"),
    ],
)
def test_bad_syslog_options_are_one_line_usage_errors(argv, says, capsys):
    with pytest.raises(SystemExit) as ended:
        parse_config(argv)
    assert ended.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("histstat: error: ") and err.count("\n") == 1
    assert says in err


def test_a_missing_socket_is_refused_in_one_line(tmp_path):
    sink = SyslogSink(str(tmp_path / "none.sock"), "user", 8192, print)
    with pytest.raises(SinkError) as refused:
        sink.check()
    assert str(refused.value) == (
        f"cannot send to syslog socket '{tmp_path / 'none.sock'}': No such file or directory "
        "(is a syslog daemon running?)"
    )


@pytest.mark.parametrize("kind", ["directory", "file"])
def test_a_path_that_is_no_socket_is_refused_as_such(tmp_path, kind):
    path = tmp_path / kind
    path.mkdir() if kind == "directory" else path.write_bytes(b"")
    with pytest.raises(SinkError) as refused:
        SyslogSink(str(path), "user", 8192, print).check()
    assert str(refused.value) == f"cannot send to syslog socket '{path}': not a socket"


def test_a_stream_socket_is_refused_with_the_reason(tmp_path):
    path = str(tmp_path / "stream.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    try:
        with pytest.raises(SinkError, match="it is a stream socket; histstat sends datagrams"):
            SyslogSink(path, "user", 8192, print).check()
    finally:
        listener.close()


def fit(row, size=2048, view=json_view):
    return MessageFitter(view, size).__call__(row), size


def assert_cut(command: str, whole: str, kept_at_least: int = 0) -> int:
    """The command is a start of ``whole`` followed by the marker of what it left out."""
    found = MARKER.search(command)
    assert found, command[-80:]
    kept = command[: found.start()]
    assert whole.startswith(kept) and len(kept) >= kept_at_least
    assert int(found.group(1)) == len(whole) - len(kept)
    return len(kept)


def test_a_long_command_is_shortened_to_fit_and_the_json_stays_whole():
    whole = "python3 -c " + "x" * 100_000
    message, size = fit(sample_row(command=whole))
    assert size - 8 <= len(message) <= size  # as much of the command as fits
    document = json.loads(message)
    assert_cut(document["command"], whole, kept_at_least=1000)
    assert document["command_length"] == len(whole)


def test_a_row_that_fits_is_left_as_it_is():
    row = sample_row()
    assert fit(row)[0] == json_view(row).encode()


@pytest.mark.parametrize("unit", ["é", "€", "😀", "\x01", "\u202e", "\udcff"])
def test_the_size_counts_bytes_not_characters(unit):
    whole = "run " + unit * 30_000
    message, size = fit(sample_row(command=whole), size=4096)
    assert len(message) <= size
    assert json.loads(message)["command"].endswith(" chars]")


def test_a_command_cut_by_the_command_limit_says_how_much_of_the_whole_was_left_out():
    whole = "a" * 70_000
    limited = whole[:65536] + COMMAND_MARKER.format(removed=70_000 - 65536)
    message, _ = fit(sample_row(command=limited, command_length=70_000))
    assert_cut(json.loads(message)["command"], whole, kept_at_least=1000)


def test_a_command_that_merely_ends_like_the_marker_is_cut_as_text():
    whole = "echo " + "y" * 5000 + COMMAND_MARKER.format(removed=12)
    message, _ = fit(sample_row(command=whole))
    assert_cut(json.loads(message)["command"], whole)


def test_argv_is_cut_with_the_command():
    args = ("python3", "-c", "z" * 50_000, "tail")
    fields = (*JSON_FIELDS, "args")
    message, size = fit(
        sample_row(command=" ".join(args), args=args),
        view=lambda row: format_json_row(row, fields),
    )
    document = json.loads(message)
    assert len(message) <= size
    assert document["args"][:2] == ["python3", "-c"] and len(document["args"]) == 3
    assert document["args"][2] + "" == document["command"][len("python3 -c ") :]


def test_an_ecs_document_holding_the_command_twice_is_fitted_whole():
    args = ("python3", "-c", "e" * 60_000)
    message, size = fit(sample_row(command=" ".join(args), args=args), view=format_ecs_row)
    assert len(message) <= size
    process = json.loads(message)["process"]
    assert_cut(process["command_line"], " ".join(args), kept_at_least=500)
    assert " ".join(process["args"]) == process["command_line"]


def test_a_plain_row_is_fitted_too():
    fields = text_fields(False)
    whole = "cat " + "q" * 20_000
    message, size = fit(sample_row(command=whole), view=lambda r: format_plain_row(r, fields))
    assert len(message) <= size
    command = message.decode().split("\t")[-1]
    assert_cut(command, whole, kept_at_least=1000)


def test_a_row_too_large_even_without_its_command_is_dropped_and_told(receiver):
    fields = (*JSON_FIELDS, "exe")
    clock = Clock()
    sink, notices = open_sink(receiver.path, size=1024, clock=clock)
    fitter = MessageFitter(lambda row: format_json_row(row, fields), sink.message_budget)
    sink.write(fitter(sample_row(exe="/" + "d" * 2000, command="c" * 5000)))
    assert receiver.records() == [] and sink.dropped == 1
    assert notices == [
        f"syslog socket {receiver.path!r}: 1 row dropped for syslog only: 1 too large for "
        "--syslog-size even with the command line emptied"
    ]
    sink.write(fitter(sample_row(command="c" * 5000)))  # this one fits, shortened
    (record,) = receiver.records()
    assert len(record) <= 1024 and json.loads(message_of(record))["command"].startswith("ccc")
    sink.close()


HOSTILE = "x\nhiststat[1]: forged\r\x00<13>Jan  1 00:00:00 evil: \x85\u2028\u2029 end"


@pytest.mark.parametrize("view", ["json", "plain"])
def test_no_process_can_forge_a_record(receiver, view):
    fields = text_fields(False)
    format_row = json_view if view == "json" else (lambda row: format_plain_row(row, fields))
    sink, _ = open_sink(receiver.path)
    fitter = MessageFitter(format_row, sink.message_budget)
    sink.write(fitter(sample_row(pname=HOSTILE, command=HOSTILE, user=HOSTILE)))
    (record,) = receiver.records()
    text = record.decode("utf-8")
    assert not re.search("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]", text)
    if view == "json":
        assert json.loads(message_of(record))["command"] == HOSTILE
    sink.close()


def test_the_last_guard_escapes_what_could_end_a_record():
    assert safe_message("a\nb\x00c\rd\x85e\u2028f\u2029g") == (
        "a\\u000ab\\u0000c\\u000dd\\u0085e\\u2028f\\u2029g"
    )
    # Inside a JSON string the guard's escapes are JSON's own: the value survives.
    assert json.loads(safe_message('{"k": "a\nb"}'))["k"] == "a\nb"


def fill(sink, receiver_path) -> int:
    """Write until the receiver's queue is full and a row is dropped: how many went."""
    sent = 0
    done = threading.Event()

    def writing() -> None:
        nonlocal sent
        for _ in range(100_000):
            before = sink.dropped
            sink.write(b"x" * 512)
            if sink.dropped > before:
                break
            sent += 1
        done.set()

    worker = threading.Thread(target=writing, daemon=True)
    worker.start()
    assert done.wait(10), "a write to a full syslog socket blocked"
    return sent


def test_a_full_socket_drops_rows_for_syslog_and_tells_at_most_once_a_minute(receiver):
    clock = Clock()
    sink, notices = open_sink(receiver.path, clock=clock)
    sent = fill(sink, receiver.path)
    assert sent > 0 and sink.dropped == 1
    what = f"syslog socket {receiver.path!r}"
    full = "with the socket full (its receiver is not reading)"
    assert notices == [f"{what}: 1 row dropped for syslog only: 1 {full}"]
    for _ in range(5):
        sink.write(b"more")
    sink.flush()
    assert len(notices) == 1 and sink.dropped == 6  # counted, not told yet
    clock.now += DROP_NOTICE_EVERY - 1
    sink.flush()
    assert len(notices) == 1
    clock.now += 1
    sink.flush()  # a minute since the notice: the count since is told, with no new drop
    assert notices[1] == f"{what}: 5 rows dropped for syslog only since the last notice: 5 {full}"
    assert len(receiver.records()) == sent  # those sent arrived, and nothing else
    sink.write(b"after")  # room again: sent
    assert receiver.records() == [sink.record(b"after")]
    sink.close()
    assert len(notices) == 2  # nothing left untold


def test_rows_dropped_near_the_end_are_told_at_close(receiver):
    clock = Clock()
    sink, notices = open_sink(receiver.path, clock=clock)
    fill(sink, receiver.path)
    sink.write(b"dropped too")
    assert len(notices) == 1
    sink.close()
    assert notices[1].endswith(
        "1 row dropped for syslog only since the last notice: 1 with "
        "the socket full (its receiver is not reading)"
    )


def test_a_restarted_receiver_gets_the_next_row_at_once(tmp_path):
    first = Receiver(tmp_path / "log.sock")
    sink, notices = open_sink(first.path)
    sink.write(b"one")
    assert first.records() == [sink.record(b"one")]
    first.close()
    second = Receiver(tmp_path / "log.sock")  # the daemon restarted: a new socket
    try:
        sink.write(b"two")  # the old one refuses: a new connection, and the row is sent
        assert [message_of(r) for r in second.records()] == [b"two"]
        assert notices == [] and sink.dropped == 0
    finally:
        sink.close()
        second.sock.close()


def test_a_receiver_away_is_tried_again_after_a_wait_that_grows_to_a_bound(tmp_path):
    clock = Clock()
    first = Receiver(tmp_path / "log.sock")
    sink, notices = open_sink(first.path, clock=clock)
    first.close()
    sink.write(b"lost")  # refused; a new connection is tried at once, and fails
    assert sink.dropped == 1 and "1 with the socket gone" in notices[0]
    back = Receiver(tmp_path / "log.sock")
    try:
        sink.write(b"too soon")  # no new try before the wait is over: dropped
        clock.now += RECONNECT_FIRST
        sink.write(b"first try")
        assert [message_of(r) for r in back.records()] == [b"first try"]
        assert sink.dropped == 2
    finally:
        back.close()
    for _ in range(12):  # every try fails: the wait doubles, up to its bound
        clock.now += RECONNECT_MAX
        sink.write(b"lost")
    back = Receiver(tmp_path / "log.sock")
    try:
        clock.now += RECONNECT_MAX - 0.01
        sink.write(b"too soon")
        clock.now += 0.01
        sink.write(b"back")
        assert [message_of(r) for r in back.records()] == [b"back"]
        gone = "with the socket gone (its receiver restarting?)"
        assert notices[1:] == [  # a minute after the first: the count since
            f"syslog socket {back.path!r}: 13 rows dropped for syslog only since the last "
            f"notice: 13 {gone}"
        ]
        sink.close()
        assert notices[2].endswith(f"1 row dropped for syslog only since the last notice: 1 {gone}")
    finally:
        back.sock.close()


def test_sighup_tries_a_gone_socket_again_at_once(tmp_path):
    clock = Clock()
    first = Receiver(tmp_path / "log.sock")
    sink, _ = open_sink(first.path, clock=clock)
    first.close()
    sink.write(b"lost")
    back = Receiver(tmp_path / "log.sock")
    try:
        sink.write(b"too soon")
        sink.reopen()
        sink.write(b"after SIGHUP")
        assert [message_of(r) for r in back.records()] == [b"after SIGHUP"]
    finally:
        sink.close()
        back.sock.close()


def test_another_send_error_drops_the_row_and_names_the_error(receiver):
    sink, notices = open_sink(receiver.path)
    receiver.sock.connect(str(receiver.path))  # a receiver connected elsewhere refuses us
    sink.write(b"refused")
    assert sink.dropped == 1 and notices[0].endswith("1 with an error (Operation not permitted)")
    sink.close()

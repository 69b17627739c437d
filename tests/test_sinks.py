"""Log and stdout sinks: modes, headers, flushing, reopening and write errors."""

import fcntl
import io
import math
import os
import select
import stat
import threading
import time

import pytest

from histstat.output import sinks
from histstat.output.base import ReaderGone, SinkBusy, SinkError
from histstat.output.sinks import LogSink, StdoutSink

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # named in fcntl from Python 3.10


def open_log(path, header="h1\th2"):
    warnings = []
    sink = LogSink(str(path), warnings.append)
    sink.open(header)
    return sink, warnings


def test_new_log_is_private_and_starts_with_the_header(tmp_path):
    path = tmp_path / "rows.log"
    sink, warnings = open_log(path)
    sink.write("row 1")
    assert path.read_text() == "h1\th2\nrow 1\n"  # written through, before close
    sink.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert warnings == []


def test_existing_log_is_appended_without_a_second_header(tmp_path):
    path = tmp_path / "rows.log"
    for row in ("row 1", "row 2"):
        sink, _ = open_log(path)
        sink.write(row)
        sink.close()
    assert path.read_text() == "h1\th2\nrow 1\nrow 2\n"


def test_log_readable_by_others_gets_one_warning(tmp_path):
    path = tmp_path / "rows.log"
    path.write_text("")
    path.chmod(0o644)
    sink, warnings = open_log(path)
    sink.close()
    assert len(warnings) == 1 and str(path) in warnings[0]


def test_reopen_follows_a_rotated_log(tmp_path):
    path = tmp_path / "rows.log"
    sink, _ = open_log(path)
    sink.write("before")
    path.rename(tmp_path / "rows.log.1")
    sink.reopen()
    sink.write("after")
    sink.close()
    assert (tmp_path / "rows.log.1").read_text() == "h1\th2\nbefore\n"
    assert path.read_text() == "h1\th2\nafter\n"


@pytest.mark.parametrize("where", ["missing-dir/rows.log", "."])
def test_unopenable_log_is_one_clear_error(tmp_path, where):
    with pytest.raises(SinkError) as caught:
        open_log(tmp_path / where)
    assert "cannot open log" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_failing_write_is_one_clear_error():
    sink = LogSink("/dev/full", lambda message: None)
    with pytest.raises(SinkError, match="No space left on device"):
        sink.open("header")
    sink.close()


class ClosedPipe(io.BytesIO):
    def write(self, data):
        raise BrokenPipeError()


def test_closed_pipe_on_stdout_is_a_normal_end():
    with pytest.raises(ReaderGone):
        StdoutSink(ClosedPipe(), "utf-8").write("row")


def test_stdout_escapes_what_its_encoding_cannot_carry():
    stream = io.BytesIO()
    StdoutSink(stream, "ascii").write("café")
    assert stream.getvalue() == b"caf\\xe9\n"


def test_log_owned_by_another_user_is_refused_as_root(tmp_path):
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.fail("this test needs root: it gives a file to another user")
    path = tmp_path / "planted.log"
    path.write_text("")
    path.chmod(0o600)
    os.chown(path, 65534, 65534)
    with pytest.raises(SinkError, match="belongs to another user .uid 65534.") as caught:
        open_log(path)
    assert "\n" not in str(caught.value)
    assert path.read_text() == ""


def test_check_refuses_what_open_would_and_creates_nothing(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(SinkError, match="FIFO"):
        LogSink(str(fifo), lambda message: None).check()
    LogSink(str(tmp_path / "new.log"), lambda message: None).check()
    assert os.listdir(tmp_path) == ["fifo"]


def test_disk_full_mid_row_leaves_only_whole_rows(tmp_path):
    path = tmp_path / "rows.log"
    sink, _ = open_log(path)
    sink.write("row 1")

    def fill_up(fd, data):
        if len(data) > 3:
            return os.write(fd, data[:3])  # part of the row fits...
        raise OSError(28, "No space left on device")  # ...then the disk is full

    sink._os_write = fill_up
    with pytest.raises(SinkError, match="No space left"):
        sink.write("row 2 is long")
    sink.close()
    assert path.read_text() == "h1\th2\nrow 1\n"


# --------------------------------------------------------------------------- stdout's end


@pytest.fixture(params=["nowait", "small-writes"])
def small_pipe(request, monkeypatch):
    """A pipe that holds one page, as (read end, write end as a binary stream); written
    with RWF_NOWAIT, or as on a kernel without it (PIPE_BUF at a time, after poll)."""
    if request.param == "small-writes":
        monkeypatch.setattr(sinks, "_RWF_NOWAIT", None)
    elif sinks._RWF_NOWAIT is None:
        pytest.skip("this Python has no os.RWF_NOWAIT")
    read_end, write_end = os.pipe()
    fcntl.fcntl(read_end, F_SETPIPE_SZ, 4096)
    stream = os.fdopen(write_end, "wb")
    yield read_end, stream
    os.close(read_end)
    stream.close()


def drain(fd: int) -> bytes:
    data = bytearray()
    while select.select([fd], [], [], 0)[0]:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        data += chunk
    return bytes(data)


@pytest.mark.parametrize("writes", ["nowait", "small-writes"])
def test_stdout_whose_reader_left_mid_run_is_reader_gone(writes, monkeypatch):
    """`histstat | head`: the reader closes the pipe with rows still to write; the sink
    says the reader is gone (and histstat ends quietly), never a traceback."""
    if writes == "small-writes":
        monkeypatch.setattr(sinks, "_RWF_NOWAIT", None)
    read_end, write_end = os.pipe()
    os.close(read_end)
    with os.fdopen(write_end, "wb") as stream:
        sink = StdoutSink(stream, "utf-8")
        sink.write("a" * 20_000)
        sink.write("b")
        with pytest.raises(ReaderGone):
            sink.flush()


def test_stdout_starts_no_row_once_the_run_gave_up_on_it(small_pipe):
    read_end, stream = small_pipe
    sink = StdoutSink(stream, "utf-8")
    sink.write("first")
    sink.flush()
    sink.give_up_at = lambda: time.monotonic() - 1  # the grace after a signal is over
    sink.write("second")
    sink.flush()
    assert drain(read_end) == b"first\n" and sink.abandoned


def test_stdout_a_stalled_reader_gets_a_cut_row_and_nothing_after_it(small_pipe):
    read_end, stream = small_pipe
    sink = StdoutSink(stream, "utf-8")
    deadline = time.monotonic() + 0.2
    sink.give_up_at = lambda: deadline
    sink.write("a" * 20_000)
    sink.write("b" * 20_000)
    sink.flush()  # returns: nobody reads, and the deadline passed
    data = drain(read_end)
    assert sink.abandoned
    assert data and set(data) == {ord("a")}  # part of the first row, none of the second
    sink.write("c")
    sink.flush()
    assert drain(read_end) == b""


def test_stdout_a_row_in_flight_is_finished_while_the_reader_reads_and_none_follows(
    small_pipe,
):
    read_end, stream = small_pipe
    sink = StdoutSink(stream, "utf-8")
    received = bytearray()

    def reader():
        while True:
            ready = select.select([read_end], [], [], 1.0)[0]
            if not ready:
                return  # nothing more is coming
            chunk = os.read(read_end, 1024)  # slowly: a kilobyte at a time
            if not chunk:
                return
            received.extend(chunk)
            time.sleep(0.001)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        deadline = time.monotonic() + 0.05
        sink.give_up_at = lambda: deadline
        sink.write("a" * 200_000)  # far longer than the pipe: still being written when
        sink.write("b" * 10)  # the deadline passes
        sink.flush()
    finally:
        thread.join(10)
    assert bytes(received) == b"a" * 200_000 + b"\n"  # whole, and the next never started
    assert sink.abandoned


def test_stdout_never_blocks_inside_a_write_to_a_full_pipe(small_pipe):
    """While nobody reads, histstat waits between writes, where a signal is answered."""
    read_end, stream = small_pipe
    sink = StdoutSink(stream, "utf-8")
    checks = []

    def give_up_at():
        checks.append(time.monotonic())
        return math.inf if len(checks) < 5 else -math.inf

    sink.give_up_at = give_up_at
    sink.write("x" * 50_000)
    sink.flush()
    assert len(checks) == 5 and sink.abandoned  # it kept looking while it waited


def test_stdout_a_stalled_reader_gets_whole_rows_later_and_the_rest_is_given_back(small_pipe):
    """Nobody reads until the wait is over: stdout stops between two rows, keeps the rest
    of the row it started, gives the writer back the rows it did not start, and finishes
    the kept row first once the reader reads."""
    read_end, stream = small_pipe
    sink = StdoutSink(stream, "utf-8")
    sink.wait_until = lambda: time.monotonic() + 0.1
    sink.write("a" * 20_000)
    sink.write("b" * 20_000)
    sink.write("c" * 30_000)  # past the buffer's size: written now, and stalls
    assert sink.stalled
    sink.write("d")  # not taken
    with pytest.raises(SinkBusy) as busy:
        sink.flush()
    assert busy.value.taken == 1 and busy.value.stdout  # "a" in flight; "b", "c" given back
    received = bytearray(drain(read_end))

    def reader():
        while select.select([read_end], [], [], 0.5)[0]:
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                return
            received.extend(chunk)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        sink.wait_until = lambda: math.inf
        for line in ("b" * 20_000, "c" * 30_000, "d"):  # the writer writes them again
            sink.write(line)
        sink.flush()
    finally:
        thread.join(10)
    rows = [b"a" * 20_000, b"b" * 20_000, b"c" * 30_000, b"d"]
    assert bytes(received) == b"\n".join(rows) + b"\n"  # whole rows, none glued or twice
    assert not sink.abandoned and not sink.stalled

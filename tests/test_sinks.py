"""Log and stdout sinks: modes, headers, flushing, reopening and write errors."""

import io
import os
import stat

import pytest

from histstat.output.base import ReaderGone, SinkError
from histstat.output.sinks import LogSink, StdoutSink


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

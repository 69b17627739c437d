"""End-to-end: the installed histstat against real loopback sockets and real processes."""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid

import psutil
import pytest

import histstat
from histstat.containers import read_container_id
from histstat.poller import MAX_HASH_WAIT
from support.children import USER, copied_interpreter_env, require_wchan, waits_on_full_pipe
from support.contract import COLUMNS, HASH_COLUMNS, PRETTY_COLUMNS
from support.histstat import (
    CLOSED_STDERR,
    CLOSED_STDOUT,
    INTERVAL,
    UTF8_ENV,
    assert_clean_end,
    connection_key,
    histstat_command,
    locale_env,
    run_once,
    sleeping_between_polls,
)
from support.waiting import END_TIMEOUT, STOP_TIMEOUT, wait_for

# Linux fcntl commands (named in the fcntl module from Python 3.10).
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)


def keys(rows) -> list:
    return sorted((connection_key(row) for row in rows), key=str)


def assert_exactly_child_connections(rows, child, v4=True, v6=True) -> None:
    """Each expected connection reported once, and nothing else under the child's pid."""
    assert keys(rows) == sorted(child.connections(v4=v4, v6=v6), key=str)


def file_hashes(path: str) -> tuple:
    with open(path, "rb") as handle:
        data = handle.read()
    return hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest()


def read_log_lines(path) -> list:
    """The complete lines of a log (one that histstat is writing may end mid-line)."""
    with open(path, "rb") as handle:
        return handle.read().decode("utf-8", "surrogateescape").split("\n")[:-1]


# --------------------------------------------------------------------------- 1. JSON


def check_json_rows(rows, child, started: datetime.datetime) -> None:
    pname = psutil.Process(child.pid).name()
    for row in rows:
        assert row["pid"] == child.pid and type(row["pid"]) is int
        assert type(row["lport"]) is int
        if row["status"] in ("LISTEN", None):  # None: UDP has no status
            assert row["raddr"] is None and row["rport"] is None
        else:
            assert type(row["rport"]) is int
        assert row["pname"] == pname
        assert row["user"] == USER
        assert row["command"] == child.command
        stamp = row["timestamp"]
        assert "." in stamp, stamp
        seen = datetime.datetime.fromisoformat(stamp)
        assert seen.tzinfo is not None, stamp
        assert started <= seen <= datetime.datetime.now().astimezone(), stamp
        assert re.fullmatch(r"\d\d:\d\d:\d\d", row["time"]), row["time"]
        assert re.fullmatch(r"\d\d-\d\d-\d\d", row["date"]), row["date"]
        assert row["time"] == seen.strftime("%H:%M:%S")
        assert row["date"] == seen.strftime("%y-%m-%d")


OWNED = ["pname", "owners", "owners_count"]  # JSON keys: every process holding the socket


def test_json_reports_listener_and_both_ends_ipv4(spawn_child, run_histstat):
    started = datetime.datetime.now().astimezone()
    child = spawn_child()
    hs = run_histstat("-j", *INTERVAL, "--pid", child.pid)
    rows = hs.wait_for_child(child, v6=False)
    result = hs.stop()
    assert_clean_end(result)
    v4_rows = [row for row in result.rows_of(child.pid) if row["proto"] in ("tcp", "udp")]
    assert v4_rows == [row for row in rows if row["proto"] in ("tcp", "udp")]
    assert_exactly_child_connections(v4_rows, child, v6=False)
    check_json_rows(v4_rows, child, started)
    # The original's columns, with the namespace before the status, the connection's
    # story around it, and the owners, the parent and the container after the process
    # name (JSON schema).
    story = {
        "status": ["netns", "status", "direction", "attribution"],
        "pname": [*OWNED, "ppid", "parent", "container"],
    }
    with_story = [key for column in COLUMNS for key in story.get(column, [column])]
    assert list(v4_rows[0]) == ["event", *with_story, "command_length", "timestamp"]
    assert {(row["ppid"], row["parent"]) for row in v4_rows} == {
        (os.getpid(), psutil.Process().name())
    }
    assert {row["event"] for row in v4_rows} == {"open"}
    assert {row["attribution"] for row in v4_rows} == {"socket"}
    # The child's cgroup is the tests' (none, unless the tests run in a container).
    assert {row["container"] for row in v4_rows} == {read_container_id(os.getpid())}
    # Every holder: here the child alone.
    assert {(row["owners_count"], str(row["owners"])) for row in v4_rows} == {
        (1, str([{"pid": child.pid, "name": v4_rows[0]["pname"]}]))
    }


def test_json_reports_listener_and_both_ends_ipv6(spawn_child, run_histstat):
    started = datetime.datetime.now().astimezone()
    child = spawn_child()
    if not child.has_v6:
        pytest.skip("::1 cannot be bound here")
    hs = run_histstat("-j", *INTERVAL, "--pid", child.pid)
    hs.wait_for_child(child)
    result = hs.stop()
    assert_clean_end(result)
    rows = result.rows_of(child.pid)
    assert_exactly_child_connections(rows, child)
    check_json_rows(rows, child, started)


# --------------------------------------------------------------------------- 2. text


def check_text_rows(rows, child) -> None:
    pname = psutil.Process(child.pid).name()
    assert_exactly_child_connections(rows, child)
    for row in rows:
        assert row["pid"] == str(child.pid)
        assert row["pname"] == pname
        assert row["user"] == USER
        assert row["command"] == child.command
        assert re.fullmatch(r"\d\d:\d\d:\d\d", row["time"]), row
        if "date" in row:  # the pretty view shows the time only
            assert re.fullmatch(r"\d\d-\d\d-\d\d", row["date"]), row
        if row["status"] in ("LISTEN", "-"):  # "-": UDP has no status
            assert (row["raddr"], row["rport"]) == ("*", "*")


def test_plain_output(spawn_child, run_histstat):
    child = spawn_child()
    hs = run_histstat(*INTERVAL, "--pid", child.pid)
    hs.wait_for_child(child)
    result = hs.stop()
    assert_clean_end(result)
    assert result.lines[0] == "\t".join(COLUMNS)
    assert result.lines.count(result.lines[0]) == 1
    assert all(len(line.split("\t")) == len(COLUMNS) for line in result.lines)
    check_text_rows(result.rows_of(child.pid), child)


def test_pretty_output(spawn_child, run_histstat):
    child = spawn_child()
    hs = run_histstat("-p", *INTERVAL, "--pid", child.pid)
    hs.wait_for_child(child)
    result = hs.stop()
    assert_clean_end(result)
    header = result.lines[0]
    assert header.startswith("time ")
    assert header.split() == list(PRETTY_COLUMNS)
    assert "\t" not in result.stdout
    rows = result.rows_of(child.pid)
    check_text_rows(rows, child)
    # Endpoints joined as ss writes them: IPv6 in brackets, *:* for no remote end.
    lines = [line for line in result.lines if child.argv[3] in line]
    assert any(f" 127.0.0.1:{child.lport} *:* LISTEN " in " ".join(line.split()) for line in lines)
    if child.has_v6:
        assert any(f" [::1]:{child.lport6} *:* LISTEN " in " ".join(line.split()) for line in lines)


# --------------------------------------------------------------------------- 3. hostile

HOSTILE = "a\nb\x1bc"
HOSTILE_SHOWN = "a\\nb\\x1bc"


@pytest.mark.parametrize("style", [(), ("-p",)], ids=["plain", "pretty"])
def test_control_characters_are_escaped_in_text(spawn_child, run_histstat, style):
    child = spawn_child(HOSTILE)
    hs = run_histstat(*style, *INTERVAL, "--pid", child.pid)
    hs.wait_for_child(child)
    result = hs.stop()
    assert_clean_end(result)
    assert b"\x1b" not in result.stdout_bytes
    expected = child.command.replace("\n", "\\n").replace("\x1b", "\\x1b")
    assert expected.endswith(" " + HOSTILE_SHOWN)
    marker = child.argv[3]
    child_lines = [line for line in result.lines if marker in line]
    rows = result.rows_of(child.pid)
    # One line per row: every line naming the child is a whole row of it.
    assert len(child_lines) == len(rows) == len(child.connections())
    assert all(row["command"] == expected for row in rows)
    assert not any(line.startswith(("b\x1bc", "b\\x1bc")) for line in result.lines)
    if not style:
        assert all(len(line.split("\t")) == len(COLUMNS) for line in result.lines)


def test_control_characters_keep_true_text_in_json(spawn_child, run_histstat):
    child = spawn_child(HOSTILE)
    hs = run_histstat("-j", *INTERVAL, "--pid", child.pid)
    hs.wait_for_child(child)
    result = hs.stop()
    assert_clean_end(result)
    raw_lines = result.stdout_bytes.split(b"\n")
    assert raw_lines[-1] == b""
    for raw in raw_lines[:-1]:
        assert not any(byte < 0x20 for byte in raw), raw
    rows = result.rows_of(child.pid)
    assert_exactly_child_connections(rows, child)
    for row in rows:
        assert row["command"] == child.command
        assert row["command"].endswith(" " + HOSTILE)


HOSTILE_NAME = "ev\x1bil\nx"  # 9 bytes: fits the kernel's 15-byte process name
FORMAT_CHARS = ("bidi\u202eq", "c1\x85x", "del\x7fy", "zw\u200bz", "ls\u2028p")
FORMAT_CHARS_SHOWN = "bidi\\u202eq c1\\x85x del\\x7fy zw\\u200bz ls\\u2028p"
# UTF-8 of U+202E, U+0085, U+200B, U+2028 and DEL: none may reach stdout raw.
RAW_FORMAT_BYTES = (b"\xe2\x80\xae", b"\xc2\x85", b"\xe2\x80\x8b", b"\xe2\x80\xa8", b"\x7f")


@pytest.mark.parametrize("style", [(), ("-p",), ("-j",)], ids=["plain", "pretty", "json"])
def test_hostile_process_name_and_format_characters(spawn_child, run_histstat, style):
    child = spawn_child(*FORMAT_CHARS, comm=HOSTILE_NAME)
    assert psutil.Process(child.pid).name() == HOSTILE_NAME
    hs = run_histstat(*style, *INTERVAL, "--pid", child.pid)
    hs.wait_for_child(child)
    result = hs.stop()
    assert_clean_end(result)
    for raw in RAW_FORMAT_BYTES + (b"\x1b",):
        assert raw not in result.stdout_bytes, raw
    rows = result.rows_of(child.pid)
    assert_exactly_child_connections(rows, child)
    if style == ("-j",):
        assert not any(byte < 0x20 for byte in result.stdout_bytes.replace(b"\n", b""))
        for row in rows:
            assert row["pname"] == HOSTILE_NAME
            assert row["command"] == child.command
    else:
        shown = " ".join(child.argv[: -len(FORMAT_CHARS)]) + " " + FORMAT_CHARS_SHOWN
        for row in rows:
            assert row["pname"] == "ev\\x1bil\\nx"
            assert row["command"] == shown


LOCALES = [
    ("C", {}),
    ("C.UTF-8", {}),
    ("en_US.UTF-8", {}),
    # Python turns UTF-8 mode on under the C locale; without it stdout is ASCII.
    ("C", {"PYTHONUTF8": "0"}),
]


@pytest.mark.parametrize(
    "lc_all, extra", LOCALES, ids=["C", "C.UTF-8", "en_US.UTF-8", "C-ascii-stdout"]
)
def test_undecodable_argv_byte_under_locales(spawn_child, run_histstat, lc_all, extra):
    child = spawn_child(b"bad-\xff-byte")
    hs = run_histstat(*INTERVAL, "--pid", child.pid, env={**locale_env(lc_all), **extra})
    hs.wait_for_child(child)
    result = hs.stop()
    assert_clean_end(result)
    if extra:
        result.stdout_bytes.decode("ascii")
    assert b"\xff" not in result.stdout_bytes
    rows = result.rows_of(child.pid)
    assert_exactly_child_connections(rows, child)
    expected = " ".join(child.argv[:-1]) + " bad-\\xff-byte"
    assert all(row["command"] == expected for row in rows)


@pytest.mark.parametrize(
    "lc_all, extra", LOCALES, ids=["C", "C.UTF-8", "en_US.UTF-8", "C-ascii-stdout"]
)
def test_valid_utf8_stays_text_in_json_under_every_locale(spawn_child, run_histstat, lc_all, extra):
    """Only bytes that are not UTF-8 become \\xNN; JSON is UTF-8 whatever the locale."""
    child = spawn_child("caf\u00e9-\U0001f600".encode(), b"bad-\xff")
    hs = run_histstat("-j", *INTERVAL, "--pid", child.pid, env={**locale_env(lc_all), **extra})
    hs.wait_for_child(child)
    result = hs.stop()
    assert_clean_end(result)
    result.stdout_bytes.decode("utf-8")  # strict: NDJSON is always UTF-8
    rows = result.rows_of(child.pid)
    assert_exactly_child_connections(rows, child)
    expected = " ".join(child.argv[:-2]) + " caf\u00e9-\U0001f600 bad-\\xff"
    assert all(row["command"] == expected for row in rows)


def test_json_stays_utf8_when_stdout_encoding_is_not(spawn_child, run_histstat):
    child = spawn_child("caf\u00e9".encode())
    env = {**locale_env("C.UTF-8"), "PYTHONIOENCODING": "latin-1"}
    hs = run_histstat("-j", *INTERVAL, "--pid", child.pid, env=env)
    hs.wait_for_child(child)
    result = hs.stop()
    assert_clean_end(result)
    rows = [json.loads(line) for line in result.stdout_bytes.decode("utf-8").splitlines()]
    assert all(row["command"].endswith(" caf\u00e9") for row in rows if row["pid"] == child.pid)


def test_undecodable_argv_byte_in_json(spawn_child, run_histstat):
    child = spawn_child(b"bad-\xff-byte")
    hs = run_histstat("-j", *INTERVAL, "--pid", child.pid)
    hs.wait_for_child(child)
    result = hs.stop()
    assert_clean_end(result)
    result.stdout_bytes.decode("utf-8")  # NDJSON is valid UTF-8
    rows = result.rows_of(child.pid)
    expected = " ".join(child.argv[:-1]) + " bad-\\xff-byte"
    assert rows and all(row["command"] == expected for row in rows)


# --------------------------------------------------------------------------- 4. log


def test_plain_log_matches_stdout_and_appends_without_second_header(
    spawn_child, run_histstat, tmp_path
):
    log = tmp_path / "capture.log"
    first_child = spawn_child()
    hs = run_histstat(*INTERVAL, "--pid", first_child.pid, "-l", log, env=UTF8_ENV)
    hs.wait_for_child(first_child)
    first = hs.stop()
    assert_clean_end(first)
    assert first.stderr == ""
    assert stat.S_IMODE(os.stat(log).st_mode) == 0o600
    first_log = read_log_lines(log)
    assert first_log == first.lines
    assert first_log[0] == "\t".join(COLUMNS)

    second_child = spawn_child()
    hs = run_histstat(*INTERVAL, "--pid", second_child.pid, "-l", log, env=UTF8_ENV)
    hs.wait_for_child(second_child)
    second = hs.stop()
    assert_clean_end(second)
    assert second.lines[0] == "\t".join(COLUMNS)
    log_lines = read_log_lines(log)
    assert log_lines == first_log + second.lines[1:]
    assert log_lines.count("\t".join(COLUMNS)) == 1
    assert stat.S_IMODE(os.stat(log).st_mode) == 0o600


def test_json_log_matches_stdout(spawn_child, run_histstat, tmp_path):
    log = tmp_path / "capture.json"
    child = spawn_child()
    hs = run_histstat("-j", *INTERVAL, "--pid", child.pid, "-l", log)
    hs.wait_for_child(child)
    result = hs.stop()
    assert_clean_end(result)
    assert stat.S_IMODE(os.stat(log).st_mode) == 0o600
    logged = [json.loads(line) for line in read_log_lines(log)]
    mine = [row for row in logged if row["pid"] == child.pid]
    assert mine == result.rows_of(child.pid)
    assert_exactly_child_connections(mine, child)
    assert len(logged) == len(result.rows)


def test_sighup_reopens_rotated_log(spawn_child, run_histstat, tmp_path):
    log = tmp_path / "capture.log"
    rotated = tmp_path / "capture.log.1"
    header = "\t".join(COLUMNS)
    tag = uuid.uuid4().hex[:8]  # the children's names: the one after SIGHUP comes later
    before = spawn_child(comm=f"hup{tag}b")
    hs = run_histstat(*INTERVAL, "--name", f"hup{tag}?", "-l", log, env=UTF8_ENV)
    hs.wait_for_child(before)
    os.rename(log, rotated)
    hs.send(signal.SIGHUP)

    def reopened():
        try:
            lines = read_log_lines(log)
        except FileNotFoundError:
            return False
        return lines[:1] == [header]

    hs.until(reopened, what="the log reopened with a header after SIGHUP")
    after = spawn_child(comm=f"hup{tag}a")

    def after_logged():
        rows = [r for r in parse_log(log) if r["pid"] == str(after.pid)]
        return rows if after.connections() <= {connection_key(r) for r in rows} else None

    hs.until(after_logged, what="the new child's rows in the reopened log")
    result = hs.stop()
    assert_clean_end(result)

    new_lines = read_log_lines(log)
    assert new_lines.count(header) == 1 and new_lines[0] == header
    new_rows = parse_log(log)
    assert_exactly_child_connections([r for r in new_rows if r["pid"] == str(after.pid)], after)
    assert not [r for r in new_rows if r["pid"] == str(before.pid)]
    assert stat.S_IMODE(os.stat(log).st_mode) == 0o600

    old_lines = read_log_lines(rotated)
    assert old_lines[0] == header and old_lines.count(header) == 1
    old_rows = parse_log(rotated)
    assert_exactly_child_connections([r for r in old_rows if r["pid"] == str(before.pid)], before)
    assert not [r for r in old_rows if r["pid"] == str(after.pid)]
    # Together the two files hold every row of stdout, each once.
    assert old_lines + new_lines[1:] == result.lines


def parse_log(path) -> list:
    lines = read_log_lines(path)
    fields = lines[0].split("\t")
    return [dict(zip(fields, line.split("\t"))) for line in lines[1:]]


def test_existing_readable_log_warns_once(spawn_child, run_histstat, tmp_path):
    log = tmp_path / "shared.log"
    log.write_text("")
    os.chmod(log, 0o644)
    child = spawn_child()
    hs = run_histstat(*INTERVAL, "--pid", child.pid, "-l", log, env=UTF8_ENV)
    hs.wait_for_child(child)
    result = hs.stop()
    assert_clean_end(result)
    warnings = result.stderr.splitlines()
    assert len(warnings) == 1, result.stderr
    assert str(log) in warnings[0] and "0644" in warnings[0]
    assert read_log_lines(log) == result.lines


def test_quiet_writes_only_the_log(spawn_child, run_histstat, tmp_path):
    log = tmp_path / "quiet.json"
    child = spawn_child()
    hs = run_histstat("-q", "-j", *INTERVAL, "--pid", child.pid, "-l", log)

    def logged():
        if not log.exists():
            return None
        rows = [json.loads(line) for line in read_log_lines(log)]
        rows = [row for row in rows if row["pid"] == child.pid]
        return rows if child.connections() <= {connection_key(r) for r in rows} else None

    hs.until(logged, what="the child's rows in the log")
    result = hs.stop()
    assert_clean_end(result)
    assert result.stdout_bytes == b""
    assert_exactly_child_connections(
        [r for r in map(json.loads, read_log_lines(log)) if r["pid"] == child.pid], child
    )


# --------------------------------------------------------------------------- 5. SIGTERM


@pytest.mark.parametrize("hashes", [(), ("--hash",)], ids=["plain-rows", "hash-rows"])
def test_sigterm_exits_zero_with_log_complete(spawn_child, run_histstat, tmp_path, hashes):
    log = tmp_path / "term.json"
    child = spawn_child()
    hs = run_histstat("-j", *hashes, *INTERVAL, "--pid", child.pid, "-l", log, env=UTF8_ENV)
    hs.wait_for_child(child)
    result = hs.stop()
    assert result.returncode == 0
    assert result.stderr == ""
    logged = read_log_lines(log)
    assert all(line in logged for line in result.lines)
    assert_exactly_child_connections(
        [r for r in map(json.loads, logged) if r["pid"] == child.pid], child
    )


def test_sigterm_ends_histstat_while_stdout_is_blocked(spawn_child, tmp_path):
    """A reader that stopped reading (a paused pager) must not keep histstat from ending."""
    read_end, write_end = os.pipe()
    try:
        fcntl.fcntl(read_end, F_SETPIPE_SZ, 4096)
        capacity = fcntl.fcntl(read_end, F_GETPIPE_SZ)
        child = spawn_child("x" * (4 * capacity))  # each of its rows is longer than the pipe
        require_wchan(child)
        err_path = tmp_path / "stderr.txt"
        with open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [histstat_command(), *INTERVAL, "--pid", str(child.pid)],
                stdin=subprocess.DEVNULL,
                stdout=write_end,
                stderr=err,
            )
        # write_end stays open here: it tells when the pipe has no room left.
        try:
            wait_for(
                lambda: waits_on_full_pipe(proc.pid, write_end),
                describe=lambda: f"stderr: {err_path.read_text()}",
            )
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pytest.fail("histstat still runs 5 s after SIGTERM while its stdout is full")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(END_TIMEOUT)
        assert rc == 0
        assert "Traceback" not in err_path.read_text()
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def test_quiet_log_works_with_stdout_closed(spawn_child, run_histstat, tmp_path):
    """-q needs no stdout: a daemon started with stdout closed must still log."""
    log = tmp_path / "daemon.json"
    child = spawn_child()
    hs = run_histstat("-q", "-j", *INTERVAL, "--pid", child.pid, "-l", log, prefix=CLOSED_STDOUT)

    def logged():
        if not log.exists():
            return None
        rows = [r for r in map(json.loads, read_log_lines(log)) if r["pid"] == child.pid]
        return rows if child.connections() <= {connection_key(r) for r in rows} else None

    hs.until(logged, what="the child's rows in the log")
    result = hs.stop()
    assert_clean_end(result)
    assert result.stderr == ""


def test_closed_stdout_is_a_one_line_runtime_error(run_histstat):
    hs = run_histstat(*INTERVAL, prefix=CLOSED_STDOUT)
    result = hs.wait(timeout=5)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_notices_stay_off_stdout_when_stderr_is_closed(spawn_child, run_histstat, tmp_path):
    """stdout carries rows only, even when there is no stderr to warn on."""
    log = tmp_path / "shared.json"
    log.write_text("")
    os.chmod(log, 0o644)  # histstat has a warning to give
    child = spawn_child()
    marker = child.argv[3]
    hs = run_histstat("-j", *INTERVAL, "--pid", child.pid, "-l", log, prefix=CLOSED_STDERR)
    hs.until(
        lambda: sum(marker in line for line in hs.lines()) >= len(child.connections()),
        what="the child's rows on stdout",
    )
    result = hs.stop()
    assert result.returncode == 0
    not_json = []
    for line in result.lines:
        try:
            json.loads(line)
        except ValueError:
            not_json.append(line)
    assert not_json == []


# --------------------------------------------------------------------------- 6. pipes


def test_head_closing_the_pipe_ends_histstat(tmp_path):
    err = tmp_path / "stderr.txt"
    # --pid of this test, which holds no socket: only the header to write.
    script = '"$0" -i 0.1 --pid "$2" 2>"$1" | head -n 1; exit "${PIPESTATUS[0]}"'
    started = time.monotonic()
    proc = subprocess.Popen(
        ["bash", "-c", script, histstat_command(), str(err), str(os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("histstat -i 0.1 | head -n 1 did not finish within 10 s")
    assert time.monotonic() - started < 10
    assert proc.returncode == 0, err.read_text()
    assert err.read_text() == ""
    assert out.decode() == "\t".join(COLUMNS) + "\n"


def test_head_leaving_in_the_middle_of_a_row_ends_histstat_quietly(spawn_child, tmp_path):
    """A row larger than the pipe (a 65,536-character command line) is being written
    when its reader exits: histstat ends at once, with no traceback."""
    child = spawn_child("x" * 100_000)
    err = tmp_path / "stderr.txt"
    script = '"$0" --once -j --pid "$2" 2>"$1" | head -c 100; exit "${PIPESTATUS[0]}"'
    proc = subprocess.run(
        ["bash", "-c", script, histstat_command(), str(err), str(child.pid)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=STOP_TIMEOUT,
    )
    assert proc.returncode == 0, err.read_text()
    assert err.read_text() == ""
    assert len(proc.stdout) == 100


def test_reader_gone_between_polls_ends_histstat(spawn_child, tmp_path):
    """No new row to write: histstat must still notice the closed pipe within ~1 poll."""
    child = spawn_child()
    require_wchan(child)
    expected = child.connections()
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [histstat_command(), "-j", "-i", "0.5", "--pid", str(child.pid)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    fd = proc.stdout.fileno()
    received = bytearray()

    def pending_output() -> bool:
        if not select.select([fd], [], [], 0)[0]:
            return False
        chunk = os.read(fd, 65536)
        received.extend(chunk)
        return bool(chunk)

    def first_poll_written_and_asleep() -> bool:
        while pending_output():
            pass
        rows = [json.loads(line) for line in bytes(received).split(b"\n")[:-1]]
        seen = {connection_key(row) for row in rows if row["pid"] == child.pid}
        return (
            expected <= seen
            and sleeping_between_polls(proc.pid)
            and not select.select([fd], [], [], 0)[0]
        )

    try:
        wait_for(
            first_poll_written_and_asleep,
            describe=lambda: (
                f"stdout so far:\n{bytes(received).decode()}\nstderr:\n{err_path.read_text()}"
            ),
        )
        proc.stdout.close()  # the reader goes away while histstat has nothing to write
        closed = time.monotonic()
        rc = proc.wait(timeout=5)
        assert time.monotonic() - closed < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(END_TIMEOUT)
    assert rc == 0
    assert err_path.read_text() == ""


# --------------------------------------------------------------------------- 7. bad input


def test_usage_error_exits_2_with_one_line_and_no_traceback():
    """The installed command end to end; every usage error is tested against the parser
    in tests/test_cli.py."""
    done = run_once(["-tulpn"])  # a netstat habit
    err = done.stderr.decode(errors="replace")
    assert done.returncode == 2, (done.returncode, err)
    assert done.stdout == b""
    assert len(err.splitlines()) == 1 and err.endswith("\n"), err
    assert err.startswith("histstat: error: ") and "Traceback" not in err, err


@pytest.mark.parametrize("interval", ["10000000000", "1" + "0" * 300], ids=["1e10", "1e300"])
def test_huge_interval_is_refused_or_honoured(spawn_child, run_histstat, interval):
    """A finite interval too long for the platform's sleep: a usage error or a long wait,
    never a crash after the first poll."""
    child = spawn_child()
    require_wchan(child)
    hs = run_histstat("-j", "-i", interval, "--pid", child.pid)
    hs.until(
        lambda: hs.proc.poll() is not None or sleeping_between_polls(hs.proc.pid),
        what="histstat to end or to sleep after its first poll",
    )
    if hs.proc.poll() is None:  # honoured: it waits for its next poll
        result = hs.stop()
        assert_clean_end(result)
        assert_exactly_child_connections(result.rows_of(child.pid), child)
    else:
        result = hs.wait()
        assert "Traceback" not in result.stderr, result.stderr
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr


def test_log_in_missing_directory_exits_1(tmp_path):
    path = str(tmp_path / "no-such-dir" / "x.log")
    done = run_once(["-i", "0.1", "-l", path])
    assert done.returncode == 1, done
    err = done.stderr.decode()
    assert len(err.splitlines()) == 1 and path in err, err
    assert "Traceback" not in err


def test_log_is_a_directory_exits_1(tmp_path):
    done = run_once(["-i", "0.1", "-l", str(tmp_path)])
    assert done.returncode == 1, done
    err = done.stderr.decode()
    assert len(err.splitlines()) == 1 and str(tmp_path) in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("style", [(), ("-j",)], ids=["plain", "json"])
def test_log_on_full_device_exits_1(spawn_child, style):
    child = spawn_child()  # a row to write even where there is no header
    done = run_once([*style, "-i", "0.1", "--pid", child.pid, "-l", "/dev/full"])
    assert done.returncode == 1, done
    err = done.stderr.decode()
    assert len(err.splitlines()) == 1, err
    assert "/dev/full" in err and "No space left on device" in err, err
    assert "Traceback" not in err


def test_version():
    done = run_once(["-v"])
    assert done.returncode == 0
    assert done.stdout.decode() == f"histstat {histstat.__version__}\n"
    assert done.stderr == b""


# --------------------------------------------------------------------------- 8. --hash


def test_hash_json_has_exe_and_hashes(spawn_child, run_histstat):
    child = spawn_child()
    exe = os.readlink(f"/proc/{child.pid}/exe")
    assert exe == os.path.realpath(sys.executable)
    md5, sha256 = file_hashes(exe)
    hs = run_histstat("-j", "--hash", *INTERVAL, "--pid", child.pid)
    hs.wait_for_child(child)
    result = hs.stop()
    assert_clean_end(result)
    rows = result.rows_of(child.pid)
    assert_exactly_child_connections(rows, child)
    for row in rows:
        assert list(row)[-6:] == ["exe", "md5", "sha256", "command", "command_length", "timestamp"]
        assert (row["exe"], row["md5"], row["sha256"]) == (exe, md5, sha256)


def test_hash_text_columns(spawn_child, run_histstat):
    child = spawn_child()
    md5, sha256 = file_hashes(f"/proc/{child.pid}/exe")
    hs = run_histstat("--hash", *INTERVAL, "--pid", child.pid)
    hs.wait_for_child(child)
    result = hs.stop()
    assert_clean_end(result)
    assert result.lines[0] == "\t".join(HASH_COLUMNS)
    rows = result.rows_of(child.pid)
    assert_exactly_child_connections(rows, child)
    for row in rows:
        assert (row["md5"], row["sha256"], row["command"]) == (md5, sha256, child.command)


def test_hash_of_deleted_executable(spawn_child, run_histstat, tmp_path):
    copy = os.path.realpath(tmp_path / "python-copy")
    shutil.copyfile(os.path.realpath(sys.executable), copy)
    os.chmod(copy, 0o755)
    child = spawn_child(executable=copy, env=copied_interpreter_env())
    assert os.readlink(f"/proc/{child.pid}/exe") == copy
    md5, sha256 = file_hashes(copy)
    os.unlink(copy)
    assert os.readlink(f"/proc/{child.pid}/exe") == copy + " (deleted)"
    hs = run_histstat("-j", "--hash", *INTERVAL, "--pid", child.pid)
    hs.wait_for_child(child)
    result = hs.stop()
    assert_clean_end(result)
    rows = result.rows_of(child.pid)
    assert_exactly_child_connections(rows, child)
    for row in rows:
        assert row["exe"] == copy + " (deleted)"
        assert (row["md5"], row["sha256"]) == (md5, sha256)
        assert row["command"] == child.command


def test_huge_executable_cannot_hold_back_rows_or_exit(spawn_child, run_histstat, tmp_path):
    """A hostile process runs from a file too big to hash in time: its rows still come,
    with hashes unknown, and SIGTERM ends histstat promptly."""
    huge = os.path.realpath(tmp_path / "python-huge")
    shutil.copyfile(os.path.realpath(sys.executable), huge)
    with open(huge, "r+b") as handle:
        handle.truncate(32 << 30)  # sparse: 32 GiB to read, no disk used
    os.chmod(huge, 0o755)
    slow = spawn_child(executable=huge, env=copied_interpreter_env())
    normal = spawn_child()
    hs = run_histstat("-j", "--hash", *INTERVAL, "--pid", f"{slow.pid},{normal.pid}")
    slow_rows = hs.wait_for_child(slow, timeout=MAX_HASH_WAIT + 10)
    hs.wait_for_child(normal)
    assert all(row["md5"] is None and row["sha256"] is None for row in slow_rows)
    started = time.monotonic()
    result = hs.stop()
    assert time.monotonic() - started < 5
    assert_clean_end(result)
    assert all(row["md5"] for row in result.rows_of(normal.pid))

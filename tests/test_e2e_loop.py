"""End-to-end: the poll loop on a hostile or failing host (issue 14): a reader that stops
reading while a signal comes, a database another connection keeps locked, a process out
of file descriptors, and histstat itself stopped (SIGSTOP).

The installed histstat runs against real loopback sockets held by real child processes.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from support.children import copied_interpreter_env, waits_on_full_pipe
from support.histstat import connection_key, histstat_command, locale_env
from support.waiting import STOP_TIMEOUT, wait_for

INTERVAL = ("-i", "0.1")
UTF8_ENV = locale_env("C.UTF-8")
# A command line of 200 KB, in two arguments (the kernel takes at most 128 KiB in one):
# each of the child's rows is several times what a pipe holds.
LONG_ARGUMENTS = ("y" * 100_000, "z" * 100_000)
# SIGTERM's grace for the row being written is about a second; the bound leaves room
# for a busy machine, and is far below "never".
END_BOUND = 6.0


def read_until_eof(fd: int, timeout: float) -> bytes:
    """Everything a pipe gives until its writers are gone, bounded by a deadline."""
    deadline = time.monotonic() + timeout
    data = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"the pipe did not reach its end within {timeout:g} s")
        if select.select([fd], [], [], remaining)[0]:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return bytes(data)
            data += chunk


def whole_rows_and_rest(data: bytes) -> tuple:
    """(the complete lines as JSON rows, what follows the last newline); fails on any
    complete line that is not one JSON row, such as a row glued to a cut one."""
    *lines, rest = data.split(b"\n")
    rows = []
    for number, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            pytest.fail(f"line {number} is not one JSON row: {line[:80]!r}...{line[-80:]!r}")
    return rows, rest


# --------------------------------------------------------------------------- a signal


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("reader", ["reads-on", "never-reads"])
def test_a_signal_during_a_stalled_write_never_glues_rows(spawn_child, tmp_path, signum, reader):
    """A 200 KB row blocked on a pipe nobody reads, then a signal: histstat ends with 0,
    and what the pipe holds is whole JSON rows, at most followed by the start of one cut
    row. A reader that reads on after the signal gets every row whole."""
    child = spawn_child(*LONG_ARGUMENTS)
    read_end, write_end = os.pipe()
    probe = os.dup(write_end)  # tells when the pipe is full; closed before reading it
    err_path = tmp_path / "stderr.txt"
    # --command-limit 0: rows of 200 KB, each several times what a pipe holds.
    argv = [histstat_command(), "-j", *INTERVAL, "--command-limit", "0", "--pid", str(child.pid)]
    try:
        with open(err_path, "wb") as err:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=write_end,
                stderr=err,
                env=UTF8_ENV,
                # histstat leaves an ignored SIGINT alone, as a background job expects;
                # pytest itself may run as one (nohup, a CI script's job).
                preexec_fn=_default_sigint,
            )
        os.close(write_end)
        try:
            wait_for(
                lambda: waits_on_full_pipe(proc.pid, probe),
                describe=lambda: f"histstat waiting on a full pipe\n{err_path.read_text()}",
            )
            proc.send_signal(signum)
            signalled = time.monotonic()
            os.close(probe)
            probe = -1
            if reader == "reads-on":
                data = read_until_eof(read_end, END_BOUND)
            try:
                code = proc.wait(END_BOUND)
            except subprocess.TimeoutExpired:
                pytest.fail(f"histstat still runs {END_BOUND:g} s after the signal")
            took = time.monotonic() - signalled
            if reader == "never-reads":
                data = read_until_eof(read_end, STOP_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(STOP_TIMEOUT)
    finally:
        os.close(read_end)
        if probe >= 0:
            os.close(probe)
    stderr = err_path.read_text(errors="replace")
    assert code == 0, stderr
    assert "Traceback" not in stderr
    assert took < END_BOUND
    rows, rest = whole_rows_and_rest(data)
    for row in rows:
        assert (row["pid"], row["command"]) == (child.pid, child.command)
    if reader == "reads-on":
        assert rows and rest == b""  # the row in flight was finished, nothing was cut
        assert {connection_key(row) for row in rows} <= child.connections()
    else:
        assert rest.startswith(b'{"event": ')  # the cut row, and nothing after it


def test_sigterm_ends_an_idle_loop_at_once(spawn_child, run_histstat):
    """Asleep between two polls a minute apart: SIGTERM ends histstat long before."""
    child = spawn_child()
    hs = run_histstat("-j", "-i", "60", "--pid", child.pid, env=UTF8_ENV)
    hs.wait_for_child(child)
    result = hs.stop(timeout=STOP_TIMEOUT)  # fails unless it ends within the bound
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


# --------------------------------------------------------------------------- a lock


def stored_rows(path) -> list:
    """Every row of the connections table, read by a connection of our own that never
    waits for a lock (WAL readers need none)."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0)
    except sqlite3.OperationalError:
        return []  # not created yet
    try:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute("SELECT * FROM connections")]
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    finally:
        db.close()


def logged_rows(path, child) -> list:
    """The child's rows in a JSON log, once all its connections are there."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_bytes().split(b"\n")[:-1]]
    rows = [row for row in rows if row["pid"] == child.pid]
    return rows if {connection_key(row) for row in rows} >= child.connections() else []


def hold_the_lock(path) -> sqlite3.Connection:
    """Another connection holding the database's write lock (BEGIN IMMEDIATE)."""
    holder = sqlite3.connect(path, isolation_level=None, timeout=STOP_TIMEOUT)
    holder.execute("BEGIN IMMEDIATE")
    return holder


def identity(row: dict) -> tuple:
    return (row["timestamp"], connection_key(row))


def test_a_held_database_lock_holds_rows_and_never_ends_the_capture(
    spawn_child, run_histstat, tmp_path
):
    """Another connection holds BEGIN IMMEDIATE for more than 5 s: histstat keeps
    polling, says so, logs on, shows on stdout no row that the database does not have,
    and writes the rows through once the lock is released."""
    db, log = tmp_path / "h.db", tmp_path / "h.json"
    comm = f"hs-lock-{os.getpid() % 10000}"  # both children: only their rows are read
    first = spawn_child(comm=comm)
    hs = run_histstat(
        "-j", *INTERVAL, "--sqlite", db, "-l", log, "--name", comm, env=UTF8_ENV
    )  # fmt: skip
    shown_before_saved: list = []

    def stdout_only_shows_saved_rows() -> None:
        shown = {identity(row) for row in hs.rows()}  # stdout first, then the database
        stored = {identity(row) for row in stored_rows(db)}
        shown_before_saved.extend(shown - stored)

    hs.wait_for_child(first)
    stdout_only_shows_saved_rows()
    holder = hold_the_lock(db)
    try:
        locked_at = time.monotonic()
        second = spawn_child(comm=comm)  # its rows come while the lock is held
        hs.until(lambda: logged_rows(log, second), what="the second child's rows in the log")
        hs.until(lambda: "is locked by another connection" in hs.stderr(), what="lock notice")
        while time.monotonic() - locked_at < 5.5:  # the workload: a lock held past 5 s
            stdout_only_shows_saved_rows()
            assert hs.proc.poll() is None, hs.describe()
            assert hs.rows_of(second.pid) == []  # held back: the database lacks them
            time.sleep(0.1)
        assert not [row for row in stored_rows(db) if row["pid"] == second.pid]
    finally:
        holder.rollback()
        holder.close()
    hs.wait_for_child(second)
    stdout_only_shows_saved_rows()
    hs.until(lambda: "is free again" in hs.stderr(), what="release notice")
    result = hs.stop()
    assert result.returncode == 0, result.stderr
    assert shown_before_saved == []
    saved = [row for row in stored_rows(db) if row["pid"] == second.pid]
    assert {identity(row) for row in saved} == {identity(row) for row in result.rows_of(second.pid)}
    assert {connection_key(row) for row in saved} == second.connections()
    notices = result.stderr.splitlines()
    assert len([line for line in notices if "is locked" in line]) == 1, result.stderr
    (freed,) = [line for line in notices if "is free again" in line]
    waited = int(re.search(r"writing the (\d+) rows? that waited", freed).group(1))
    assert waited >= len(second.connections()), freed


def test_a_lock_still_held_at_the_end_is_one_line_and_exit_1(spawn_child, run_histstat, tmp_path):
    """Rows found while the lock is held, then SIGTERM before it is released: the
    database never gets them, and histstat says so and exits 1 (the log has them)."""
    db, log = tmp_path / "h.db", tmp_path / "h.json"
    comm = f"hs-end-{os.getpid() % 10000}"
    first = spawn_child(comm=comm)
    hs = run_histstat("-q", "-j", *INTERVAL, "--sqlite", db, "-l", log, "--name", comm)
    hs.until(lambda: logged_rows(log, first), what="the first child's rows in the log")
    holder = hold_the_lock(db)
    try:
        second = spawn_child(comm=comm)
        hs.until(lambda: logged_rows(log, second), what="the second child's rows in the log")
        result = hs.stop()
    finally:
        holder.rollback()
        holder.close()
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert "is still locked by another connection" in last, last
    assert "were not saved to it (the log has every row)" in last, last  # -q: no stdout
    assert not [row for row in stored_rows(db) if row["pid"] == second.pid]


# --------------------------------------------------------------------------- descriptors


def with_descriptor_limit(limit: int) -> tuple:
    """A Histstat prefix: bash lowers the open-files limit, then becomes histstat."""
    return ("bash", "-c", f'ulimit -n {limit} && exec "$0" "$@"')


def shortage_notices(stderr: str) -> list:
    return [line for line in stderr.splitlines() if "lack of file descriptors" in line]


def test_socket_owners_unreadable_for_lack_of_descriptors_are_reported(spawn_child, run_histstat):
    """At ulimit -n 5 the Linux source has the standard streams and its netlink socket,
    but no descriptor to list a process's descriptors with: every socket loses its pid.
    That must be said on stderr, not pass for sockets that nobody owns."""
    child = spawn_child()
    limit = with_descriptor_limit(5)
    hs = run_histstat("-j", *INTERVAL, "--source", "linux", "--lport", child.lport, prefix=limit)
    hs.until(lambda: shortage_notices(hs.stderr()), what="the descriptor notice")
    rows = hs.wait_for_rows(lambda row: row["lport"] == child.lport, count=2)
    result = hs.stop()
    assert result.returncode == 0, result.stderr
    assert all(row["pid"] is None for row in rows)  # what the notice explains
    (first, *_) = shortage_notices(result.stderr)
    assert re.match(r"histstat: \d+ reads? of process facts", first), first
    assert "ulimit -n is 5" in first


@pytest.mark.parametrize("source", ["linux", "psutil"])
def test_hashing_many_huge_executables_out_of_descriptors_is_reported(
    spawn_child, run_histstat, tmp_path, source
):
    """--hash keeps each executable open until it is hashed: eight processes running
    from eight huge (sparse) files exhaust ulimit -n 8, and the facts and hashes that
    could not be read are counted on stderr. psutil then cannot even list the sockets:
    those polls are lost, said so, and histstat goes on."""
    env = copied_interpreter_env()
    children = []
    for number in range(8):
        huge = os.path.realpath(tmp_path / f"python-huge-{number}")
        shutil.copyfile(os.path.realpath(sys.executable), huge)
        with open(huge, "r+b") as handle:
            handle.truncate(32 << 30)  # sparse: 32 GiB to read, no disk used
        os.chmod(huge, 0o755)
        children.append(spawn_child(executable=huge, env=env))
    pids = ",".join(str(child.pid) for child in children)
    hs = run_histstat(
        "-j", "--hash", *INTERVAL, "--source", source, "--pid", pids,
        prefix=with_descriptor_limit(8),
    )  # fmt: skip
    hs.until(lambda: shortage_notices(hs.stderr()), what="the descriptor notice")
    result = hs.stop()
    assert result.returncode == 0, result.stderr
    first, *later = shortage_notices(result.stderr)  # at once, then summed up at the end
    assert int(re.match(r"histstat: (\d+) reads? of process facts", first).group(1)) > 0
    assert len(later) <= 1
    assert all(
        re.match(r"histstat: \d+ more reads? .* since the last notice", line) for line in later
    )


# --------------------------------------------------------------------------- SIGSTOP


def seconds_behind(notice: str) -> float:
    """The seconds a stall notice says the loop lost: one stall's, or several summed."""
    found = re.search(r"fell ([\d.]+) s behind", notice) or re.search(r"([\d.]+) s in all", notice)
    return float(found.group(1)) if found else 0.0


def test_histstat_stopped_for_a_while_says_what_it_may_have_missed(spawn_child, run_histstat):
    """SIGSTOP, then SIGCONT a second later: ten intervals passed unpolled."""
    child = spawn_child()
    hs = run_histstat("-j", *INTERVAL, "--pid", child.pid, env=UTF8_ENV)
    hs.wait_for_child(child)
    hs.send(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        time.sleep(1.0)  # the workload: histstat stopped for a second
    finally:
        hs.send(signal.SIGCONT)
    gap = time.monotonic() - stopped
    hs.until(lambda: "behind its 0.1 s interval" in hs.stderr(), what="the stall notice")
    result = hs.stop()
    assert result.returncode == 0, result.stderr
    stalls = [line for line in result.stderr.splitlines() if "behind its 0.1 s interval" in line]
    # At most one notice a minute, and what was not told yet at the end: a busy machine
    # may add short stalls of its own, summed up with this one.
    assert 1 <= len(stalls) <= 2, result.stderr
    assert max(map(seconds_behind, stalls)) >= gap - 0.5, result.stderr
    assert all("connections that opened and closed meanwhile" in line for line in stalls)


# --------------------------------------------------------------------------- a stalled reader


class UnreadStdout:
    """The installed histstat with stdout a pipe nobody reads (until ``read_rest``) and
    stderr a file."""

    def __init__(self, tmp_path, *args):
        self.read_end, write_end = os.pipe()
        self.probe = os.dup(write_end)  # tells when the pipe is full
        self.err_path = tmp_path / "stderr.txt"
        argv = [histstat_command(), "-j", "--command-limit", "0", *map(str, args)]
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=write_end, stderr=err, env=UTF8_ENV
            )
        os.close(write_end)

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def until(self, predicate, what: str) -> None:
        def holds():
            assert self.proc.poll() is None, f"histstat ended: {self.stderr()}"
            return predicate()

        wait_for(holds, describe=lambda: f"{what}\n{self.stderr()}")

    def full(self) -> bool:
        return waits_on_full_pipe(self.proc.pid, self.probe)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"histstat still runs {timeout:g} s later\n{self.stderr()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)
        for fd in (self.read_end, self.probe):
            if fd >= 0:
                os.close(fd)
        self.read_end = self.probe = -1


def test_a_reader_that_stops_reading_never_stops_the_capture_for_the_log(spawn_child, tmp_path):
    """200 KB rows to a pipe nobody reads, with -l: connections opened after stdout
    stalled still reach the log, stderr says stdout is not read; after SIGTERM a reader
    that reads at last gets whole rows, none twice, and the log ends with whole rows."""
    log = tmp_path / "h.json"
    comm = f"hs-stall-{os.getpid() % 10000}"
    first = spawn_child(*LONG_ARGUMENTS, comm=comm)
    hs = UnreadStdout(tmp_path, *INTERVAL, "-l", log, "--name", comm)
    try:
        hs.until(lambda: logged_rows(log, first) and hs.full(), what="stdout full")
        hs.until(lambda: "stdout is not being read" in hs.stderr(), what="the stall notice")
        second = spawn_child(comm=comm)  # after the stall
        hs.until(lambda: logged_rows(log, second), what="the second child's rows in the log")
        hs.proc.send_signal(signal.SIGTERM)
        os.close(hs.probe)
        hs.probe = -1
        data = read_until_eof(hs.read_end, END_BOUND)  # read at last, after the signal
        code = hs.wait(END_BOUND)
    finally:
        hs.close()
    stderr = hs.err_path.read_text(errors="replace")
    assert code == 0, stderr
    assert "Traceback" not in stderr
    (notice,) = [line for line in stderr.splitlines() if "stdout is not being read" in line]
    assert "the log or database gets every row" in notice
    rows, rest = whole_rows_and_rest(data)
    assert rows and rest == b""  # the row cut by the stall was finished, nothing glued
    assert len({identity(row) for row in rows}) == len(rows)  # none written twice
    logged, log_rest = whole_rows_and_rest(log.read_bytes())
    assert log_rest == b""
    assert {identity(row) for row in rows} <= {identity(row) for row in logged}
    assert {connection_key(row) for row in logged if row["pid"] == second.pid} == (
        second.connections()
    )


def test_duration_ends_even_when_stdout_is_not_read(spawn_child, tmp_path):
    """--duration 2 into a pipe nobody reads: histstat ends soon after, with 0."""
    child = spawn_child(*LONG_ARGUMENTS)
    hs = UnreadStdout(tmp_path, *INTERVAL, "--duration", "2", "--pid", child.pid)
    try:
        code = hs.wait(2 + END_BOUND)
    finally:
        hs.close()
    stderr = hs.stderr()
    assert code == 0, stderr
    assert "Traceback" not in stderr


def test_a_stall_in_the_first_iteration_is_reported(spawn_child, tmp_path):
    """histstat stopped while it writes its first poll's rows: the stall is said."""
    child = spawn_child(*LONG_ARGUMENTS)
    hs = UnreadStdout(tmp_path, "-i", "1", "--pid", child.pid)
    try:
        hs.until(hs.full, what="histstat waiting on a full pipe")
        hs.proc.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        wait_for(lambda: time.monotonic() - stopped >= 4, timeout=10)  # the stall itself
        hs.proc.send_signal(signal.SIGCONT)
        hs.until(lambda: "behind its 1 s interval" in hs.stderr(), what="the stall notice")
        hs.proc.send_signal(signal.SIGTERM)
        code = hs.wait(END_BOUND)
    finally:
        hs.close()
    assert code == 0, hs.stderr()

"""End-to-end: processes that attack histstat through their name and command line.

Issue 14: a process with a 1 MB command line of control characters holding many loopback
connections made `histstat --once` take 39 s and 350 MiB and blinded live capture; names
with invisible characters passed for other names; CR in arguments came out as LF.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
from typing import NamedTuple

import pytest

from histstat.enrich import COMMAND_LIMIT, COMMAND_MARKER
from support.children import ATTACKER_ARGUMENTS, ATTACKER_COMM, end_child, one_line_script
from support.contract import COLUMNS
from support.histstat import histstat_command, locale_env
from support.waiting import DEFAULT_TIMEOUT, STOP_TIMEOUT, read_line, wait_for

UTF8_ENV = locale_env("C.UTF-8")
INTERVAL = ("-i", "0.1")
ATTACKER_PAIRS = 30
# Peak memory histstat may use for one poll of the attacker's 61 rows. Before the command
# line was cut, it took 350 MiB; a histstat that shows nothing takes about 25 MiB.
MEMORY_BOUND = 128 << 20
# The csv module refuses fields over 128 KiB by default; a command line may be longer.
csv.field_size_limit(1 << 30)


def cut(command: str, limit: int = COMMAND_LIMIT) -> str:
    """The command as --command-limit shows it, written out from the documented rule."""
    return command[:limit] + f"...[+{len(command) - limit} chars]"


def escaped(text: str) -> str:
    """What the text formats show of the attacker's command line (controls as \\xNN)."""
    return text.replace("\x01", "\\x01")


class Measured(NamedTuple):
    returncode: int
    stdout: bytes
    stderr: str
    peak_rss: int  # bytes


# Runs the command as a child of its own and writes "exit code, peak RSS in KiB" to a
# file. A process's ru_maxrss keeps the high-water mark of the memory image it replaced
# at exec, and subprocess forks (vforks) from pytest, whose own peak grows test by test:
# measured straight from pytest, histstat's peak read as pytest's (130, 208 MiB late in a
# full run). Forked from this small interpreter instead, it starts from a few MiB.
MEASURER = """
import os, sys
report, argv = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    os.execv(argv[0], argv)
_, status, usage = os.wait4(pid, 0)
with open(report, "w") as out:
    out.write(f"{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}")
"""


def run_measured(args, tmp_path, timeout: float = 60.0) -> Measured:
    """Run histstat to its end with its output in files; its peak memory from the kernel."""
    out_path, err_path = tmp_path / "stdout", tmp_path / "stderr"
    report = tmp_path / "measured"
    command = [histstat_command(), *map(str, args)]
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", MEASURER, str(report), *command],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=UTF8_ENV,
            start_new_session=True,  # histstat with it, should it have to be killed
        )
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"histstat {args} did not end within {timeout:g} s")
    returncode, peak_kib = map(int, report.read_text().split())
    proc.returncode = returncode
    return Measured(
        returncode,
        out_path.read_bytes(),
        err_path.read_text(errors="replace"),
        peak_kib * 1024,  # KiB on Linux
    )


@pytest.fixture
def attacker(hold_connections):
    """The attacker of the issue: 30 loopback connections (61 sockets with the listener),
    its name a byte that is not UTF-8 and 'sshd', 9 arguments of 120,000 \\x01."""
    return hold_connections(ATTACKER_PAIRS, *ATTACKER_ARGUMENTS, comm=ATTACKER_COMM)


def only(attacker) -> list:
    """Filters for the attacker's sockets: its port alone could also match another
    process's socket that happens to use the same number (UDP, or TIME_WAIT)."""
    return ["--pid", attacker.pid, "--port", attacker.port]


def attacker_sockets(attacker) -> int:
    return 2 * attacker.pairs + 1


# --------------------------------------------------------------------------- 1. --once


@pytest.mark.parametrize("style", ["plain", "json", "csv"])
def test_once_with_a_megabyte_command_line_gives_every_row_cut_and_bounded(
    attacker, tmp_path, style
):
    options = {"plain": (), "json": ("-j",), "csv": ("--csv",)}[style]
    done = run_measured(["--once", *options, *only(attacker)], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    whole = attacker.command
    assert len(whole) > 1_000_000
    shown = cut(whole)
    assert shown.endswith(COMMAND_MARKER.format(removed=len(whole) - COMMAND_LIMIT))
    text = done.stdout.decode("utf-8")  # strict: every format is valid UTF-8
    if style == "json":
        rows = [json.loads(line) for line in text.splitlines()]
        for row in rows:
            assert row["command"] == shown
            assert row["command_length"] == len(whole)
            assert row["pname"] == "\\xffsshd"  # the byte that is not UTF-8, as text
    else:
        if style == "csv":
            header, *records = csv.reader(io.StringIO(text, newline=""))
        else:
            header, *records = (line.split("\t") for line in text.splitlines())
        assert header == list(COLUMNS)
        rows = [dict(zip(header, record)) for record in records]
        for row in rows:
            assert row["command"] == escaped(shown)
            assert row["pname"] == "\\xffsshd"
    assert len(rows) == attacker_sockets(attacker)
    assert {int(row["pid"]) for row in rows} == {attacker.pid}
    assert done.peak_rss < MEMORY_BOUND, f"peak RSS {done.peak_rss / 2**20:.0f} MiB"


def test_command_limit_chooses_the_cut_and_zero_keeps_everything(attacker, tmp_path):
    listener = ["--once", "-j", *only(attacker), "--status", "LISTEN"]
    whole = attacker.command
    for limit, shown in ((100, cut(whole, 100)), (0, whole)):
        done = run_measured([*listener, "--command-limit", limit], tmp_path)
        assert done.returncode == 0, done.stderr
        (row,) = map(json.loads, done.stdout.splitlines())
        assert (row["command"], row["command_length"]) == (shown, len(whole))


def test_sqlite_stores_the_same_cut_command_and_its_length(attacker, tmp_path):
    db = tmp_path / "h.db"
    done = run_measured(["--once", "-q", *only(attacker), "--sqlite", db], tmp_path)
    assert done.returncode == 0, done.stderr
    whole = attacker.command
    with sqlite3.connect(db) as check:
        stored = check.execute("SELECT pid, pname, command, command_length FROM connections")
        rows = stored.fetchall()
    assert rows == [(attacker.pid, "\\xffsshd", cut(whole), len(whole))] * attacker_sockets(
        attacker
    )


# --------------------------------------------------------------------------- 2. live

# The victim: a listener, then, once told "go" on its stdin, COUNT connections to it, one
# every GAP seconds, each held HOLD seconds; it prints each client port, then "done".
VICTIM_SOURCE = """
import collections, socket, sys, time

count, gap, hold = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(64)
print("ready", flush=True)
sys.stdin.readline()
held = collections.deque()
for _ in range(count):
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    print(client.getsockname()[1], flush=True)
    held.append((time.monotonic() + hold, client, accepted))
    while held and held[0][0] <= time.monotonic():
        for end in held.popleft()[1:]:
            end.close()
    time.sleep(gap)
while held:
    time.sleep(max(0.0, held[0][0] - time.monotonic()))
    for end in held.popleft()[1:]:
        end.close()
print("done", flush=True)
sys.stdin.readline()
"""
VICTIM_CONNECTIONS = 20
VICTIM_GAP = 0.2  # seconds between two of its connections
VICTIM_HOLD = 0.8  # seconds each lives: many polls at -i 0.05, on a busy machine too


class LogTail:
    """The complete rows of a growing plain-text log, read as they come: the victim's
    rows kept, the attacker's counted (each is 260 KB)."""

    def __init__(self, path, victim_pid: int, attacker_pid: int) -> None:
        self.path = path
        self.victim, self.attacker = str(victim_pid), str(attacker_pid)
        self.offset = 0
        self.victim_rows: list = []
        self.attacker_rows = 0
        self.attacker_commands: set = set()

    def read(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.decode("utf-8").splitlines():
            cells = dict(zip(COLUMNS, line.split("\t")))
            if cells["pid"] == self.victim:
                self.victim_rows.append(cells)
            elif cells["pid"] == self.attacker:
                self.attacker_rows += 1
                self.attacker_commands.add(cells["command"])

    def victim_ports(self) -> set:
        ends = (row[end] for row in self.victim_rows for end in ("lport", "rport"))
        return {int(port) for port in ends if port != "*"}


def vm_peak_rss(pid: int) -> int:
    """A running process's peak resident memory (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def test_a_victim_is_seen_whole_while_the_attacker_churns(hold_connections, run_histstat, tmp_path):
    # The attacker replaces a connection every 0.2 s: each poll has new rows of it.
    attacker = hold_connections(ATTACKER_PAIRS, *ATTACKER_ARGUMENTS, comm=ATTACKER_COMM, churn=0.2)
    victim = subprocess.Popen(
        [sys.executable, "-c", one_line_script(VICTIM_SOURCE), str(VICTIM_CONNECTIONS),
         str(VICTIM_GAP), str(VICTIM_HOLD)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert read_line(victim.stdout) == b"ready\n"
        log = tmp_path / "rows.log"
        hs = run_histstat(
            "-q", "-i", "0.05", "--pid", f"{victim.pid},{attacker.pid}", "-l", log, env=UTF8_ENV
        )
        tail = LogTail(log, victim.pid, attacker.pid)

        def first_poll_written() -> bool:
            tail.read()
            return tail.attacker_rows >= attacker_sockets(attacker)

        hs.until(first_poll_written, what="the attacker's rows of the first poll")
        victim.stdin.write(b"go\n")
        victim.stdin.flush()
        ports = []
        while True:
            line = read_line(victim.stdout, DEFAULT_TIMEOUT).strip()
            if line == b"done":
                break
            ports.append(int(line))
            tail.read()

        def every_victim_connection_seen() -> bool:
            tail.read()
            return set(ports) <= tail.victim_ports()

        wait_for(
            every_victim_connection_seen,
            describe=lambda: (
                f"victim connections seen: {len(set(ports) & tail.victim_ports())} of "
                f"{len(ports)}; attacker rows: {tail.attacker_rows}\n{hs.describe(tail=0)}"
            ),
        )
        peak = vm_peak_rss(hs.proc.pid)
        result = hs.stop()
    finally:
        end_child(victim, STOP_TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert len(ports) == VICTIM_CONNECTIONS
    # The attacker kept histstat busy: new rows of it came all along, each cut.
    assert tail.attacker_rows >= attacker_sockets(attacker) + VICTIM_CONNECTIONS
    assert tail.attacker_commands == {escaped(cut(attacker.command))}
    assert peak < MEMORY_BOUND, f"peak RSS {peak / 2**20:.0f} MiB"


# --------------------------------------------------------------------------- 3. fidelity


def test_carriage_returns_in_arguments_are_kept(spawn_child, run_histstat):
    child = spawn_child("cr\rhere", "crlf\r\nthere")
    js = run_histstat("-j", *INTERVAL, "--pid", child.pid)
    text = run_histstat(*INTERVAL, "--pid", child.pid)
    json_rows, text_rows = js.wait_for_child(child), text.wait_for_child(child)
    for histstat in (js, text):
        assert histstat.stop().returncode == 0
    assert child.command.endswith(" cr\rhere crlf\r\nthere")
    assert {row["command"] for row in json_rows} == {child.command}
    shown = child.command.replace("\r", "\\r").replace("\n", "\\n")
    assert {row["command"] for row in text_rows} == {shown}
    assert {row["command_length"] for row in json_rows} == {len(child.command)}


@pytest.mark.parametrize("style", ["plain", "pretty", "json", "csv"])
def test_an_empty_process_name_is_not_shown_as_unknown(spawn_child, run_histstat, style):
    child = spawn_child(comm=b"")
    with open(f"/proc/{child.pid}/comm", "rb") as comm:
        assert comm.read() == b"\n"
    options = {"plain": (), "pretty": ("-p",), "json": ("-j",), "csv": ("--csv",)}[style]
    hs = run_histstat(*options, "--once", "--pid", child.pid, "-f", "pid,pname,user")
    result = hs.wait()
    assert result.returncode == 0, result.stderr
    if style == "json":
        rows = result.rows
        assert {row["pname"] for row in rows} == {""}
    else:
        records = list(csv.reader(result.lines)) if style == "csv" else None
        if records is not None:
            rows = [dict(zip(records[0], record)) for record in records[1:]]
        else:
            rows = result.rows
        assert {row["pname"] for row in rows} == {'""'}
    assert len(rows) == len(child.connections())


INVISIBLE_NAME = "ss\u034fhd"  # a combining grapheme joiner: looks like sshd
INVISIBLE_ARGS = ("\u3164", "v\ufe0f", "\u115f\u1160", "\U000e0100")
INVISIBLE_SHOWN = "\\u3164 v\\ufe0f \\u115f\\u1160 \\U000e0100"


@pytest.mark.parametrize("style", ["plain", "pretty", "json", "csv"])
def test_invisible_characters_are_escaped(spawn_child, run_histstat, style):
    child = spawn_child(*INVISIBLE_ARGS, comm=INVISIBLE_NAME)
    options = {"plain": (), "pretty": ("-p",), "json": ("-j",), "csv": ("--csv",)}[style]
    hs = run_histstat(*options, "--once", "--pid", child.pid, "-f", "pid,pname,command")
    result = hs.wait()
    assert result.returncode == 0, result.stderr
    for char in "\u034f\u3164\ufe0f\u115f\u1160\U000e0100":
        assert char.encode() not in result.stdout_bytes, repr(char)
    if style == "json":
        rows = result.rows
        assert {(row["pname"], row["command"]) for row in rows} == {(INVISIBLE_NAME, child.command)}
    else:
        if style == "csv":
            records = list(csv.reader(result.lines))
            rows = [dict(zip(records[0], record)) for record in records[1:]]
        else:
            rows = result.rows
        shown = " ".join(child.argv[: -len(INVISIBLE_ARGS)]) + " " + INVISIBLE_SHOWN
        assert {(row["pname"], row["command"]) for row in rows} == {("ss\\u034fhd", shown)}
    assert len(rows) == len(child.connections())

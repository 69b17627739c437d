"""End to end, as root: kernel connect events in histstat's stream (--kernel-events), with
the Linux source pinned, real children making loopback connections too short for any
poll, and the tracefs instance's life (SIGTERM, a stale one after SIGKILL)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from histstat.sources.tracefs import TEST_ROOT_VARIABLE, TracefsUnavailable, locate_tracefs
from support.children import end_child, new_tag, one_line_script
from support.histstat import Histstat, assert_clean_end, histstat_command, run_once
from support.tracing import BEACON, instances_of, ready
from support.waiting import DEFAULT_TIMEOUT, END_TIMEOUT, read_line, wait_for

LINUX = ("--source", "linux")
BEACONS = 10  # one every 0.3 s: about 3 s at the default interval


# A child that finds a closed port (bound, then closed: nothing listens), prints it,
# and on "go" connects to it five times, each refused.
REFUSED = """
import socket, sys
probe = socket.socket()
probe.bind(("127.0.0.1", 0))
port = probe.getsockname()[1]
probe.close()
print(port, flush=True)
sys.stdin.readline()
refused = 0
for _ in range(5):
    client = socket.socket()
    try:
        client.connect(("127.0.0.1", port))
    except ConnectionRefusedError:
        refused += 1
    client.close()
print(refused, flush=True)
sys.stdin.read()
"""


# The histstat processes this module started: the instances named after them are its
# own. Another histstat on the machine (another user's, a parallel test run) may create
# an instance at any moment, and it is none of this module's business.
STARTED: set[int] = set()


class Tracked(Histstat):
    """Histstat, its pid remembered in STARTED."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        STARTED.add(self.proc.pid)


@pytest.fixture
def tracefs_root():
    """Where tracefs is, mounted if it was not; fails (never skips) without root. At the
    end, no instance of a histstat the test started is left."""
    if os.geteuid() != 0:
        pytest.fail("kernel connect events need root: run the tests as root")
    try:
        root = locate_tracefs(environ={}).root
    except TracefsUnavailable as exc:
        pytest.fail(f"kernel connect events cannot be had here: {exc}")
    started_before = set(STARTED)
    yield root
    ours = STARTED - started_before
    left = [name for pid in ours for name in instances_of(root, pid)]
    assert not left, left


def start_child(source: str, *args, comm: str | bytes | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", one_line_script(source, comm), *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )


def child_command(child: subprocess.Popen) -> str:
    return " ".join(child.args)


def first_line(child: subprocess.Popen) -> str:
    return read_line(child.stdout).decode(errors="replace").strip()


def go(child: subprocess.Popen) -> str:
    child.stdin.write(b"go\n")
    child.stdin.flush()
    return read_line(child.stdout, DEFAULT_TIMEOUT).decode(errors="replace").strip()


def watching(port, *more) -> Histstat:
    """histstat with connect events, once its first poll showed the child's listener or
    ran (the instance is set up before the first poll)."""
    return Tracked(["-j", "--closed", *LINUX, "--port", port, *more])


def test_beacon_every_short_connection_is_attributed_with_its_command(tracefs_root):
    child = start_child(BEACON, BEACONS, 0.3, "stay")
    try:
        port = first_line(child)
        histstat = watching(port)
        try:
            histstat.wait_for_rows(lambda row: row["status"] == "LISTEN")
            ports = {int(p) for p in go(child).split()}
            assert len(ports) == BEACONS

            def opens():
                rows = {
                    row["lport"]: row
                    for row in histstat.rows()
                    if row["event"] == "open" and row["rport"] == int(port)
                }
                return rows if ports <= set(rows) else None

            rows = histstat.until(opens, what="an open row of every beacon")
            for client_port in ports:
                row = rows[client_port]
                assert row["pid"] == child.pid, row
                assert row["command"] == child_command(child), row
                assert row["attribution"] in ("connect", "socket"), row
            # At the default interval nearly none can be seen owned: the events did it.
            assert sum(rows[p]["attribution"] == "connect" for p in ports) >= BEACONS - 2
            # The accepted ends: the listener's owner, which accepted them.
            accepted = histstat.wait_for_rows(
                lambda row: row["event"] == "open" and row["rport"] in ports, count=BEACONS
            )
            for row in accepted:
                assert row["pid"] == child.pid, row
                assert row["attribution"] in ("listener", "socket"), row
            assert any(row["attribution"] == "listener" for row in accepted)
        finally:
            result = histstat.stop()
        assert_clean_end(result)
        assert instances_of(tracefs_root, histstat.proc.pid) == []
    finally:
        end_child(child)


def test_refused_connects_are_stories_attributed_to_their_process(tracefs_root):
    child = start_child(REFUSED)
    try:
        port = first_line(child)
        histstat = watching(port, "-i", "0.2")
        try:
            ready(histstat, tracefs_root)
            assert go(child) == "5"
            closes = histstat.wait_for_rows(
                lambda row: row["event"] == "close" and row["rport"] == int(port), count=5
            )
        finally:
            result = histstat.stop()
        assert_clean_end(result)
        rows = [row for row in result.rows if row["rport"] == int(port)]
        opens = [row for row in rows if row["event"] == "open"]
        assert len(opens) == 5 and len(closes) == 5, rows
        assert {row["lport"] for row in opens} == {row["lport"] for row in closes}
        for row in rows:
            assert row["status"] == "SYN_SENT", row
            assert row["pid"] == child.pid, row
            assert row["attribution"] == "connect", row
            assert row["pname"], row
    finally:
        end_child(child)


def one_connect(child: subprocess.Popen, exits: bool):
    """The open row of the one connection the beacon child makes (after it exited, when
    ``exits``), and histstat's result."""
    port = first_line(child)
    histstat = watching(port)
    try:
        histstat.wait_for_rows(lambda row: row["status"] == "LISTEN")
        go(child)
        if exits:
            child.wait(END_TIMEOUT)  # gone before any poll could see its connection
        (row,) = histstat.wait_for_rows(
            lambda row: row["event"] == "open" and row["rport"] == int(port)
        )
    finally:
        result = histstat.stop()
    assert_clean_end(result)
    return row, result


def test_process_that_exits_after_its_connection_keeps_pid_and_name(tracefs_root):
    tag = f"gone{new_tag()}"
    child = start_child(BEACON, 1, 0, "exit", comm=tag)
    try:
        row, _ = one_connect(child, exits=True)
        assert row["pid"] == child.pid, row
        assert row["pname"] == tag, row
        assert row["attribution"] == "connect", row
    finally:
        end_child(child)


def test_name_with_newline_and_escape_is_parsed_and_escaped(tracefs_root):
    name = "a\nb\x1b[31mc"
    child = start_child(BEACON, 1, 0, "stay", comm=name)
    try:
        row, result = one_connect(child, exits=False)
        assert row["attribution"] == "connect", row  # its event was parsed and joined
        assert row["pid"] == child.pid and row["pname"] == name, row
        assert b"\x1b" not in result.stdout_bytes
        assert all(json.loads(line) for line in result.lines)  # one row per line
    finally:
        end_child(child)


def test_instance_is_removed_after_sigterm_and_a_stale_one_at_next_start(tracefs_root):
    killed = Tracked([*LINUX, "--port", "1"])
    try:
        wait_for(lambda: instances_of(tracefs_root, killed.proc.pid), describe="the instance")
    finally:
        killed.kill()  # SIGKILL: its instance stays behind
    (stale,) = instances_of(tracefs_root, killed.proc.pid)
    histstat = Tracked([*LINUX, "--port", "1"])
    try:
        wait_for(lambda: instances_of(tracefs_root, histstat.proc.pid), describe="the instance")
        wait_for(
            lambda: stale not in os.listdir(os.path.join(tracefs_root, "instances")),
            describe=f"the stale instance {stale} removed",
        )
    finally:
        result = histstat.stop()  # SIGTERM
    assert_clean_end(result)
    assert instances_of(tracefs_root, histstat.proc.pid) == []


def test_unusable_tracefs_under_auto_says_so_once_and_polls_on(tmp_path):
    env = {**os.environ, TEST_ROOT_VARIABLE: str(tmp_path)}
    child = start_child(BEACON, 1, 0, "stay")
    try:
        port = first_line(child)
        histstat = Tracked(["-j", *LINUX, "--port", port, "-i", "0.1"], env=env)
        try:
            (row,) = histstat.wait_for_rows(lambda row: row["status"] == "LISTEN")
        finally:
            result = histstat.stop()
        assert_clean_end(result)
        assert row["pid"] == child.pid and row["attribution"] == "socket"
        notices = [line for line in result.stderr.splitlines() if "connect events" in line]
        assert len(notices) == 1, result.stderr
        assert str(tmp_path) in notices[0] and "unattributed" in notices[0]
    finally:
        end_child(child)


def test_unusable_tracefs_under_on_exits_1_with_one_line(tmp_path):
    env = {**os.environ, TEST_ROOT_VARIABLE: str(tmp_path)}
    result = run_once([*LINUX, "--kernel-events", "on", "--port", "1"], env=env)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.decode(errors="replace").splitlines()
    assert len(lines) == 1 and lines[0].startswith("histstat: "), lines
    assert str(tmp_path) in lines[0]
    assert result.stdout == b""  # not even a header: nothing ran blind


def test_kernel_events_on_with_psutil_is_a_usage_error():
    result = run_once(["--source", "psutil", "--kernel-events", "on", "--once"])
    assert result.returncode == 2
    assert b"--kernel-events on" in result.stderr


def test_kernel_events_off_is_polling_alone(tracefs_root):
    child = start_child(BEACON, 3, 0.1, "stay")
    try:
        port = first_line(child)
        histstat = Tracked(["-j", "--closed", *LINUX, "--kernel-events", "off", "--port", port,
                             "-i", "0.1"])  # fmt: skip
        try:
            histstat.wait_for_rows(lambda row: row["status"] == "LISTEN")
            assert instances_of(tracefs_root, histstat.proc.pid) == []
            ports = {int(p) for p in go(child).split()}
            closes = histstat.wait_for_rows(
                lambda row: row["event"] == "close" and row["lport"] in ports, count=len(ports)
            )
        finally:
            result = histstat.stop()
        assert_clean_end(result)
        assert "connect events" not in result.stderr
        for row in result.rows:
            assert row["attribution"] != "connect", row
        # No destroy events either: an end seen by polling carries no byte counts.
        for row in closes:
            assert row["bytes_sent"] is None and row["bytes_received"] is None, row
    finally:
        end_child(child)


# In a private mount namespace: unmount every tracefs at the standard place, say what is
# left there, then become histstat (argv[1:]).
UNMOUNTING_EXEC = """
import os, sys
from histstat.sources.tracefs import STANDARD_ROOT, mounted_filesystems, unmount_tracefs

def visible():
    with open("/proc/self/mountinfo", "rb") as info:
        return mounted_filesystems(info.read()).get(STANDARD_ROOT)

while visible() == "tracefs":
    unmount_tracefs(STANDARD_ROOT)
print("before:", visible(), flush=True)
os.execv(sys.argv[1], sys.argv[1:])
"""


def test_unmounted_tracefs_is_mounted_by_histstat(tracefs_root):
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.fail("this test needs unshare(1) (util-linux) for a private mount namespace")
    command = histstat_command()
    # unshare and python exec: the child's pid is histstat's, whose instance must go.
    child = subprocess.Popen(
        [unshare, "--mount", "--propagation", "private", sys.executable, "-c", UNMOUNTING_EXEC,
         command, "--source", "linux", "--kernel-events", "on", "--port", "1",
         "--duration", "0.5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    STARTED.add(child.pid)
    try:
        stdout, stderr_bytes = child.communicate(timeout=DEFAULT_TIMEOUT)
    finally:
        if child.poll() is None:  # it overran the timeout: it goes, and the test fails
            child.kill()
            child.communicate()
    stderr = stderr_bytes.decode(errors="replace")
    assert child.returncode == 0, stderr  # `on`: it had connect events, so it mounted
    assert stdout.startswith(b"before: ") and b"before: tracefs" not in stdout
    assert stderr == ""

"""Connect events through a private tracefs instance, end to end, as root: real child
processes making loopback connections, the instance's removal, stale instances, and
tracefs mounted when it is not (in a private mount namespace only)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from histstat.sources import tracefs
from histstat.sources.trace_lines import ConnectEvent
from histstat.sources.tracefs import (
    STANDARD_ROOT,
    TEST_ROOT_VARIABLE,
    ConnectEventReader,
    TracefsUnavailable,
    instance_name,
    locate_tracefs,
    mounted_filesystems,
    process_start_time,
    ring_buffer_losses,
    unmount_tracefs,
)
from support.children import end_child, one_line_script
from support.waiting import DEFAULT_TIMEOUT, END_TIMEOUT, read_line, wait_for

# A child that, for 127.0.0.1 and ::1 (when it can be bound), connects to a listener of
# its own and to a bound port that does not listen (refused: SYN_SENT→CLOSE), prints
# "family listener-port refused-port" per family on one line, and holds on until its
# stdin closes.
CONNECTING_CHILD = """
import socket
import sys

keep = []
printed = []
for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    try:
        listener = socket.socket(family)
        listener.bind((host, 0))
    except OSError:
        continue
    listener.listen(8)
    silent = socket.socket(family)
    silent.bind((host, 0))
    client = socket.socket(family)
    client.connect(listener.getsockname()[:2])
    accepted, _ = listener.accept()
    refused = socket.socket(family)
    try:
        refused.connect(silent.getsockname()[:2])
    except ConnectionRefusedError:
        pass
    keep += [listener, silent, client, accepted, refused]
    printed += [int(family), listener.getsockname()[1], silent.getsockname()[1]]
print(*printed, flush=True)
sys.stdin.buffer.read()
"""


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("connect events need root (tracefs); run the tests as root", pytrace=False)


@pytest.fixture(scope="module")
def tracefs_root():
    """The tracefs root, mounted if it was not (and then unmounted at the end)."""
    need_root()
    try:
        found = locate_tracefs()
    except TracefsUnavailable as exc:
        pytest.fail(f"these tests need a usable tracefs: {exc}", pytrace=False)
    yield found.root
    if found.mounted:
        try:
            unmount_tracefs(found.root)
        except OSError as exc:  # still in use by someone else: theirs now
            print(f"left tracefs mounted at {found.root}: {exc.strerror}", file=sys.stderr)


@pytest.fixture
def open_reader(tracefs_root):
    """Open ConnectEventReaders: ``open_reader(**kwargs)``; each one is closed, and its
    instance checked gone, when the test ends."""
    readers: list[ConnectEventReader] = []

    def start(**kwargs) -> ConnectEventReader:
        readers.append(ConnectEventReader(tracefs_root, **kwargs))
        return readers[-1]

    yield start
    for reader in readers:
        reason = reader.close()
        assert reason is None
        assert not os.path.exists(reader.directory)


class ConnectingChild:
    """A child making loopback connections (see CONNECTING_CHILD) under a chosen name."""

    def __init__(self, comm: bytes) -> None:
        self.comm = comm
        self.proc = subprocess.Popen(
            [sys.executable, "-c", one_line_script(CONNECTING_CHILD, comm)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.pid = self.proc.pid
        numbers = [int(word) for word in read_line(self.proc.stdout).split()]
        # family → (listener port, refused port)
        self.ports = {
            numbers[at]: (numbers[at + 1], numbers[at + 2]) for at in range(0, len(numbers), 3)
        }

    def stop(self) -> None:
        end_child(self.proc)
        self.proc.stdout.close()


@pytest.fixture
def connecting_child():
    children: list[ConnectingChild] = []

    def start(comm: bytes) -> ConnectingChild:
        children.append(ConnectingChild(comm))
        return children[-1]

    yield start
    for child in children:
        child.stop()


def thread_group(tid: int) -> int | None:
    """The tgid of thread ``tid`` from /proc, for events whose tgid the kernel lacked."""
    try:
        with open(f"/proc/{tid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def expected_events(child: ConnectingChild) -> set:
    """(family, transition, remote port) of every event the child's connects make."""
    expected = set()
    for family, (listener, refused) in child.ports.items():
        expected |= {
            (family, ("CLOSE", "SYN_SENT"), listener),
            (family, ("SYN_SENT", "ESTABLISHED"), listener),
            (family, ("CLOSE", "SYN_SENT"), refused),
            (family, ("SYN_SENT", "CLOSE"), refused),
        }
    return expected


def collect_child_events(reader: ConnectEventReader, child: ConnectingChild) -> list:
    """The reader's outbound events towards the child's ports, until all are there."""
    ports = {port for pair in child.ports.values() for port in pair}
    wanted = expected_events(child)
    found: list[ConnectEvent] = []

    def key(event: ConnectEvent) -> tuple:
        return (int(event.family), (event.oldstate, event.newstate), event.dport)

    def complete() -> bool:
        found.extend(event for event in reader.read(0.1) if event.dport in ports)
        return wanted <= {key(event) for event in found}

    wait_for(complete, describe=lambda: f"wanted {sorted(wanted)}\ngot {found}")
    return found


def test_connect_events_of_a_child_carry_its_pid_and_name(open_reader, connecting_child):
    reader = open_reader()
    comm = f"conn{uuid.uuid4().hex[:8]}".encode()
    child = connecting_child(comm)
    assert socket.AF_INET in child.ports
    events = collect_child_events(reader, child)
    connects = [event for event in events if event.oldstate == "CLOSE"]
    assert len(connects) == 2 * len(child.ports)
    for event in connects:  # connect() ran in the child's only thread
        assert event.tid == child.pid
        assert (event.tgid or thread_group(event.tid)) == child.pid
        assert event.name == comm.decode()
    for event in events:
        loopback = "127.0.0.1" if event.family == socket.AF_INET else "::1"
        assert (event.saddr, event.daddr) == (loopback, loopback)
        assert time.time() - 60 < event.time <= time.time()
    refused = [event for event in events if event.newstate == "CLOSE"]
    assert refused and all(event.sport != 0 for event in refused)


def test_name_with_newline_and_escape_is_parsed_right(open_reader, connecting_child):
    reader = open_reader()
    comm = b"\n" + uuid.uuid4().hex[:4].encode() + b"\x1b[31m(x)\n:"
    assert len(comm) <= 15
    child = connecting_child(comm)
    events = collect_child_events(reader, child)
    connects = [event for event in events if event.oldstate == "CLOSE"]
    assert connects
    for event in connects:
        assert event.tid == child.pid
        assert event.name == comm.decode()
    assert reader.unparsed_lines == 0


def test_read_does_bounded_work_per_call(open_reader, connecting_child):
    reader = open_reader(max_read_bytes=600)  # two or three lines a call
    child = connecting_child(b"bounded")
    ports = {port for pair in child.ports.values() for port in pair}
    calls: list[int] = []
    found: list[ConnectEvent] = []
    wanted = expected_events(child)

    def complete() -> bool:
        batch = reader.read(0.1)
        calls.append(len(batch))
        found.extend(event for event in batch if event.dport in ports)
        got = {(int(e.family), (e.oldstate, e.newstate), e.dport) for e in found}
        return wanted <= got

    wait_for(complete)
    assert max(calls) <= 3
    assert len([count for count in calls if count]) >= 3


def test_close_removes_the_instance_and_is_safe_twice(tracefs_root):
    reader = ConnectEventReader(tracefs_root)
    try:
        assert os.path.isdir(reader.directory)
        assert reader.name == instance_name(os.getpid(), process_start_time(os.getpid()))
        with open(os.path.join(reader.directory, "trace_clock")) as clock:
            assert "[mono]" in clock.read()
    finally:
        assert reader.close() is None
    assert not os.path.exists(reader.directory)
    assert reader.close() is None
    with pytest.raises(ValueError):
        reader.read()


# A child that connects to its own listener ``argv[1]`` times, as fast as it can.
FLOODING_CHILD = """
import socket
import sys

listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(64)
for _ in range(int(sys.argv[1])):
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    client.close()
    accepted.close()
"""


def test_instance_left_open_by_this_process_is_replaced_unless_in_use(tracefs_root):
    first = ConnectEventReader(tracefs_root)
    try:
        with pytest.raises(TracefsUnavailable, match="Device or resource busy"):
            ConnectEventReader(tracefs_root)  # the first one still reads it
        with open(os.path.join(first.directory, "tracing_on")) as tracing_on:
            assert tracing_on.read() == "1\n"  # untouched by the refused one
        os.close(first.fileno())  # as if the first reader were dropped unclosed
        first._fd = None
        with ConnectEventReader(tracefs_root) as second:
            assert second.directory == first.directory
            assert second.read() == []
    finally:
        first.close()
    assert not os.path.exists(first.directory)


def test_lost_events_reports_ring_buffer_overruns(open_reader):
    reader = open_reader(buffer_kb=4)  # the smallest buffer: a few pages per CPU
    # 300 connections make about 900 events of some 200 bytes, none read meanwhile.
    subprocess.run([sys.executable, "-c", FLOODING_CHILD, "300"], check=True, timeout=60)
    first = reader.lost_events()
    assert first > 0
    # Later calls report the increase only (other programs' connects may add some).
    before = ring_buffer_losses(reader.directory)
    second = reader.lost_events()
    after = ring_buffer_losses(reader.directory)
    assert before - first <= second <= after - first


# The stale-instance child: opens a reader, prints its instance's directory, then waits.
READER_CHILD = """
import sys
from histstat.sources.tracefs import ConnectEventReader

reader = ConnectEventReader(sys.argv[1])
print(reader.directory, flush=True)
sys.stdin.buffer.read()
"""


def test_stale_instance_of_a_killed_process_is_removed_at_next_start(tracefs_root):
    instances = os.path.join(tracefs_root, "instances")
    sleeper = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=-1)
    live_start = wait_for(lambda: process_start_time(sleeper.pid))
    others = [
        os.path.join(instances, f"unrelated-{uuid.uuid4().hex[:8]}"),
        os.path.join(instances, instance_name(sleeper.pid, live_start)),  # alive
        os.path.join(instances, instance_name(sleeper.pid, live_start) + "-x"),
    ]
    killed = subprocess.Popen(
        [sys.executable, "-c", READER_CHILD, tracefs_root], stdin=-1, stdout=-1
    )
    stale = read_line(killed.stdout).decode().strip()
    try:
        for other in others:
            os.mkdir(other)
        killed.send_signal(signal.SIGKILL)
        killed.wait(END_TIMEOUT)
        assert os.path.isdir(stale)  # nothing removed it at its death
        with ConnectEventReader(tracefs_root) as reader:
            assert os.path.basename(stale) in reader.stale_removed
            assert reader.stale_failed == []
        assert not os.path.exists(stale)
        assert all(os.path.isdir(other) for other in others)
    finally:
        end_child(killed)
        killed.stdout.close()
        end_child(sleeper)
        remove_instances([stale, *others])


def remove_instances(paths) -> None:
    """Remove every instance left, each on its own: one that refuses for a moment (the
    kernel says ENODEV or EBUSY while a dying reader lets go) never keeps the others."""

    def gone() -> bool:
        for path in paths:
            try:
                os.rmdir(path)
            except FileNotFoundError:
                pass
            except OSError:
                continue
        return not any(os.path.isdir(path) for path in paths)

    wait_for(gone, describe=lambda: [path for path in paths if os.path.isdir(path)])


# The mounting child: in its own mount namespace, unmounts tracefs if it is visible at
# the standard place, then finds it and reports what it saw as JSON.
MOUNTING_CHILD = """
import json
from histstat.sources.tracefs import (
    STANDARD_ROOT, locate_tracefs, mounted_filesystems, unmount_tracefs,
)

def visible():
    with open("/proc/self/mountinfo", "rb") as info:
        return mounted_filesystems(info.read()).get(STANDARD_ROOT)

while visible() == "tracefs":
    unmount_tracefs(STANDARD_ROOT)
before = visible()
found = locate_tracefs()
print(json.dumps({"before": before, "root": found.root, "mounted": found.mounted,
                  "after": visible()}))
"""


def test_unmounted_tracefs_is_mounted_at_start(tracefs_root):
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.fail("this test needs unshare(1) (util-linux) for a private mount namespace")
    with open("/proc/self/mountinfo", "rb") as info:
        outside_before = mounted_filesystems(info.read()).get(STANDARD_ROOT)
    result = subprocess.run(
        [unshare, "--mount", "--propagation", "private", sys.executable, "-c", MOUNTING_CHILD],
        capture_output=True,
        timeout=DEFAULT_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    seen = json.loads(result.stdout)
    assert seen["before"] != "tracefs"
    assert seen == {
        "before": seen["before"],
        "root": STANDARD_ROOT,
        "mounted": True,
        "after": "tracefs",
    }
    with open("/proc/self/mountinfo", "rb") as info:
        assert mounted_filesystems(info.read()).get(STANDARD_ROOT) == outside_before


# The unprivileged child: in its own mount namespace, without tracefs mounted, it turns
# into nobody and says why it cannot have tracefs.
UNPRIVILEGED_CHILD = (
    MOUNTING_CHILD.split("before = visible()")[0]
    + """
import os
from histstat.sources.tracefs import TracefsUnavailable
os.setgid(65534)
os.setuid(65534)
try:
    locate_tracefs()
except TracefsUnavailable as exc:
    print(json.dumps({"reason": str(exc), "after": visible()}))
"""
)


def test_unmounted_tracefs_without_root_gives_the_reason(tracefs_root):
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.fail("this test needs unshare(1) (util-linux) for a private mount namespace")
    result = subprocess.run(
        [unshare, "--mount", "--propagation", "private", sys.executable, "-c", UNPRIVILEGED_CHILD],
        capture_output=True,
        timeout=DEFAULT_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    seen = json.loads(result.stdout)
    assert seen["reason"] == (
        "tracefs is not mounted at /sys/kernel/tracing, and mounting it needs root"
    )
    assert seen["after"] != "tracefs"


def test_kernel_without_tracefs_gives_the_reason(monkeypatch):
    files = {
        "/proc/self/mountinfo": b"22 1 0:21 / /sys rw - sysfs sysfs rw\n",
        "/proc/filesystems": b"nodev\tsysfs\nnodev\tproc\n\text4\n",
    }
    monkeypatch.setattr(tracefs, "_read", lambda path: files[path])
    with pytest.raises(TracefsUnavailable, match=r"no tracefs \(not in /proc/filesystems\)"):
        locate_tracefs(environ={})


def test_empty_directory_through_test_variable_is_unusable(tmp_path):
    with pytest.raises(TracefsUnavailable, match="not a usable tracefs: it has no instances"):
        locate_tracefs(environ={TEST_ROOT_VARIABLE: str(tmp_path)})
    assert not any(tmp_path.iterdir())  # nothing was mounted or made there


def test_test_variable_picks_the_directory_used(tracefs_root):
    assert locate_tracefs(environ={TEST_ROOT_VARIABLE: tracefs_root}).root == tracefs_root


def test_mountinfo_shows_what_is_visible_at_a_mount_point():
    mountinfo = (
        b"22 1 0:21 / /sys rw - sysfs sysfs rw\n"
        b"40 22 0:13 / /sys/kernel/tracing rw - tracefs nodev rw\n"
        b"41 40 0:50 / /sys/kernel/tracing rw - tmpfs none rw\n"
        b"42 1 0:13 / /mnt/with\\040space rw shared:5 - tracefs nodev rw\n"
    )
    assert mounted_filesystems(mountinfo) == {
        "/sys": "sysfs",
        "/sys/kernel/tracing": "tmpfs",  # mounted over tracefs
        "/mnt/with space": "tracefs",
    }

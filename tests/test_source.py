"""psutil's connection entries become one immutable record per socket."""

import os
import socket
import subprocess
import sys
from collections import namedtuple

import psutil
import pytest

from histstat.records import Connection
from histstat.sources import psutil_source
from histstat.sources.psutil_source import PsutilSource, connections_from_psutil
from support.waiting import STOP_TIMEOUT, read_line

Addr = namedtuple("Addr", "ip port")
Sconn = namedtuple("Sconn", "fd family type laddr raddr status pid")


def sconn(pid, laddr, raddr=(), status="ESTABLISHED", family=socket.AF_INET, kind=None):
    kind = socket.SOCK_STREAM if kind is None else kind
    raddr = Addr(*raddr) if raddr else ()
    return Sconn(3, family, kind, Addr(*laddr), raddr, status, pid)


def test_fields_and_protocol_names():
    entries = [
        sconn(5, ("127.0.0.1", 80), ("127.0.0.1", 4000)),
        sconn(6, ("::1", 80), status="LISTEN", family=socket.AF_INET6),
        sconn(None, ("0.0.0.0", 53), status=psutil.CONN_NONE, kind=socket.SOCK_DGRAM),
        sconn(
            7,
            ("::", 5353),
            status=psutil.CONN_NONE,
            family=socket.AF_INET6,
            kind=socket.SOCK_DGRAM,
        ),  # fmt: skip
    ]
    assert connections_from_psutil(entries, start_time=no_start_time) == {
        Connection("tcp", "127.0.0.1", 80, "127.0.0.1", 4000, "ESTABLISHED", 5, owners=(5,)),
        Connection("tcp6", "::1", 80, None, None, "LISTEN", 6, owners=(6,)),
        Connection("udp", "0.0.0.0", 53, None, None, None, None),
        Connection("udp6", "::", 5353, None, None, None, 7, owners=(7,)),
    }


def no_start_time(pid):
    raise AssertionError(f"start time of {pid} asked for a socket with one holder")


class StartTimes:
    """A fake start_time: pid → create time (None: unknown), counting the questions."""

    def __init__(self, times: dict) -> None:
        self.times = times
        self.asked: list = []

    def __call__(self, pid):
        self.asked.append(pid)
        return self.times[pid]


def test_a_socket_listed_once_per_holder_lists_them_all_by_start_time_then_pid():
    # A pre-fork server's listener, listed for each holder (as on macOS), in any order:
    # the earliest start first, the lowest pid on a tie, an unknown start time last.
    times = StartTimes({900: 30.0, 901: 10.0, 902: 10.0, 903: None, 899: 20.0})
    entries = [sconn(pid, ("0.0.0.0", 80), status="LISTEN") for pid in (903, 902, None, 900)]
    entries += [sconn(pid, ("0.0.0.0", 80), status="LISTEN") for pid in (901, 899)]
    assert connections_from_psutil(entries, start_time=times) == {
        Connection(
            "tcp", "0.0.0.0", 80, None, None, "LISTEN", 901, owners=(901, 902, 899, 900, 903)
        )
    }


def test_each_holders_start_time_is_asked_once_per_snapshot():
    times = StartTimes({900: 2.0, 901: 1.0})
    entries = [sconn(pid, ("0.0.0.0", 80), status="LISTEN") for pid in (900, 901)]
    entries += [sconn(pid, ("0.0.0.0", 443), status="LISTEN") for pid in (901, 900)]
    entries.append(sconn(900, ("127.0.0.1", 22), ("127.0.0.1", 5000)))
    conns = connections_from_psutil(entries, start_time=times)
    assert {conn.owners for conn in conns} == {(901, 900), (900,)}
    assert sorted(times.asked) == [900, 901]


def test_real_start_times_order_holders_and_a_gone_process_comes_last(monkeypatch):
    # Entries as a platform that lists a socket once per holder (and where the socket's
    # identity cannot be read) gives them, for real processes: this one, a child started
    # after it, and a child already reaped.
    monkeypatch.setattr(psutil_source, "_LINUX", False)
    later = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)  # fmt: skip
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    try:
        pids = [gone.pid, later.pid, os.getpid()]
        entries = [sconn(pid, ("127.0.0.1", 80), status="LISTEN") for pid in pids]
        (conn,) = connections_from_psutil(entries)
    finally:
        later.stdin.close()
        later.wait(STOP_TIMEOUT)
    assert conn.owners == (os.getpid(), later.pid, gone.pid)
    assert conn.pid == os.getpid()


def test_unowned_socket_keeps_no_pid():
    entries = [sconn(None, ("127.0.0.1", 80), ("127.0.0.1", 5000), status="TIME_WAIT")]
    (conn,) = connections_from_psutil(entries)
    assert conn.pid is None


def test_real_snapshot_holds_our_own_listener():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        snapshot = PsutilSource().snapshot()
    mine = [c for c in snapshot if c.lport == port and c.status == "LISTEN"]
    # Without root another user's socket has no pid; our own always has one.
    me = os.getpid()
    # On Linux it is in histstat's own network namespace, the only one psutil reads.
    netns = os.stat("/proc/self/ns/net").st_ino if sys.platform.startswith("linux") else None
    assert mine == [
        Connection("tcp", "127.0.0.1", port, None, None, "LISTEN", me, owners=(me,), netns=netns)
    ]


HOLD_SOURCE = (
    "import socket, sys\n"
    "s = socket.socket(fileno=int(sys.argv[1])) if sys.argv[1] != '-' else socket.socket()\n"
    "if sys.argv[1] == '-':\n"
    "    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n"
    "    s.bind(('127.0.0.1', int(sys.argv[2])))\n"
    "    s.listen()\n"
    "print('ready', flush=True)\n"
    "sys.stdin.read()\n"
)


def hold(*args, pass_fds=()):
    """A child process that holds a listener: its own, or one it inherited."""
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD_SOURCE, *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        pass_fds=pass_fds,
    )
    assert read_line(child.stdout) == b"ready\n"
    return child


def release(child):
    child.stdin.close()
    child.wait(STOP_TIMEOUT)
    child.stdout.close()


def listeners_on(port):
    return sorted(
        (c.pid for c in PsutilSource().snapshot() if c.lport == port and c.status == "LISTEN"),
        key=lambda pid: -1 if pid is None else pid,
    )


def test_listener_shared_with_a_child_is_one_row():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        child = hold(listener.fileno(), pass_fds=(listener.fileno(),))
        try:
            (owner,) = listeners_on(port)
            assert owner in (os.getpid(), child.pid)
        finally:
            release(child)


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="no SO_REUSEPORT here")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="socket identity is Linux's")
def test_second_listener_on_a_reused_port_is_its_own_row():
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        intruder = hold("-", port)
        try:
            assert listeners_on(port) == sorted([os.getpid(), intruder.pid])
        finally:
            release(intruder)


@pytest.mark.parametrize("kind", ["psutil", "linux"])
def test_a_source_reads_only_the_protocols_asked_for(kind):
    if kind == "linux" and not sys.platform.startswith("linux"):
        pytest.skip("the Linux source runs on Linux only")
    from histstat.sources import make_source

    with socket.socket() as tcp, socket.socket(type=socket.SOCK_DGRAM) as udp:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        udp.bind(("127.0.0.1", 0))
        ports = {"tcp": tcp.getsockname()[1], "udp": udp.getsockname()[1]}
        for asked in ("tcp", "udp"):
            source = make_source(kind, frozenset({asked}))
            try:
                snapshot = source.snapshot()
            finally:
                source.close()
            assert {conn.proto for conn in snapshot} <= {asked}
            assert any(conn.lport == ports[asked] for conn in snapshot)


class Reads:
    """A fake psutil.net_connections: one list of entries per call, the last repeated."""

    def __init__(self, *calls) -> None:
        self.calls = list(calls)
        self.count = 0

    def __call__(self, kind):
        self.count += 1
        return self.calls.pop(0) if len(self.calls) > 1 else self.calls[0]


def test_a_socket_first_listed_without_its_process_is_looked_up_once_more():
    """psutil reads the descriptors before the tables: a socket opened in between is
    listed without its process. The second read finds it; the rest of the first stands."""
    listener = sconn(5, ("127.0.0.1", 80), status="LISTEN")
    client = sconn(None, ("127.0.0.1", 4000), ("127.0.0.1", 80))
    time_wait = sconn(None, ("127.0.0.1", 4001), ("127.0.0.1", 80), status="TIME_WAIT")
    reads = Reads([listener, client, time_wait], [listener, client._replace(pid=7)])
    source = PsutilSource(read=reads)
    snapshot = source.snapshot()
    assert reads.count == 2
    by_port = {conn.lport: conn for conn in snapshot}
    assert (by_port[4000].pid, by_port[4000].owners) == (7, (7,))
    assert by_port[4001].pid is None and by_port[4001].status == "TIME_WAIT"
    assert by_port[80].pid == 5 and len(snapshot) == 3


def test_a_socket_that_stays_without_a_process_costs_one_second_read_only():
    """A socket of a process psutil cannot read (another user's) is looked up again the
    first time it is listed, not at every poll; an orphaned state never is."""
    hidden = sconn(None, ("127.0.0.1", 4000), ("127.0.0.1", 80))
    orphan = sconn(None, ("127.0.0.1", 4001), ("127.0.0.1", 80), status="FIN_WAIT2")
    reads = Reads([hidden, orphan])
    source = PsutilSource(read=reads)
    first = source.snapshot()
    assert reads.count == 2 and {conn.pid for conn in first} == {None}
    source.snapshot()
    assert reads.count == 3
    reads.calls = [[orphan]]
    source.snapshot()
    assert reads.count == 4


def test_a_connection_waiting_in_a_listeners_queue_costs_no_second_read():
    """An accepted connection not yet taken by accept() has no process: on a busy
    server a new one is listed at every poll, and the listener's owner stands for it."""
    listener = sconn(5, ("127.0.0.1", 80), status="LISTEN")
    queued = sconn(None, ("127.0.0.1", 80), ("127.0.0.1", 4000))
    reads = Reads([listener, queued])
    snapshot = PsutilSource(read=reads).snapshot()
    assert reads.count == 1 and len(snapshot) == 2

"""psutil's connection entries become one immutable record per socket."""

import os
import socket
import subprocess
import sys
from collections import namedtuple

import psutil
import pytest

from histstat.records import Connection
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
    assert connections_from_psutil(entries) == {
        Connection("tcp", "127.0.0.1", 80, "127.0.0.1", 4000, "ESTABLISHED", 5),
        Connection("tcp6", "::1", 80, None, None, "LISTEN", 6),
        Connection("udp", "0.0.0.0", 53, None, None, None, None),
        Connection("udp6", "::", 5353, None, None, None, 7),
    }


def test_socket_shared_by_several_processes_is_one_row_for_the_lowest_pid():
    # A pre-fork server: one listening socket, four owners, listed in any order.
    entries = [sconn(pid, ("0.0.0.0", 80), status="LISTEN") for pid in (902, 900, None, 901)]
    assert connections_from_psutil(entries) == {
        Connection("tcp", "0.0.0.0", 80, None, None, "LISTEN", 900)
    }


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
    assert mine == [Connection("tcp", "127.0.0.1", port, None, None, "LISTEN", os.getpid())]


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

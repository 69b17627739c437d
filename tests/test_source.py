"""psutil's connection entries become one immutable record per socket."""

import os
import socket
from collections import namedtuple

import psutil

from histstat.records import Connection
from histstat.source import PsutilSource, connections_from_psutil

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

"""The story's ends and bytes from the kernel's own end events, before the Linux source
reports them: the real Linux source for snapshots, plus a minimal reader of the sock_diag
destroy broadcasts (what ``ss -E`` shows) standing in for its ``ends()``, driving the
real poller over real loopback connections of a child process."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import time

import pytest

from histstat.enrich import ProcessCache
from histstat.filters import RowFilter
from histstat.poller import Poller
from histstat.records import TcpCounters
from histstat.sources.base import End, Ends
from histstat.tracker import ConnectionTracker
from support.children import end_child
from support.waiting import DEFAULT_TIMEOUT, read_line

NETLINK_SOCK_DIAG = 4
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
SKNLGRP_INET_TCP_DESTROY = 1
INET_DIAG_INFO = 2
# struct tcp_info offsets (linux/tcp.h): bytes_acked, bytes_received, bytes_sent, retrans
TCP_INFO_BYTES = ((120, 128), (200, 208))


def destroy_listener() -> socket.socket:
    if not sys.platform.startswith("linux"):
        pytest.fail("the kernel's destroy broadcasts are a Linux feature", pytrace=False)
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
        sock.bind((0, 0))
        sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, SKNLGRP_INET_TCP_DESTROY)
    except OSError as exc:
        pytest.fail(f"cannot join the sock_diag destroy group: {exc}", pytrace=False)
    sock.setblocking(False)
    return sock


def parse_ends(data: bytes, received: float) -> list[End]:
    """IPv4 TCP destroy messages (inet_diag_msg and its INET_DIAG_INFO)."""
    ends = []
    offset = 0
    while offset + 16 <= len(data):
        (length,) = struct.unpack_from("=I", data, offset)
        msg = data[offset + 16 : offset + length]
        offset += (length + 3) & ~3
        if len(msg) < 72 or msg[0] != socket.AF_INET:
            continue
        sport, dport = struct.unpack_from("!HH", msg, 4)
        low, high = struct.unpack_from("=II", msg, 44)  # idiag_cookie
        counters = None
        at = 72
        while at + 4 <= len(msg):
            size, kind = struct.unpack_from("=HH", msg, at)
            if size < 4:
                break
            if kind == INET_DIAG_INFO and size - 4 >= 216:
                info = msg[at + 4 : at + size]
                (acked, got), (sent, again) = (
                    struct.unpack_from("=QQ", info, first) for first, _ in TCP_INFO_BYTES
                )
                counters = TcpCounters(acked, got, sent, again)
            at += (size + 3) & ~3
        laddr, raddr = socket.inet_ntoa(msg[8:12]), socket.inet_ntoa(msg[24:28])
        ends.append(End("tcp", laddr, sport, raddr, dport, low | high << 32, received, counters))
    return ends


def events_source(listener: socket.socket):
    """The Linux source, with the destroy broadcasts as its ends."""
    from histstat.sources.linux import LinuxSource

    class WithEnds(LinuxSource):
        def watches_ends(self) -> bool:
            return True

        def ends(self) -> Ends:
            found: list[End] = []
            while True:
                try:
                    data = listener.recv(1 << 20)
                except BlockingIOError:
                    return Ends(found)
                found += parse_ends(data, time.time())

    return WithEnds()


# The child: a listener; its client sends 5,000 bytes and the accepted end 7,000; the
# client closes, and the accepted end 0.5 s after it read the client's FIN.
CHILD = """
import socket, sys, time
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(1)
print(server.getsockname()[1], flush=True)
sys.stdin.readline()
client = socket.create_connection(server.getsockname())
accepted, _ = server.accept()
client.sendall(b"u" * 5000)
accepted.sendall(b"d" * 7000)
for sock, size in ((accepted, 5000), (client, 7000)):
    while size:
        size -= len(sock.recv(size))
print(client.getsockname()[1], flush=True)
sys.stdin.readline()
client.close()
assert accepted.recv(1) == b""
time.sleep(0.5)
accepted.close()
print("closed", flush=True)
sys.stdin.readline()
"""


def test_close_rows_from_the_kernels_end_events_carry_exact_payload_bytes():
    listener = destroy_listener()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    source = events_source(listener)
    try:
        port = int(read_line(child.stdout, DEFAULT_TIMEOUT))
        poller = Poller(
            source,
            ConnectionTracker(),
            ProcessCache(),
            RowFilter(ports=((port, port),)),
            closed=True,
            transitions=True,
        )
        rows = [pending.resolved() for pending in poller.poll()]

        def say(line: bytes) -> None:
            child.stdin.write(line)
            child.stdin.flush()

        say(b"connect\n")
        cport = int(read_line(child.stdout, DEFAULT_TIMEOUT))
        rows += [pending.resolved() for pending in poller.poll()]
        say(b"close\n")
        deadline = time.monotonic() + DEFAULT_TIMEOUT
        while sum(row.event == "close" and row.raddr is not None for row in rows) < 2:
            assert time.monotonic() < deadline, rows
            time.sleep(0.1)
            rows += [pending.resolved() for pending in poller.poll()]
        say(b"end\n")
    finally:
        end_child(child)
        source.close()
        listener.close()

    stories = {}
    for row in rows:
        if row.raddr is not None:
            stories.setdefault(row.lport, []).append(row)
    client, server = stories[cport], stories[port]
    for story in (client, server):
        assert [row.event for row in story].count("open") == 1, story
        assert [row.event for row in story].count("close") == 1, story
        # Attributed once the descriptor scan finds the child (it may miss a new socket
        # for a poll), and never to anyone else.
        assert {row.pid for row in story} <= {child.pid, None}, story
        assert story[-1].pid == child.pid, story
    (client_close,) = [row for row in client if row.event == "close"]
    (server_close,) = [row for row in server if row.event == "close"]
    assert (client_close.bytes_sent, client_close.bytes_received) == (5000, 7000), client_close
    assert (server_close.bytes_sent, server_close.bytes_received) == (7000, 5000), server_close
    assert server_close.status == "CLOSE_WAIT"  # the peer's FIN seen: its +1 left out
    # The end is the kernel's: the server's came about 0.5 s after the client's.
    apart = (server_close.timestamp - client_close.timestamp).total_seconds()
    assert 0.3 <= apart <= 3.0, apart

"""The Linux source's sock_diag dumps: both TCP families in one walk, and the fallbacks."""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys

import pytest

if not sys.platform.startswith("linux"):
    pytest.skip("sock_diag is Linux's", allow_module_level=True)

from histstat.sources.linux import _TCP_STATES, LinuxSource  # noqa: E402
from histstat.sources.sock_diag import (  # noqa: E402
    SOCK_DIAG_BY_FAMILY,
    TCPDIAG_GETSOCK,
    NetlinkUnavailable,
    SockDiag,
    dump_request,
)

HEADER = struct.Struct("=IHHII")
LISTEN = 1 << 10
CONNECTIONS = 0xFFE & ~LISTEN


def answer(kind: int, seq: int, family: int, state: int, lport: int, rport: int, cookie: int):
    """One inet_diag_msg as the kernel sends it: 127.0.0.1 or ::1 at both ends."""
    size = 4 if family == socket.AF_INET else 16
    loopback = socket.inet_pton(family, "127.0.0.1" if size == 4 else "::1").ljust(16, b"\0")
    body = struct.pack("=BBBB", family, state, 0, 0)
    body += struct.pack(">HH", lport, rport) + loopback + (loopback if rport else bytes(16))
    body += struct.pack("=IQ", 0, cookie) + struct.pack("=IIIII", 0, 0, 0, 1000, 4242)
    return HEADER.pack(HEADER.size + len(body), kind, 2, seq, 0) + body


def done(seq: int, code: int = 0) -> bytes:
    return HEADER.pack(HEADER.size + 4, 3, 2, seq, 0) + struct.pack("=i", code)


def error(seq: int, code: int) -> bytes:
    return (
        HEADER.pack(HEADER.size + 4 + HEADER.size, 2, 0, seq, 0)
        + struct.pack("=i", -code)
        + bytes(HEADER.size)
    )


# (family, state, lport, rport, cookie) of the sockets the fake kernel holds.
SOCKETS = [
    (socket.AF_INET, 1, 40000, 80, 11),
    (socket.AF_INET6, 1, 40001, 443, 12),
    (socket.AF_INET, 10, 80, 0, 13),
    (socket.AF_INET6, 10, 443, 0, 14),
    (socket.AF_INET, 7, 5353, 0, 15),  # UDP
]


class FakeKernel:
    """A sock_diag socket's stand-in: answers each dump request from ``SOCKETS`` (TCP
    for TCP requests, the last one for UDP), each in a datagram of its own, and records
    the requests as (type, family, protocol, ext, states); ``refuse`` answers the
    compat request with NLMSG_ERROR, ``fail`` raises that OSError on its next recv."""

    def __init__(self, refuse: int | None = None, done_error: int | None = None) -> None:
        self.refuse = refuse
        self.done_error = done_error
        self.fail: OSError | None = None
        self.stray_family: int | None = None
        self.requests: list[tuple[int, int, int, int, int]] = []
        self.pending: list[bytes] = []
        self.closed = False

    def settimeout(self, timeout: float) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def send(self, data: bytes) -> int:
        length, kind, flags, seq, _ = HEADER.unpack_from(data)
        assert length == len(data) and flags == 0x301
        if kind == TCPDIAG_GETSOCK:
            assert length == HEADER.size + 60
            family, _, _, ext = struct.unpack_from("=BBBB", data, HEADER.size)
            states, dbs = struct.unpack_from("=II", data, HEADER.size + 52)
            protocol = socket.IPPROTO_TCP
            assert dbs == 0
        else:
            family, protocol, ext, _, states = struct.unpack_from("=BBBBI", data, HEADER.size)
        self.requests.append((kind, family, protocol, ext, states))
        if kind == TCPDIAG_GETSOCK and self.refuse is not None:
            self.pending = [error(seq, self.refuse)]
            return len(data)
        if kind == SOCK_DIAG_BY_FAMILY and self.done_error is not None:
            self.pending = [done(seq, -self.done_error)]
            return len(data)
        udp = protocol == socket.IPPROTO_UDP
        self.pending = [
            answer(kind, seq, sock_family, state, lport, rport, cookie)
            for sock_family, state, lport, rport, cookie in SOCKETS
            if (sock_family == family or kind == TCPDIAG_GETSOCK)
            and (state == 7) == udp
            and states & (1 << state)
        ]
        if self.stray_family is not None:  # second, an answer of a family not asked for
            stray = bytearray(answer(kind, seq, socket.AF_INET, 1, 40999, 80, 99))
            stray[HEADER.size] = self.stray_family
            self.pending.insert(1, bytes(stray))
        self.pending.append(done(seq))
        return len(data)

    def recv_into(self, buffer: bytearray, size: int = 0) -> int:
        if self.fail is not None:
            failure, self.fail = self.fail, None
            raise failure
        data = self.pending.pop(0)
        buffer[: len(data)] = data
        return len(data)


def ids(rows) -> list[tuple]:
    return [(row[0], row[2], row[4], row[5], row[8]) for row in rows]


def test_a_compat_request_asks_for_tcp_of_every_family():
    message = dump_request(TCPDIAG_GETSOCK, socket.AF_INET6, socket.IPPROTO_TCP, 2, 0x3FE, 7)
    assert HEADER.unpack_from(message) == (76, 18, 0x301, 7, 0)
    # inet_diag_req: AF_UNSPEC, no address prefixes, the INET_DIAG_INFO bit, a zeroed
    # inet_diag_sockid, the states, no dbs.
    assert message[16:20] == bytes([socket.AF_UNSPEC, 0, 0, 2])
    assert message[20:68] == bytes(48)
    assert struct.unpack_from("=II", message, 68) == (0x3FE, 0)


def test_a_family_request_names_its_family_and_protocol():
    message = dump_request(SOCK_DIAG_BY_FAMILY, socket.AF_INET6, socket.IPPROTO_UDP, 0, 0xFFE, 9)
    assert HEADER.unpack_from(message) == (72, 20, 0x301, 9, 0)
    assert struct.unpack_from("=BBBBI", message, 16) == (socket.AF_INET6, 17, 0, 0, 0xFFE)
    assert message[24:] == bytes(48)


def test_one_walk_answers_both_families_connections_then_listeners():
    kernel = FakeKernel()
    diag = SockDiag(sock=kernel)
    caches: dict[int, dict] = {socket.AF_INET: {}, socket.AF_INET6: {}}
    found = diag.dump_tcp(
        {family: (proto, caches[family]) for family, proto in ((2, "tcp"), (10, "tcp6"))},
        _TCP_STATES,
        counters=True,
    )
    assert kernel.requests == [(18, 0, 6, 2, CONNECTIONS), (18, 0, 6, 0, LISTEN)]
    assert ids(found["tcp"]) == [
        ("tcp", 40000, 80, "ESTABLISHED", 11),
        ("tcp", 80, None, "LISTEN", 13),
    ]
    assert ids(found["tcp6"]) == [
        ("tcp6", 40001, 443, "ESTABLISHED", 12),
        ("tcp6", 443, None, "LISTEN", 14),
    ]
    assert found["tcp6"][0][1] == found["tcp6"][0][3] == "::1"
    assert found["tcp"][0][6:8] == (4242, 1000)  # inode, uid
    # Each family's endpoints are decoded and cached apart: an IPv4 socket id could
    # read as an IPv6 one whose last 12 address bytes are zero.
    assert all(len(key) == 36 for cache in caches.values() for key in cache)
    assert {ends[0] for ends in caches[socket.AF_INET].values()} == {"127.0.0.1"}
    assert {ends[0] for ends in caches[socket.AF_INET6].values()} == {"::1"}
    assert diag.one_walk


def test_a_family_not_asked_for_is_left_out_of_one_walk():
    kernel = FakeKernel()
    kernel.stray_family = socket.AF_PACKET
    diag = SockDiag(sock=kernel)
    found = diag.dump_tcp({socket.AF_INET6: ("tcp6", {})}, _TCP_STATES)
    assert list(found) == ["tcp6"]
    assert {row[2] for row in found["tcp6"]} == {40001, 443}
    both = diag.dump_tcp({2: ("tcp", {}), 10: ("tcp6", {})}, _TCP_STATES)
    assert {row[2] for row in both["tcp"]} == {40000, 80}


def test_a_refused_compat_request_is_remembered_and_the_socket_kept():
    kernel = FakeKernel(refuse=errno.EINVAL)
    diag = SockDiag(sock=kernel)
    with pytest.raises(NetlinkUnavailable):
        diag.dump_tcp({socket.AF_INET: ("tcp", {})}, _TCP_STATES)
    assert not diag.one_walk
    assert not kernel.closed  # the refusal ended the request: the socket is still good
    rows = diag.dump("tcp", socket.AF_INET, socket.IPPROTO_TCP, _TCP_STATES, {})
    assert {row[2] for row in rows} == {40000, 80}


def test_a_dump_ended_by_an_error_is_refused_not_empty():
    """A kernel without the protocol's diag handler starts the dump and ends it at once,
    its error in the NLMSG_DONE: that is a refusal (the table's file is read), not an
    empty table."""
    diag = SockDiag(sock=FakeKernel(done_error=errno.ENOENT))
    with pytest.raises(NetlinkUnavailable) as refused:
        diag.dump("udp", socket.AF_INET, socket.IPPROTO_UDP, {}, {})
    assert refused.value.errno == errno.ENOENT


def test_a_dump_ended_by_another_error_fails_once_and_is_not_refused():
    """Any other error in the NLMSG_DONE (the kernel's ENOMEM of one dump) is that
    dump's failure, not a refusal: the table is dumped again next time. Whatever number
    an answer carries, it is said without raising anything else."""
    diag = SockDiag(sock=FakeKernel(done_error=errno.ENOMEM))
    with pytest.raises(OSError) as failed:
        diag.dump("udp", socket.AF_INET, socket.IPPROTO_UDP, {}, {})
    assert failed.type is OSError and failed.value.errno == errno.ENOMEM
    for code in (2**31, 2**31 - 1):  # INT_MIN and INT_MAX as the kernel would send them
        strange = SockDiag(sock=FakeKernel(done_error=code))
        with pytest.raises(OSError):
            strange.dump("udp", socket.AF_INET, socket.IPPROTO_UDP, {}, {})


def netlink_source(kernel: FakeKernel, **options) -> LinuxSource:
    source = LinuxSource(netlink=True, watch_ends=False, namespaces=False, **options)
    # A failed dump closes the socket; the next one asks the opener: the same fake.
    source._diag = SockDiag(lambda: kernel, sock=kernel)
    return source


def test_the_source_dumps_both_tcp_tables_in_one_walk():
    kernel = FakeKernel()
    source = netlink_source(kernel)
    rows = source.table()
    assert [request[:3] for request in kernel.requests] == [
        (18, 0, 6),
        (18, 0, 6),
        (20, socket.AF_INET, 17),
        (20, socket.AF_INET6, 17),
    ]
    assert [row[0] for row in rows] == ["tcp", "tcp", "tcp6", "tcp6", "udp"]
    # The row counts by table still size each table's address cache.
    assert source._table_sizes == {
        ("tcp", "netlink"): 2,
        ("tcp6", "netlink"): 2,
        ("udp", "netlink"): 1,
        ("udp6", "netlink"): 0,
    }


def test_a_kernel_refusing_one_walk_is_asked_once_then_each_family_alone():
    kernel = FakeKernel(refuse=errno.EOPNOTSUPP)
    source = netlink_source(kernel)
    first = source.table()
    second = source.table()
    assert ids(first) == ids(second)
    assert {row[0] for row in first} == {"tcp", "tcp6", "udp"}
    kinds = [request[:2] for request in kernel.requests]
    assert kinds.count((18, 0)) == 1
    assert kinds[1:5] == [(20, 2), (20, 2), (20, 10), (20, 10)]  # each: connections, listeners
    assert not source._proc_tables


def test_one_table_asked_for_is_dumped_alone():
    kernel = FakeKernel()
    source = netlink_source(kernel, protos=frozenset({"tcp6"}))
    assert {row[2] for row in source.table()} == {40001, 443}
    assert [request[:2] for request in kernel.requests] == [(20, 10), (20, 10)]


def test_a_failed_walk_reads_both_tcp_files_for_that_poll_only():
    """A dump cut short (here ENOBUFS) leaves that poll to the /proc/net files of both
    TCP tables, as a table dumped alone would; the next poll walks again."""
    kernel = FakeKernel()
    source = netlink_source(kernel)
    read = []
    source._read_proc_net = lambda directory, proto: read.append(proto) or []
    kernel.fail = OSError(errno.ENOBUFS, os.strerror(errno.ENOBUFS))
    rows = source.table()
    assert read == ["tcp", "tcp6"]
    assert [row[0] for row in rows] == ["udp"]  # the UDP dumps opened another socket
    assert kernel.closed
    assert {row[0] for row in source.table()} == {"tcp", "tcp6", "udp"}
    assert read == ["tcp", "tcp6"]
    assert source._diag.one_walk


def test_the_kernel_answers_one_walk_with_the_rows_of_both_family_dumps():
    """On this kernel: the rows of one walk are those of the two family dumps, for a
    loopback connection of each family (the machine's other sockets may change between
    the dumps, so only this test's own are compared, by their whole 4-tuple)."""
    with socket.socket() as server4, socket.socket(socket.AF_INET6) as server6:
        server4.bind(("127.0.0.1", 0))
        server6.bind(("::1", 0))
        server4.listen()
        server6.listen()
        client4 = socket.create_connection(server4.getsockname()[:2])
        client6 = socket.create_connection(server6.getsockname()[:2])
        ours = {}
        for proto, server, client in (("tcp", server4, client4), ("tcp6", server6, client6)):
            (host, port), (_, near) = server.getsockname()[:2], client.getsockname()[:2]
            ours[proto] = {
                (host, port, None, None),
                (host, near, host, port),
                (host, port, host, near),
            }
        try:
            diag = SockDiag()
            try:
                walked = diag.dump_tcp(
                    {socket.AF_INET: ("tcp", {}), socket.AF_INET6: ("tcp6", {})}, _TCP_STATES
                )
                alone = {
                    proto: diag.dump(proto, family, socket.IPPROTO_TCP, _TCP_STATES, {})
                    for family, proto in ((socket.AF_INET, "tcp"), (socket.AF_INET6, "tcp6"))
                }
            finally:
                diag.close()
        finally:
            client4.close()
            client6.close()
    assert diag.one_walk, "this kernel refused TCPDIAG_GETSOCK"
    for proto in ("tcp", "tcp6"):
        mine = {row for row in walked[proto] if row[1:5] in ours[proto]}
        assert mine == {row for row in alone[proto] if row[1:5] in ours[proto]}
        assert {row[1:5] for row in mine} == ours[proto]  # the listener and both ends

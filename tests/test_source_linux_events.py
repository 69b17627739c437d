"""The Linux source's socket cookies, byte counters and destroy broadcasts (ends)."""

from __future__ import annotations

import os
import random
import socket
import struct
import sys
import threading
import time

import pytest

from support.waiting import DEFAULT_TIMEOUT, END_TIMEOUT, wait_for

if not sys.platform.startswith("linux"):
    pytest.skip("sock_diag is Linux's", allow_module_level=True)

from histstat.records import TcpCounters  # noqa: E402
from histstat.sources import destroy  # noqa: E402
from histstat.sources.base import End  # noqa: E402
from histstat.sources.destroy import DestroyWatcher  # noqa: E402
from histstat.sources.linux import LinuxSource  # noqa: E402
from histstat.sources.sock_diag import SockDiag, parse_destroys, tcp_counters  # noqa: E402

SO_COOKIE = getattr(socket, "SO_COOKIE", 57)
CLIENT_BYTES, SERVER_BYTES = 5000, 7000


def cookie_of(sock: socket.socket) -> int:
    """The socket's sock_diag cookie, as the kernel assigns it (SO_COOKIE)."""
    return struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]


def rst_on_close(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def receive_exactly(sock: socket.socket, size: int) -> None:
    got = 0
    while got < size:
        chunk = sock.recv(65536)
        assert chunk, f"EOF after {got} of {size} bytes"
        got += len(chunk)


class Collected:
    """Every End a source reported, by cookie, and whether any call said ``lost``."""

    def __init__(self, source) -> None:
        self.source = source
        self.by_cookie: dict[int, list[End]] = {}
        self.lost = False

    def take(self) -> Collected:
        ends = self.source.ends()
        self.lost |= ends.lost
        for end in ends.ends:
            self.by_cookie.setdefault(end.cookie, []).append(end)
        return self

    def has(self, cookies) -> bool:
        self.take()
        return all(cookie in self.by_cookie for cookie in cookies)

    def wait(self, cookies, timeout: float = DEFAULT_TIMEOUT) -> None:
        wanted = set(cookies)
        wait_for(
            lambda: self.has(wanted),
            timeout,
            lambda: (
                f"{len(wanted - self.by_cookie.keys())} of {len(wanted)} ends missing,"
                f" lost={self.lost}"
            ),
        )


@pytest.fixture
def watching():
    """A factory of live LinuxSources whose destroy watcher has joined (the first
    snapshot joins it), each closed at the end."""
    made: list = []

    def make(**options) -> LinuxSource:
        source = LinuxSource(**options)
        made.append(source)
        source.snapshot()
        watcher = source._watcher
        assert source.watches_ends(), (
            "the kernel's sock_diag destroy broadcasts (Linux 4.2+) are needed:"
            f" {watcher.error if watcher else 'no watcher'}"
        )
        return source

    yield make
    for source in made:
        source.close()


@pytest.fixture
def listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(512)
    yield server
    server.close()


def connect(server: socket.socket) -> tuple[socket.socket, socket.socket]:
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    return client, accepted


def payload(counters: TcpCounters) -> tuple:
    """(bytes_acked, bytes_received, bytes_sent less what was sent again)."""
    return (
        counters.bytes_acked,
        counters.bytes_received,
        counters.bytes_sent - counters.bytes_retrans,
    )


def by_port(conns, *ports) -> dict:
    """(lport, rport) → the tcp connection on 127.0.0.1 with one of ``ports`` as lport."""
    return {
        (conn.lport, conn.rport): conn
        for conn in conns
        if conn.lport in ports and conn[:2] == ("tcp", "127.0.0.1")
    }


# --------------------------------------------------------------------------- dumps


def test_a_dump_carries_each_sockets_cookie(watching, listener):
    source = watching()
    client, accepted = connect(listener)
    with client, accepted:
        port, peer = listener.getsockname()[1], client.getsockname()[1]
        conns = by_port(source.snapshot(), port, peer)
        assert conns[(peer, port)].cookie == cookie_of(client)
        assert conns[(port, peer)].cookie == cookie_of(accepted)
        assert conns[(port, None)].cookie == cookie_of(listener)
        assert all(conn.counters is None for conn in conns.values())


def test_counters_are_asked_for_only_then_and_grow_with_a_transfer(watching, listener):
    source = watching()
    client, accepted = connect(listener)
    udp = socket.socket(type=socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    with client, accepted, udp:
        port, peer = listener.getsockname()[1], client.getsockname()[1]
        seen = []
        for size in (10_000, 100_000, 1_000_000):
            client.sendall(b"u" * size)
            receive_exactly(accepted, size)
            conns = by_port(source.snapshot(counters=True), port, peer)
            seen.append((conns[(peer, port)].counters, conns[(port, peer)].counters))
        sent = [10_000, 110_000, 1_110_000]
        # The client's bytes_acked counts its SYN; the accepted end's received none.
        # bytes_sent counts retransmissions too (seen even on a busy loopback).
        assert [ours.bytes_sent - ours.bytes_retrans for ours, _ in seen] == sent
        assert [ours.bytes_acked for ours, _ in seen] == [1 + size for size in sent]
        assert [theirs.bytes_received for _, theirs in seen] == sent
        udp_port = udp.getsockname()[1]
        udp_conns = [
            c for c in source.snapshot(counters=True) if c[:3] == ("udp", "127.0.0.1", udp_port)
        ]
        assert [c.counters for c in udp_conns] == [None]
        assert all(c.counters is None for c in by_port(source.snapshot(), port, peer).values())


# --------------------------------------------------------------------------- ends


@pytest.mark.parametrize("closer", ["client", "server"])
def test_a_connection_seen_open_ends_with_its_cookie_endpoints_and_counters(
    watching, listener, closer
):
    source = watching()
    collected = Collected(source)
    client, accepted = connect(listener)
    port, peer = listener.getsockname()[1], client.getsockname()[1]
    conns = by_port(source.snapshot(), port, peer)
    cookies = {"client": conns[(peer, port)].cookie, "server": conns[(port, peer)].cookie}
    client.sendall(b"c" * CLIENT_BYTES)
    receive_exactly(accepted, CLIENT_BYTES)
    accepted.sendall(b"s" * SERVER_BYTES)
    receive_exactly(client, SERVER_BYTES)
    first, second = (client, accepted) if closer == "client" else (accepted, client)
    passive = "server" if closer == "client" else "client"
    # The active closer's full socket is freed once its FIN is acknowledged; the other
    # end closes only after that end arrived, so neither order is left to chance.
    first.close()
    collected.wait([cookies[closer]])
    second.close()
    collected.wait(cookies.values())
    ends = {side: collected.by_cookie[cookie] for side, cookie in cookies.items()}
    assert all(len(found) == 1 for found in ends.values()), ends
    client_end, server_end = ends["client"][0], ends["server"][0]
    assert client_end[:5] == ("tcp", "127.0.0.1", peer, "127.0.0.1", port)
    assert server_end[:5] == ("tcp", "127.0.0.1", port, "127.0.0.1", peer)
    # The raw counters (tcp_info): bytes_sent is the payload; bytes_acked adds the
    # side's own FIN, and the client's SYN (the accepted end's SYN-ACK is acknowledged
    # before it is a full socket); bytes_received adds the peer's FIN only on the
    # passive closer, whose full socket outlives the FIN it received.
    # bytes_sent also counts what was sent again, which bytes_retrans says.
    fin = {closer: 0, passive: 1}
    assert payload(client_end.counters) == (
        CLIENT_BYTES + 2,
        SERVER_BYTES + fin["client"],
        CLIENT_BYTES,
    )
    assert payload(server_end.counters) == (
        SERVER_BYTES + 1,
        CLIENT_BYTES + fin["server"],
        SERVER_BYTES,
    )


def test_the_time_wait_remainder_keeps_the_cookie_a_dump_saw(watching, listener):
    # The kernel copies the full socket's cookie into its TIME_WAIT remainder only if
    # one was assigned: a dump while it was open assigns it.
    source = watching()
    collected = Collected(source)
    client, accepted = connect(listener)
    port, peer = listener.getsockname()[1], client.getsockname()[1]
    cookie = by_port(source.snapshot(), port, peer)[(peer, port)].cookie
    client.close()
    collected.wait([cookie])
    accepted.close()
    remainder = wait_for(
        lambda: by_port(source.snapshot(), peer).get((peer, port)),
        describe="no TIME_WAIT remainder",
    )
    assert (remainder.status, remainder.cookie) in {("FIN_WAIT2", cookie), ("TIME_WAIT", cookie)}


def test_an_abort_ends_with_its_cookie_and_the_fields_the_kernel_cleared(watching, listener):
    source = watching()
    collected = Collected(source)
    client, accepted = connect(listener)
    port, peer = listener.getsockname()[1], client.getsockname()[1]
    conns = by_port(source.snapshot(), port, peer)
    cookies = conns[(peer, port)].cookie, conns[(port, peer)].cookie
    client.sendall(b"a" * 100)
    receive_exactly(accepted, 100)
    rst_on_close(client)
    client.close()
    collected.wait(cookies[:1])
    accepted.close()
    collected.wait(cookies)
    (aborted,) = collected.by_cookie[cookies[0]]
    # tcp_disconnect cleared the local address, the remote port and the counters.
    assert aborted[:5] == ("tcp", None, peer, "127.0.0.1", None)
    assert aborted.counters is None
    (reset,) = collected.by_cookie[cookies[1]]  # the end that received the RST keeps all
    assert reset[:5] == ("tcp", "127.0.0.1", port, "127.0.0.1", peer)
    assert reset.counters == TcpCounters(0, 100, 0, 0)


def test_udp_and_ipv6_ends_come_from_their_own_groups(watching):
    source = watching()
    collected = Collected(source)
    cookies = {}
    for proto, family, host in (
        ("udp", socket.AF_INET, "127.0.0.1"),
        ("udp6", socket.AF_INET6, "::1"),
    ):
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.bind((host, 0))
        except OSError:
            assert proto == "udp6", "IPv4 loopback is needed"
            continue
        cookies[proto] = cookie_of(sock), sock.getsockname()[1], host
        sock.close()
    collected.wait(cookie for cookie, _, _ in cookies.values())
    for proto, (cookie, port, host) in cookies.items():
        assert collected.by_cookie[cookie] == [
            End(
                proto,
                host,
                port,
                None,
                None,
                cookie,
                collected.by_cookie[cookie][0].time,
                None,
                os.stat("/proc/self/ns/net").st_ino,  # histstat's own namespace
            )
        ]


def test_only_the_tables_asked_for_are_watched(watching, listener):
    source = watching(protos=frozenset({"udp"}))
    client, accepted = connect(listener)
    udp = socket.socket(type=socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    cookies = cookie_of(client), cookie_of(accepted), cookie_of(udp)
    for sock in (client, accepted, udp):
        sock.close()
    collected = Collected(source)
    collected.wait(cookies[2:])
    assert not collected.take().by_cookie.keys() & set(cookies[:2])
    assert all(end.proto == "udp" for found in collected.by_cookie.values() for end in found)


def test_a_burst_of_2000_connections_gives_one_end_per_socket(watching, listener):
    source = watching(protos=frozenset({"tcp"}))
    collected = Collected(source)
    cookies: list[int] = []
    for index in range(2000):
        client, accepted = connect(listener)
        cookies += cookie_of(client), cookie_of(accepted)
        client.close()
        accepted.close()
        if index % 10 == 9:
            time.sleep(0.01)  # the burst's pace: about 2 s in all
        if index % 200 == 199:
            collected.take()  # a caller polls while the burst goes on
    collected.wait(cookies, timeout=30)
    assert len(set(cookies)) == 4000
    duplicated = {
        c: ends for c, ends in collected.by_cookie.items() if c in cookies and len(ends) > 1
    }
    assert not duplicated
    assert not collected.lost


def test_an_overflowing_receive_buffer_says_lost_and_repeats_no_end(listener):
    release = threading.Event()

    def stalled_clock() -> float:
        # Called by the reader as each message arrives: it stalls the reader until the
        # kernel had to drop broadcasts for want of room in the tiny buffer.
        release.wait(DEFAULT_TIMEOUT)
        return 1.0

    watcher = DestroyWatcher(["tcp"], receive_buffer=1, force_buffer=False, clock=stalled_clock)
    try:
        assert watcher.start(), watcher.error
        assert watcher.buffer_size is not None and watcher.buffer_size < 10_000
        cookies = set()
        for _ in range(200):
            client, accepted = connect(listener)
            cookies |= {cookie_of(client), cookie_of(accepted)}
            rst_on_close(client)
            client.close()
            accepted.close()
        release.set()
        collected = Collected(watcher)
        wait_for(lambda: collected.take().lost, describe="no ENOBUFS reported")
        # The socket goes on working after ENOBUFS: later ends arrive (one connection
        # per try, as the tiny buffer may drop one while the machine is busy).
        later: set = set()

        def a_later_end_arrived() -> bool:
            client, accepted = connect(listener)
            later.add(cookie_of(client))
            rst_on_close(client)
            client.close()
            accepted.close()
            return bool(collected.take().by_cookie.keys() & later)

        wait_for(a_later_end_arrived, step=0.1, describe="no end after the loss")
        assert len(collected.by_cookie.keys() & cookies) < len(cookies)
        assert all(len(ends) == 1 for ends in collected.by_cookie.values())
        assert watcher.watching
    finally:
        release.set()
        watcher.close()


def test_a_full_queue_keeps_the_oldest_ends_and_says_lost(listener):
    arrivals: list = []

    def counting_clock() -> float:
        arrivals.append(None)
        return float(len(arrivals))

    watcher = DestroyWatcher(["tcp"], max_queued=10, clock=counting_clock)
    try:
        assert watcher.start(), watcher.error
        for _ in range(20):
            client, accepted = connect(listener)
            rst_on_close(client)
            client.close()
            accepted.close()
        # 40 messages received means the 11th was refused a place long before.
        wait_for(lambda: len(arrivals) >= 40, describe=lambda: f"{len(arrivals)} arrived")
        first = watcher.ends()
        assert first.lost
        assert [end.time for end in first.ends] == [float(n) for n in range(1, 11)]
        assert len({end.cookie for end in first.ends}) == 10
        assert watcher.ends() == ([], False)
    finally:
        watcher.close()


def test_an_end_is_stamped_when_it_arrives(listener):
    stamps = iter(range(1000, 2000))
    watcher = DestroyWatcher(["tcp"], clock=lambda: float(next(stamps)))
    try:
        assert watcher.start(), watcher.error
        client, accepted = connect(listener)
        cookie = cookie_of(client)
        rst_on_close(client)
        client.close()
        collected = Collected(watcher)
        collected.wait([cookie])
        accepted.close()
        # The reader's clock read when the message came, not the caller's.
        assert 1000 <= collected.by_cookie[cookie][0].time < 2000
    finally:
        watcher.close()


# --------------------------------------------------------------------------- lifecycle


def _netlink_fds() -> set:
    inodes = set()
    with open("/proc/net/netlink") as table:
        for line in table.read().splitlines()[1:]:
            inodes.add(line.split()[-1])
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            found.add(int(fd))
    return found


def _destroy_threads() -> list:
    return [thread for thread in threading.enumerate() if thread.name == "histstat-destroy"]


def test_close_leaves_no_thread_and_no_descriptor(monkeypatch):
    # Without its wake-up pipe the reader would wait in poll() for ten minutes.
    monkeypatch.setattr(destroy, "_SAFETY_WAKEUP", 600_000)
    before_fds, before_threads = set(os.listdir("/proc/self/fd")), _destroy_threads()
    before_netlink = _netlink_fds()  # other tests' sources may still be open
    source = LinuxSource()
    assert not source.watches_ends()  # joined by the first snapshot, not before
    source.snapshot()
    assert source.watches_ends()
    assert len(_destroy_threads()) == len(before_threads) + 1
    assert len(_netlink_fds() - before_netlink) >= 2  # the dump's socket and the watcher's
    closing = threading.Thread(target=source.close)
    closing.start()
    closing.join(END_TIMEOUT)
    assert not closing.is_alive(), "close() still waits for the reader"
    assert _destroy_threads() == before_threads
    assert not source.watches_ends()
    assert set(os.listdir("/proc/self/fd")) == before_fds
    assert _netlink_fds() == before_netlink


def test_a_joined_socket_stamps_its_namespace_and_is_closed_by_the_reader_when_left(
    listener, monkeypatch
):
    """A second socket joined (here in histstat's own namespace, named 7 for the test)
    is read by the same thread, its ends stamped 7; once left, the reader drains and
    closes it, woken through its pipe (the safety wake-up would take ten minutes)."""
    monkeypatch.setattr(destroy, "_SAFETY_WAKEUP", 600_000)
    own = os.stat("/proc/self/ns/net").st_ino
    watcher = DestroyWatcher(["tcp"], netns=own)
    try:
        assert watcher.start()
        threads = _destroy_threads()
        joined = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 4)
        assert watcher.join(7, joined)
        assert watcher.namespaces == {7}
        client, accepted = connect(listener)
        cookie = cookie_of(client)
        client.close()
        accepted.close()
        seen: list = []

        def both() -> bool:
            seen.extend(end for end in watcher.ends().ends if end.cookie == cookie)
            return {end.netns for end in seen} == {own, 7}

        wait_for(both, describe=lambda: f"ends seen: {seen}")
        assert len(seen) == 2  # once per socket joined, each with its namespace
        watcher.leave(7)
        assert watcher.namespaces == frozenset()
        wait_for(lambda: joined.fileno() == -1, END_TIMEOUT, "the left socket stays open")
        assert _destroy_threads() == threads  # no thread of its own
        rejoined = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 4)
        assert watcher.join(7, rejoined)  # a namespace may come back (a reused inode)
    finally:
        watcher.close()
    assert watcher.namespaces == frozenset()
    assert rejoined.fileno() == -1  # close() closed what was still joined


def test_every_socket_left_is_closed_even_when_draining_one_fails(monkeypatch):
    """Two namespaces left in one batch: the first one's drain fails, and the second's
    socket, which alone keeps its namespace alive, is closed all the same."""
    monkeypatch.setattr(destroy, "_SAFETY_WAKEUP", 600_000)
    watcher = DestroyWatcher(["tcp"], netns=os.stat("/proc/self/ns/net").st_ino)
    try:
        assert watcher.start()
        first, second = (socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 4) for _ in "12")
        assert watcher.join(8, first) and watcher.join(9, second)
        drain = watcher._drain

        def failing(sock, buffer, addresses, netns):
            if netns == 8:
                raise OSError("drain failed")
            drain(sock, buffer, addresses, netns)

        monkeypatch.setattr(watcher, "_drain", failing)
        wake = watcher._wake_reader
        monkeypatch.setattr(watcher, "_wake_reader", lambda: None)
        watcher.leave(8)
        watcher.leave(9)
        wake()  # both leaves in one batch
        wait_for(
            lambda: first.fileno() == -1 and second.fileno() == -1,
            END_TIMEOUT,
            "both sockets left closed",
        )
    finally:
        watcher.close()


def test_no_watcher_on_a_proc_tree_or_when_joining_fails(tmp_path, monkeypatch):
    (tmp_path / "net").mkdir()
    for name in ("tcp", "tcp6", "udp", "udp6"):
        (tmp_path / "net" / name).write_bytes(b"header\n")
    files = LinuxSource(proc=str(tmp_path))
    assert files.snapshot() == frozenset()
    assert not files.watches_ends() and files.ends() == ([], False)
    files.close()

    def refused(*args, **kwargs):
        raise OSError(93, "Protocol not supported")

    monkeypatch.setattr(destroy.socket, "socket", refused)
    before = _destroy_threads()
    source = LinuxSource(netlink=False, watch_ends=True)
    try:
        assert source.snapshot()  # the source still works
        assert not source.watches_ends()
        assert source.ends() == ([], False)
        assert source._watcher is not None and source._watcher.error.errno == 93
        assert _destroy_threads() == before
    finally:
        source.close()


# --------------------------------------------------------------------------- parsing


def destroy_message(
    family=socket.AF_INET, protocol=6, info: bytes | None = bytes(232), extra: bytes = b""
) -> bytes:
    """A destroy broadcast as the kernel builds it: 127.0.0.1:40000 → 127.0.0.1:80."""
    size = 4 if family == socket.AF_INET else 16
    src = socket.inet_pton(family, "127.0.0.1" if size == 4 else "::1").ljust(16, b"\0")
    body = struct.pack("=BBBB", family, 7, 0, 0)
    body += struct.pack(">HH", 40000, 80) + src + src + struct.pack("=IQ", 0, 0x1_0000_0002)
    body += bytes(20)
    attrs = struct.pack("=HHB3x", 5, 10, protocol)
    if info is not None:
        attrs += struct.pack("=HH", 4 + len(info), 2) + info + bytes(-len(info) % 4)
    attrs += extra
    return struct.pack("=IHHII", 16 + len(body) + len(attrs), 20, 0, 0, 0) + body + attrs


def test_a_destroy_message_is_parsed_with_its_cookie_and_counters():
    info = bytearray(232)
    struct.pack_into("=QQ", info, 120, 5002, 7000)
    struct.pack_into("=QQ", info, 200, 5000, 3)
    data = destroy_message(info=bytes(info))
    (end,) = parse_destroys(data, len(data), 12.5)
    assert end == End(
        "tcp",
        "127.0.0.1",
        40000,
        "127.0.0.1",
        80,
        0x1_0000_0002,
        12.5,
        TcpCounters(5002, 7000, 5000, 3),
    )
    data6 = destroy_message(socket.AF_INET6, 17, info=None)
    assert parse_destroys(data6, len(data6), 1.0)[0][:5] == ("udp6", "::1", 40000, "::1", 80)


def test_a_destroy_message_laid_out_otherwise_gives_the_same_end():
    """Linux's own layout (protocol, then a whole tcp_info) is read in one unpack; any
    other (a padding attribute before tcp_info, as on machines where unaligned access is
    slow, the attributes in another order, an older kernel's shorter tcp_info) takes the
    walk through the attributes and gives the same end."""
    info = bytearray(232)
    struct.pack_into("=QQ", info, 120, 5002, 7000)
    struct.pack_into("=QQ", info, 200, 5000, 3)
    canonical = destroy_message(info=bytes(info))
    (expected,) = parse_destroys(canonical, len(canonical), 1.0)
    assert expected.counters == TcpCounters(5002, 7000, 5000, 3)
    header, body = canonical[:16], canonical[16:88]
    protocol = struct.pack("=HHB3x", 5, 10, 6)
    whole_info = struct.pack("=HH", 236, 2) + bytes(info)
    padding = struct.pack("=HH", 4, 14)  # INET_DIAG_PAD

    def message(attributes: bytes) -> bytes:
        length = 16 + len(body) + len(attributes)
        return struct.pack("=I", length) + header[4:] + body + attributes

    for attributes in (protocol + padding + whole_info, whole_info + protocol):
        data = message(attributes)
        assert parse_destroys(data, len(data), 1.0) == [expected]
    older = message(protocol + struct.pack("=HH", 196, 2) + bytes(info[:192]))
    (end,) = parse_destroys(older, len(older), 1.0)
    assert end == expected._replace(counters=TcpCounters(5002, 7000, None, None))
    # A tcp_info attribute claiming more than the message holds is not read.
    lying = message(protocol + struct.pack("=HH", 400, 2) + bytes(info))
    assert parse_destroys(lying, len(lying), 1.0)[0].counters is None


def test_a_shorter_tcp_info_leaves_the_newer_counters_none():
    info = bytearray(232)
    struct.pack_into("=QQQQ", info, 120, 1, 2, 0, 0)
    struct.pack_into("=QQ", info, 200, 3, 4)
    assert tcp_counters(info) == TcpCounters(1, 2, 3, 4)
    assert tcp_counters(info[:212]) == TcpCounters(1, 2, 3, None)
    assert tcp_counters(info[:192]) == TcpCounters(1, 2, None, None)  # before Linux 4.19
    assert tcp_counters(info[:104]) is None


def test_malformed_or_short_destroy_messages_are_skipped_without_error():
    good = destroy_message()
    for cut in range(len(good)):
        for data in (good[:cut], good[:cut] + bytes(400)):
            for end in parse_destroys(data, len(data), 0.0):
                assert end.cookie == 0x1_0000_0002
    # Lengths that lie: a header claiming more than was received, an attribute of
    # length 0 or past the message, an unknown protocol, another message type.
    lying = bytearray(good)
    struct.pack_into("=I", lying, 0, 1 << 20)
    assert parse_destroys(lying, len(lying), 0.0) == []
    zero_attr = destroy_message(info=None, extra=struct.pack("=HH", 0, 2))
    assert len(parse_destroys(zero_attr, len(zero_attr), 0.0)) == 1
    past_end = destroy_message(info=None, extra=struct.pack("=HH", 400, 2))
    assert parse_destroys(past_end, len(past_end), 0.0)[0].counters is None
    assert parse_destroys(destroy_message(protocol=1), 200, 0.0) == []
    other = bytearray(good)
    struct.pack_into("=H", other, 4, 2)
    assert parse_destroys(other, len(other), 0.0) == []
    randomly = random.Random(10)
    for _ in range(2000):
        data = bytearray(good)
        for _ in range(randomly.randint(1, 8)):
            data[randomly.randrange(len(data))] = randomly.randrange(256)
        parse_destroys(data, randomly.randint(0, len(data)), 0.0)


def test_a_tcp_table_is_dumped_connections_first_then_listeners(monkeypatch):
    """A listener made while one request walked the listening sockets would be missing
    beside the connection it accepted a moment later: its listeners come after."""
    asked = []

    def recorded(self, sock, kind, family, protocol, mask, info, states, tables):
        asked.append((tables[family][0], mask))

    monkeypatch.setattr(SockDiag, "_dump", recorded)
    diag = SockDiag()
    try:
        diag.dump("tcp", socket.AF_INET, socket.IPPROTO_TCP, {1: "ESTABLISHED"}, {})
        diag.dump("udp", socket.AF_INET, socket.IPPROTO_UDP, {}, {})
    finally:
        diag.close()
    listen = 1 << 10
    assert asked == [("tcp", 0xFFE & ~listen), ("tcp", listen), ("udp", 0xFFE)]

"""The Linux source: the kernel's socket tables and an incremental inode → process map."""

from __future__ import annotations

import os
import socket
import struct
import sys
from typing import Any, Optional, cast

import psutil

from histstat.records import Connection
from histstat.sources.base import NO_ENDS, Ends
from histstat.sources.owners import SocketOwners

# The kernel's TCP states (include/net/tcp_states.h) by the names psutil gives them, so
# both sources report the same status for the same socket.
_TCP_STATES = {
    1: psutil.CONN_ESTABLISHED,
    2: psutil.CONN_SYN_SENT,
    3: psutil.CONN_SYN_RECV,
    4: psutil.CONN_FIN_WAIT1,
    5: psutil.CONN_FIN_WAIT2,
    6: psutil.CONN_TIME_WAIT,
    7: psutil.CONN_CLOSE,
    8: psutil.CONN_CLOSE_WAIT,
    9: psutil.CONN_LAST_ACK,
    10: psutil.CONN_LISTEN,
    11: psutil.CONN_CLOSING,
}
# /proc/net/tcp prints the state as two hex digits; looking the token up directly spares
# an int() per line.
_PROC_TCP_STATES = {b"%02X" % number: name for number, name in _TCP_STATES.items()}

# (name, family, IP protocol, stateful) of each table, in psutil's order.
_TABLES = (
    ("tcp", socket.AF_INET, socket.IPPROTO_TCP, True),
    ("tcp6", socket.AF_INET6, socket.IPPROTO_TCP, True),
    ("udp", socket.AF_INET, socket.IPPROTO_UDP, False),
    ("udp6", socket.AF_INET6, socket.IPPROTO_UDP, False),
)

# Decoded addresses and endpoints are cached across polls, since they recur; past this
# size the cache starts over, which bounds it whatever the traffic.
_ADDRESS_CACHE_SIZE = 1 << 16

# A row of the socket table, as plain tuples because one is built per socket per poll:
# (proto, laddr, lport, raddr, rport, status, inode, uid).
ROW_FIELDS = ("proto", "laddr", "lport", "raddr", "rport", "status", "inode", "uid")
TableRow = tuple[str, str, int, Optional[str], Optional[int], Optional[str], int, int]
Endpoints = tuple[str, int, Optional[str], Optional[int]]  # laddr, lport, raddr, rport


def _proc_address(token: bytes, family: int) -> tuple[str, int] | tuple[None, None]:
    """(ip, port) of a /proc/net "ADDR:PORT" token, (None, None) for port 0; the kernel
    prints the address as 32-bit words in host byte order."""
    hex_ip, hex_port = token.split(b":")
    port = int(hex_port, 16)
    if not port:
        return None, None
    raw = b"".join(
        int(hex_ip[at : at + 8], 16).to_bytes(4, sys.byteorder) for at in range(0, len(hex_ip), 8)
    )
    return socket.inet_ntop(family, raw), port


def parse_proc_net(
    data: bytes, proto: str, addresses: dict[bytes, Any] | None = None
) -> list[TableRow]:
    """The rows of one /proc/net/{tcp,tcp6,udp,udp6} file (its bytes, header included).

    Like psutil, a socket without a local port (psutil's empty laddr) is left out and a
    remote end with port 0 is no remote end; UDP has no status. ``addresses`` caches
    decoded tokens between calls.
    """
    if addresses is None:
        addresses = {}
    family = socket.AF_INET6 if proto.endswith("6") else socket.AF_INET
    stateful = proto.startswith("tcp")
    rows: list[TableRow] = []
    lines = data.split(b"\n")
    for index in range(1, len(lines)):
        fields = lines[index].split(None, 10)
        if len(fields) < 10:
            continue
        local = addresses.get(fields[1])
        if local is None:
            local = addresses[fields[1]] = _proc_address(fields[1], family)
        if not local[1]:
            continue
        remote = addresses.get(fields[2])
        if remote is None:
            remote = addresses[fields[2]] = _proc_address(fields[2], family)
        status = _PROC_TCP_STATES.get(fields[3]) if stateful else None
        inode, uid = int(fields[9]), int(fields[7])
        row = (proto, local[0], local[1], remote[0], remote[1], status, inode, uid)
        rows.append(cast(TableRow, row))  # a local port means a local address
    return rows


# Netlink sock_diag (linux/sock_diag.h, linux/inet_diag.h): a dump request per table,
# answered by one inet_diag_msg per socket.
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST_DUMP = 0x1 | 0x300
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NLMSG_HEADER = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# inet_diag_req_v2: family, protocol, ext, pad, states, then a zeroed inet_diag_sockid.
_DIAG_REQUEST = struct.Struct("=BBBBI48x")
# An answer: nlmsghdr (len, type, (flags), seq, (pid)), then inet_diag_msg ((family),
# state, (timer, retrans), the first 36 bytes of inet_diag_sockid: sport, dport, src, dst,
# then (if, cookie, expires, rqueue, wqueue), uid, inode).
_DIAG_ANSWER = struct.Struct("=IH2xI4xxB2x36s24xII")
# Every state from ESTABLISHED to CLOSING; SYN_RECV brings the kernel's request sockets
# (as /proc/net/tcp shows them), and leaving out BOUND_INACTIVE (13) keeps bound but
# unconnected sockets out, which /proc/net/tcp does not show either.
_ALL_STATES = 0xFFE
_RECEIVE_SIZE = 1 << 16  # the kernel sends at most 32 KiB per datagram
_DUMP_TIMEOUT = 5.0  # seconds


class NetlinkUnavailable(OSError):
    """The kernel refused a sock_diag dump (no inet_diag or udp_diag support)."""


def _diag_endpoints(sockid: bytes, family: int) -> Endpoints | None:
    """(laddr, lport, raddr, rport) of an inet_diag_sockid's first 36 bytes (ports, then
    addresses, in network order); None without a local port, as psutil leaves it out."""
    lport = int.from_bytes(sockid[0:2], "big")
    if not lport:
        return None
    size = 4 if family == socket.AF_INET else 16
    laddr = socket.inet_ntop(family, sockid[4 : 4 + size])
    rport = int.from_bytes(sockid[2:4], "big")
    if not rport:
        return laddr, lport, None, None
    return laddr, lport, socket.inet_ntop(family, sockid[20 : 20 + size]), rport


class _SockDiag:
    """One netlink sock_diag socket, kept open across polls."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._seq = 0
        self._buffer = bytearray(_RECEIVE_SIZE + _DIAG_ANSWER.size)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def dump(
        self,
        proto: str,
        family: int,
        protocol: int,
        stateful: bool,
        endpoints: dict[bytes, Endpoints | None],
    ) -> list[TableRow]:
        """The rows of one table, in the same form as ``parse_proc_net``; ``endpoints``
        caches decoded socket ids between calls."""
        if self._sock is None:
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG)
            # The kernel always ends a dump; the timeout only bounds the unforeseen.
            self._sock.settimeout(_DUMP_TIMEOUT)
        try:
            return self._dump(self._sock, proto, family, protocol, stateful, endpoints)
        except BaseException:
            # A dump cut short leaves its remaining messages queued on the socket.
            self.close()
            raise

    def _dump(
        self,
        sock: socket.socket,
        proto: str,
        family: int,
        protocol: int,
        stateful: bool,
        endpoints: dict[bytes, Endpoints | None],
    ) -> list[TableRow]:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        seq = self._seq
        request = _DIAG_REQUEST.pack(family, protocol, 0, 0, _ALL_STATES)
        header = _NLMSG_HEADER.pack(
            _NLMSG_HEADER.size + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST_DUMP, seq, 0
        )
        sock.send(header + request)
        buffer = self._buffer
        unpack = _DIAG_ANSWER.unpack_from
        states = _TCP_STATES if stateful else {}
        rows: list[TableRow] = []
        while True:
            size = sock.recv_into(buffer, _RECEIVE_SIZE)
            offset = 0
            while offset + _NLMSG_HEADER.size <= size:
                # One unpack per message, the header with the inet_diag_msg that follows
                # it; the buffer's spare tail keeps this in bounds for shorter messages.
                length, kind, message_seq, state, sockid, uid, inode = unpack(buffer, offset)
                if length < _NLMSG_HEADER.size:
                    raise OSError("malformed netlink message")
                if message_seq == seq:
                    if kind == _NLMSG_DONE:
                        return rows
                    if kind == _NLMSG_ERROR:
                        (code,) = struct.unpack_from("=i", buffer, offset + _NLMSG_HEADER.size)
                        raise NetlinkUnavailable(-code, os.strerror(-code))
                    if kind == _SOCK_DIAG_BY_FAMILY and length >= _DIAG_ANSWER.size:
                        try:
                            ends = endpoints[sockid]
                        except KeyError:
                            ends = endpoints[sockid] = _diag_endpoints(sockid, family)
                        if ends is not None:
                            laddr, lport, raddr, rport = ends
                            status = states.get(state)
                            rows.append((proto, laddr, lport, raddr, rport, status, inode, uid))
                offset += (length + 3) & ~3


class LinuxSource:
    """The Linux source: sock_diag netlink dumps (else /proc/net files) for the socket
    table, with each socket's inode and owner uid, and ``SocketOwners`` for every pid
    holding it (``pid`` is the first of them, the likeliest opener)."""

    name = "linux"

    def __init__(
        self, proc: str = "/proc", netlink: bool | None = None, protos: frozenset[str] | None = None
    ) -> None:
        """``netlink`` None: use it when reading the live /proc, falling back to the
        /proc/net file of any table the kernel will not dump. ``protos`` (tcp, tcp6,
        udp, udp6) leaves out the tables nobody asked for: each dump costs the kernel a
        walk of its whole hash table, however few sockets it holds."""
        self.proc = proc
        self._tables = tuple(t for t in _TABLES if protos is None or t[0] in protos)
        self.owners = SocketOwners(proc)
        self._diag = _SockDiag() if (proc == "/proc" if netlink is None else netlink) else None
        self._proc_tables: set[str] = set()  # tables netlink refused: read from /proc/net
        # (proto, reader) → that reader's address cache
        self._addresses: dict[tuple[str, str], dict[bytes, Any]] = {}
        self._table_sizes: dict[
            tuple[str, str], int
        ] = {}  # (proto, reader) → rows it gave last time
        self._uids: dict[Connection, int] = {}

    def table(self) -> list[TableRow]:
        """Rows (see ``ROW_FIELDS``) of every TCP and UDP socket, IPv4 and IPv6."""
        rows: list[TableRow] = []
        for proto, family, protocol, stateful in self._tables:
            if self._diag is not None and proto not in self._proc_tables:
                addresses = self._address_cache(proto, "netlink")
                try:
                    dumped = self._diag.dump(proto, family, protocol, stateful, addresses)
                    self._table_sizes[(proto, "netlink")] = len(dumped)
                    rows += dumped
                    continue
                except NetlinkUnavailable:
                    self._proc_tables.add(proto)
                except (OSError, struct.error):
                    pass  # this poll reads the file; netlink is tried again next poll
            rows += self._read_proc_net(proto)
        return rows

    def _read_proc_net(self, proto: str) -> list[TableRow]:
        try:
            with open(f"{self.proc}/net/{proto}", "rb") as handle:
                data = handle.read()
        except FileNotFoundError:  # IPv6 disabled
            return []
        parsed = parse_proc_net(data, proto, self._address_cache(proto, "proc"))
        self._table_sizes[(proto, "proc")] = len(parsed)
        return parsed

    def _address_cache(self, proto: str, reader: str) -> dict[bytes, Any]:
        """The decoded-address cache of one table, started afresh once it holds much
        more than the table itself: under churn every new socket adds an entry, and a
        cache the size of the last 65,536 sockets was most of histstat's memory."""
        key = (proto, reader)
        cache = self._addresses.get(key)
        limit = min(_ADDRESS_CACHE_SIZE, 2 * self._table_sizes.get(key, 0) + 1024)
        if cache is None or len(cache) > limit:
            cache = self._addresses[key] = {}
        return cache

    def snapshot(self, counters: bool = False) -> frozenset[Connection]:
        rows = self.table()
        holders = self.owners.owners([row[6] for row in rows]).get
        # tuple.__new__ builds the same Connection without the Python-level __new__ that
        # NamedTuple adds, a third of the per-socket cost.
        make = tuple.__new__
        uids: dict[Connection, int] = {}
        for proto, laddr, lport, raddr, rport, status, inode, uid in rows:
            owners = holders(inode, ()) if inode else ()
            pid = owners[0] if owners else None
            conn = make(
                Connection, (proto, laddr, lport, raddr, rport, status, pid, None, owners, None)
            )
            uids.setdefault(conn, uid)
        self._uids = uids
        return frozenset(uids)

    def watches_ends(self) -> bool:
        return False

    def ends(self) -> Ends:
        return NO_ENDS

    def uid_of(self, conn: Connection) -> int | None:
        """The owner uid the kernel reported for the socket in the latest snapshot."""
        return self._uids.get(conn)

    def close(self) -> None:
        if self._diag is not None:
            self._diag.close()

"""The netlink sock_diag protocol: socket table dumps with cookies and byte counters, and
the messages of the kernel's socket destroy broadcasts."""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys
from collections.abc import Callable, Mapping
from typing import Optional, Union

from histstat.records import TcpCounters
from histstat.sources.base import End

# linux/netlink.h, linux/sock_diag.h, linux/inet_diag.h
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST_DUMP = 0x1 | 0x300
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
NLMSG_HEADER = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# The multicast groups of the destroy broadcasts (enum sknetlink_groups), by table.
DESTROY_GROUPS = {"tcp": 1, "udp": 2, "tcp6": 3, "udp6": 4}
# Attributes after an inet_diag_msg (enum in inet_diag.h): a u16 length (header
# included), a u16 type whose top two bits are flags, the value, padding to 4 bytes.
_ATTRIBUTE = struct.Struct("=HH")
_ATTRIBUTE_TYPE = 0x3FFF
INET_DIAG_INFO = 2
_INET_DIAG_PROTOCOL = 10
# idiag_ext asks for an attribute by the bit (1 << (type - 1)).
_EXT_INFO = 1 << (INET_DIAG_INFO - 1)

# inet_diag_req_v2: family, protocol, ext, pad, states, then a zeroed inet_diag_sockid.
_DIAG_REQUEST = struct.Struct("=BBBBI48x")
# The old request, TCPDIAG_GETSOCK (linux/inet_diag.h), still answered by every kernel
# with inet_diag: its inet_diag_req is family, src_len, dst_len, ext, a zeroed
# inet_diag_sockid, states, dbs. For a dump the kernel ignores the family and walks with
# AF_UNSPEC (inet_diag_dump_compat), so one walk of the TCP hash tables answers for IPv4
# and IPv6 together; each answer has the request's type, and its own family.
TCPDIAG_GETSOCK = 18
_COMPAT_REQUEST = struct.Struct("=BBBB48xII")
# An answer: nlmsghdr (len, type, (flags), seq, (pid)), then inet_diag_msg (family,
# state, (timer, retrans), the first 36 bytes of inet_diag_sockid: sport, dport, src, dst,
# then (if), the cookie, (expires, rqueue, wqueue), uid, inode). The cookie is two u32
# words, low one first, each in host order: one native u64 on a little-endian machine.
_DIAG_ANSWER = struct.Struct("=IH2xI4xBB2x36s4xQ12xII")
_ERRNO = struct.Struct("=i")  # what NLMSG_ERROR and NLMSG_DONE carry first
_DIAG_MESSAGE_END = NLMSG_HEADER.size + 72  # where an inet_diag_msg's attributes start
_COOKIE_SWAPPED = sys.byteorder != "little"
# Every state from ESTABLISHED to CLOSING; SYN_RECV brings the kernel's request sockets
# (as /proc/net/tcp shows them), and leaving out BOUND_INACTIVE (13) keeps bound but
# unconnected sockets out, which /proc/net/tcp does not show either.
_ALL_STATES = 0xFFE
# A TCP table is dumped in two requests, its connections, then its listeners: one
# request walks the listening sockets first, so a listener made while the walk went on
# could be missing beside a connection it accepted a moment later, which would then
# read as "out". Each request walks only its own hash table, so two cost what one did.
_LISTEN = 1 << 10
_TCP_MASKS = (_ALL_STATES & ~_LISTEN, _LISTEN)
_RECEIVE_SIZE = 1 << 16  # the kernel sends at most 32 KiB per datagram
_DUMP_TIMEOUT = 5.0  # seconds

# struct tcp_info (linux/tcp.h): where the byte counters are. A kernel older than 4.19
# sends a shorter tcp_info, without bytes_sent and bytes_retrans.
_BYTES_ACKED_RECEIVED = struct.Struct("=QQ")  # tcpi_bytes_acked, tcpi_bytes_received
_BYTES_ACKED_AT = 120
_BYTES_SENT_AT = 200
_BYTES_RETRANS_AT = 208
_U64 = struct.Struct("=Q")
_new = tuple.__new__

Endpoints = tuple[str, int, Optional[str], Optional[int]]  # laddr, lport, raddr, rport
# A dumped socket: (proto, laddr, lport, raddr, rport, status, inode, uid, cookie,
# counters), plain tuples because one is built per socket per poll.
DiagRow = tuple[
    str,
    str,
    int,
    Optional[str],
    Optional[int],
    Optional[str],
    int,
    int,
    Optional[int],
    Optional[TcpCounters],
]
Buffer = Union[bytes, bytearray, memoryview]


class NetlinkUnavailable(OSError):
    """The kernel refused a sock_diag dump (no inet_diag or udp_diag support)."""


# The errors a kernel without the handler answers a dump with (sock_diag: ENOENT for a
# protocol with no handler, EOPNOTSUPP for TCPDIAG_GETSOCK without inet_diag).
_REFUSALS = frozenset((errno.ENOENT, errno.EOPNOTSUPP))


def _error_text(code: int) -> str:
    """strerror of an error number an answer carried, whatever the number."""
    try:
        return os.strerror(code)
    except (ValueError, OverflowError):
        return f"error {code}"


def _swap_halves(cookie: int) -> int:
    """The cookie from a native u64 read of its two host-order u32 words (big-endian)."""
    return (cookie >> 32) | ((cookie & 0xFFFFFFFF) << 32)


def diag_endpoints(sockid: bytes, family: int) -> Endpoints | None:
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


def tcp_counters(info: Buffer) -> TcpCounters | None:
    """The byte counters of a tcp_info (INET_DIAG_INFO's value), as long as the kernel
    sent it; None when it is too short to hold even bytes_acked and bytes_received."""
    size = len(info)
    if size < _BYTES_ACKED_AT + _BYTES_ACKED_RECEIVED.size:
        return None
    acked, received = _BYTES_ACKED_RECEIVED.unpack_from(info, _BYTES_ACKED_AT)
    sent = _U64.unpack_from(info, _BYTES_SENT_AT)[0] if size >= _BYTES_SENT_AT + 8 else None
    retrans = (
        _U64.unpack_from(info, _BYTES_RETRANS_AT)[0] if size >= _BYTES_RETRANS_AT + 8 else None
    )
    return TcpCounters(acked, received, sent, retrans)


def _info_counters(message: Buffer, start: int, end: int) -> TcpCounters | None:
    """The counters of the INET_DIAG_INFO attribute of the inet_diag_msg that starts
    at ``start`` and ends at ``end``; None without one. The dump's walk: it stops at
    the attribute it wants, and builds no view of the others."""
    at = start + _DIAG_MESSAGE_END
    unpack = _ATTRIBUTE.unpack_from
    while at + 4 <= end:
        length, kind = unpack(message, at)
        if length < 4 or at + length > end:
            return None
        if kind & _ATTRIBUTE_TYPE == INET_DIAG_INFO:
            if length - 4 >= _BYTES_RETRANS_AT + 8:  # the whole of today's tcp_info
                value = at + 4
                unpack_pair = _BYTES_ACKED_RECEIVED.unpack_from
                acked, received = unpack_pair(message, value + _BYTES_ACKED_AT)
                sent, retrans = unpack_pair(message, value + _BYTES_SENT_AT)
                # tuple.__new__: the NamedTuple without its slower Python-level __new__.
                return _new(TcpCounters, (acked, received, sent, retrans))
            return tcp_counters(memoryview(message)[at + 4 : at + length])
        at += (length + 3) & ~3
    return None


def attributes(message: Buffer, start: int, end: int) -> dict[int, memoryview]:
    """type → value of the netlink attributes in ``message[start:end]``; a malformed one
    ends the walk (what came before it is kept), and each step moves at least 4 bytes."""
    found: dict[int, memoryview] = {}
    view = memoryview(message)
    end = min(end, len(message))
    while start + _ATTRIBUTE.size <= end:
        length, kind = _ATTRIBUTE.unpack_from(message, start)
        if length < _ATTRIBUTE.size or start + length > end:
            break
        found.setdefault(kind & _ATTRIBUTE_TYPE, view[start + _ATTRIBUTE.size : start + length])
        start += (length + 3) & ~3
    return found


def open_sock_diag() -> socket.socket:
    """A netlink sock_diag socket in the calling thread's network namespace."""
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)


class SockDiag:
    """One netlink sock_diag socket for dumps, kept open across polls.

    The SockDiag owns its socket: ``sock`` (one made elsewhere, e.g. inside another
    network namespace) or else one from ``opener``. A dump cut short leaves its remaining
    messages queued on the socket, so a failed dump closes it, and the next dump asks
    ``opener`` for a new one (by default a socket in the caller's namespace; for another
    namespace, an opener that enters it again). Whoever hands a socket in lets go of it:
    only ``close`` or a failed dump closes it.
    """

    def __init__(
        self,
        opener: Callable[[], socket.socket] = open_sock_diag,
        sock: socket.socket | None = None,
    ) -> None:
        self._opener = opener
        self._sock: socket.socket | None = None
        self._seq = 0
        self._buffer = bytearray(_RECEIVE_SIZE + _DIAG_ANSWER.size)
        # The kernel answers TCPDIAG_GETSOCK (``dump_tcp``); False once it refused.
        self.one_walk = True
        if sock is not None:
            self._adopt(sock)

    def _adopt(self, sock: socket.socket) -> socket.socket:
        # The kernel always ends a dump; the timeout only bounds the unforeseen.
        sock.settimeout(_DUMP_TIMEOUT)
        self._sock = sock
        return sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def dump(
        self,
        proto: str,
        family: int,
        protocol: int,
        states: dict[int, str],
        endpoints: dict[bytes, Endpoints | None],
        counters: bool = False,
    ) -> list[DiagRow]:
        """The rows of one table (``states`` names its TCP states; empty for UDP);
        ``endpoints`` caches decoded socket ids between calls. With ``counters`` each
        full TCP socket carries its tcp_info byte counters (the kernel adds them to each
        message only when asked, so without it a dump costs what it always did)."""
        rows: list[DiagRow] = []
        self._run(
            SOCK_DIAG_BY_FAMILY,
            family,
            protocol,
            states,
            {family: (proto, endpoints, rows)},
            counters,
        )
        return _swapped(rows) if _COOKIE_SWAPPED else rows

    def dump_tcp(
        self,
        tables: Mapping[int, tuple[str, dict[bytes, Endpoints | None]]],
        states: dict[int, str],
        counters: bool = False,
    ) -> dict[str, list[DiagRow]]:
        """proto → rows of the TCP tables of several families (family → (proto, its
        ``endpoints`` cache)), as ``dump`` gives them, from one walk of the kernel's TCP
        hash tables (TCPDIAG_GETSOCK) instead of one per family.

        Raises NetlinkUnavailable when the kernel refuses it, and ``one_walk`` is False
        from then on: the caller dumps each table alone, as the kernel is asked once."""
        found: dict[int, tuple[str, dict[bytes, Endpoints | None], list[DiagRow]]] = {
            family: (proto, endpoints, []) for family, (proto, endpoints) in tables.items()
        }
        try:
            self._run(
                TCPDIAG_GETSOCK, socket.AF_UNSPEC, socket.IPPROTO_TCP, states, found, counters
            )
        except NetlinkUnavailable:
            self.one_walk = False
            raise
        return {
            proto: _swapped(rows) if _COOKIE_SWAPPED else rows for proto, _, rows in found.values()
        }

    def _run(
        self,
        kind: int,
        family: int,
        protocol: int,
        states: dict[int, str],
        tables: dict[int, tuple[str, dict[bytes, Endpoints | None], list[DiagRow]]],
        counters: bool,
    ) -> None:
        """Every request of one dump (a TCP one's connections, then its listeners), its
        rows added to ``tables``' lists by family."""
        sock = self._sock
        if sock is None:
            sock = self._adopt(self._opener())
        masks = _TCP_MASKS if protocol == socket.IPPROTO_TCP else (_ALL_STATES,)
        try:
            for mask in masks:
                info = counters and protocol == socket.IPPROTO_TCP and mask != _LISTEN
                self._dump(sock, kind, family, protocol, mask, info, states, tables)
        except NetlinkUnavailable:
            raise  # the kernel's answer ended the request: nothing of it is left queued
        except BaseException:
            # A dump cut short leaves its remaining messages queued on the socket.
            self.close()
            raise

    def _dump(
        self,
        sock: socket.socket,
        kind: int,
        family: int,
        protocol: int,
        mask: int,
        info: bool,
        states: dict[int, str],
        tables: dict[int, tuple[str, dict[bytes, Endpoints | None], list[DiagRow]]],
    ) -> None:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        seq = self._seq
        sock.send(dump_request(kind, family, protocol, _EXT_INFO if info else 0, mask, seq))
        buffer = self._buffer
        unpack = _DIAG_ANSWER.unpack_from
        info_counters = _info_counters
        family_now, table = -1, None  # the family of the latest answer, and its table
        while True:
            size = sock.recv_into(buffer, _RECEIVE_SIZE)
            offset = 0
            while offset + NLMSG_HEADER.size <= size:
                # One unpack per message, the header with the inet_diag_msg that follows
                # it; the buffer's spare tail keeps this in bounds for shorter messages.
                length, answer, message_seq, answer_family, state, sockid, cookie, uid, inode = (
                    unpack(buffer, offset)
                )
                if length < NLMSG_HEADER.size:
                    raise OSError("malformed netlink message")
                if message_seq == seq:
                    if answer == kind and length >= _DIAG_ANSWER.size:
                        if answer_family != family_now:  # rare: the table changes
                            family_now = answer_family
                            table = tables.get(answer_family)
                            if table is not None:
                                proto, endpoints, rows = table
                        if table is not None:
                            try:
                                ends = endpoints[sockid]
                            except KeyError:
                                ends = endpoints[sockid] = diag_endpoints(sockid, answer_family)
                            if ends is not None:
                                laddr, lport, raddr, rport = ends
                                rows.append(
                                    (
                                        proto,
                                        laddr,
                                        lport,
                                        raddr,
                                        rport,
                                        states.get(state),
                                        inode,
                                        uid,
                                        cookie,
                                        info_counters(buffer, offset, min(offset + length, size))
                                        if info
                                        else None,
                                    )
                                )
                    elif answer == _NLMSG_DONE:
                        # A dump the kernel could not make (no handler for the protocol)
                        # ends at once, its error in the NLMSG_DONE.
                        # Any other error there (ENOMEM) is this dump's alone.
                        if length >= NLMSG_HEADER.size + _ERRNO.size:
                            (code,) = _ERRNO.unpack_from(buffer, offset + NLMSG_HEADER.size)
                            if code < 0:
                                refused = -code in _REFUSALS
                                raise (NetlinkUnavailable if refused else OSError)(
                                    -code, _error_text(-code)
                                )
                        return
                    elif answer == _NLMSG_ERROR:
                        (code,) = _ERRNO.unpack_from(buffer, offset + NLMSG_HEADER.size)
                        raise NetlinkUnavailable(-code, _error_text(-code))
                offset += (length + 3) & ~3


def dump_request(kind: int, family: int, protocol: int, ext: int, states: int, seq: int) -> bytes:
    """The netlink message that asks for a dump: SOCK_DIAG_BY_FAMILY (one family and
    protocol), or TCPDIAG_GETSOCK (TCP, every family: ``family`` and ``protocol`` are
    not sent); ``ext`` the attributes wanted per socket, ``states`` the state mask."""
    if kind == TCPDIAG_GETSOCK:
        request = _COMPAT_REQUEST.pack(socket.AF_UNSPEC, 0, 0, ext, states, 0)
    else:
        request = _DIAG_REQUEST.pack(family, protocol, ext, 0, states)
    header = NLMSG_HEADER.pack(NLMSG_HEADER.size + len(request), kind, _NLM_F_REQUEST_DUMP, seq, 0)
    return header + request


def _swapped(rows: list[DiagRow]) -> list[DiagRow]:
    """The rows with their cookies read right on a big-endian machine (rare, so not in
    the parsing loop)."""
    return [(*row[:8], _swap_halves(row[8] or 0), row[9]) for row in rows]


# A destroy broadcast's message: nlmsghdr (len, type, ...), then inet_diag_msg (family,
# (state, timer, retrans), sport, dport, src, dst, (if), cookie, and what follows, which
# the kernel leaves at 0 here).
_DESTROY_MESSAGE = struct.Struct("=IH10xB3x2s2s16s16s4xQ")
_PROTOCOLS = {
    (socket.AF_INET, socket.IPPROTO_TCP): "tcp",
    (socket.AF_INET6, socket.IPPROTO_TCP): "tcp6",
    (socket.AF_INET, socket.IPPROTO_UDP): "udp",
    (socket.AF_INET6, socket.IPPROTO_UDP): "udp6",
}
_UNSPECIFIED: dict[int, bytes] = {socket.AF_INET: bytes(4), socket.AF_INET6: bytes(16)}
# A TCP end as Linux builds it (inet_diag_handler_get_info): the message above, then
# INET_DIAG_PROTOCOL (a u8, padded to 8 bytes), then INET_DIAG_INFO (a whole tcp_info,
# with no padding attribute before it where unaligned access is cheap): the byte
# counters at fixed places. Anything else takes the walk through the attributes.
_DESTROY_TCP = struct.Struct("=IH10xB3x2s2s16s16s4xQ20xHHB3xHH120xQQ64xQQ")
_DESTROY_PROTOCOL_AT = _DIAG_MESSAGE_END + 8  # where INET_DIAG_INFO starts
_FULL_TCP_INFO = 4 + _BYTES_RETRANS_AT + 8  # its length with every counter
_ADDRESS_CACHE_SIZE = 4096  # decoded addresses the reader keeps; then it starts over


def parse_destroys(
    data: Buffer,
    size: int,
    received: float,
    addresses: dict[bytes, str] | None = None,
    netns: int | None = None,
) -> list[End]:
    """The ends in one datagram of the destroy groups (its first ``size`` bytes), each
    stamped ``received`` and ``netns`` (the namespace of the socket it came on);
    ``addresses`` caches decoded addresses between calls.
    Whatever is malformed, short or of another kind is skipped: the kernel sends one
    message per datagram, so the walk is short and bounded by ``size``.

    An abort (SO_LINGER 0) or a failed connect reaches the kernel's ``tcp_disconnect``,
    which clears the local address, the remote port and the byte counters before the
    broadcast: such an end has ``rport`` and ``counters`` None and ``laddr`` None
    (unless the socket was bound to an address), keeps the local port and the remote
    address the kernel left, and joins by its cookie alone. A socket closed before it
    had a local port gives no end, as no dump shows it.
    """
    if addresses is None:
        addresses = {}
    elif len(addresses) > _ADDRESS_CACHE_SIZE:
        addresses.clear()
    ends: list[End] = []
    offset = 0
    size = min(size, len(data))
    while offset + NLMSG_HEADER.size <= size:
        length = NLMSG_HEADER.unpack_from(data, offset)[0]
        if length < NLMSG_HEADER.size or offset + length > size:
            break
        end = _parse_destroy(data, offset, offset + length, received, addresses, netns)
        if end is not None:
            ends.append(end)
        offset += (length + 3) & ~3
    return ends


def _decode(addresses: dict[bytes, str], family: int, packed: bytes) -> str:
    text = addresses[packed] = socket.inet_ntop(family, packed)
    return text


def _parse_destroy(
    data: Buffer,
    start: int,
    stop: int,
    received: float,
    addresses: dict[bytes, str],
    netns: int | None,
) -> End | None:
    if stop - start >= _DESTROY_TCP.size:
        # A TCP end as Linux sends it: one unpack, no walk of the attributes.
        (
            _,
            kind,
            family,
            sport,
            dport,
            src,
            dst,
            cookie,
            protocol_length,
            protocol_type,
            protocol,
            info_length,
            info_type,
            acked,
            received_bytes,
            sent,
            retrans,
        ) = _DESTROY_TCP.unpack_from(data, start)
        if (
            protocol_length == 5
            and protocol_type & _ATTRIBUTE_TYPE == _INET_DIAG_PROTOCOL
            and info_type & _ATTRIBUTE_TYPE == INET_DIAG_INFO
            and info_length >= _FULL_TCP_INFO
            and start + _DESTROY_PROTOCOL_AT + info_length <= stop
            and kind == SOCK_DIAG_BY_FAMILY
        ):
            proto = _PROTOCOLS.get((family, protocol))
            if proto is None:
                return None
            full = _new(TcpCounters, (acked, received_bytes, sent, retrans))
            return _end(
                proto, family, sport, dport, src, dst, cookie, full, received, addresses, netns
            )
    if stop - start < _DIAG_MESSAGE_END:
        return None
    kind, family, sport, dport, src, dst, cookie = _DESTROY_MESSAGE.unpack_from(data, start)[1:]
    if kind != SOCK_DIAG_BY_FAMILY or family not in _UNSPECIFIED:
        return None
    found = attributes(data, start + _DIAG_MESSAGE_END, stop)
    protocol_value = found.get(_INET_DIAG_PROTOCOL)
    if protocol_value is None or len(protocol_value) < 1:
        return None
    proto = _PROTOCOLS.get((family, protocol_value[0]))
    if proto is None:
        return None
    info = found.get(INET_DIAG_INFO)
    counters = None if info is None else tcp_counters(info)
    return _end(proto, family, sport, dport, src, dst, cookie, counters, received, addresses, netns)


def _end(
    proto: str,
    family: int,
    sport: bytes,
    dport: bytes,
    src: bytes,
    dst: bytes,
    cookie: int,
    counters: TcpCounters | None,
    received: float,
    addresses: dict[bytes, str],
    netns: int | None,
) -> End | None:
    lport = int.from_bytes(sport, "big")
    if not lport:
        return None  # closed before it had a port: no dump could have shown it
    if _COOKIE_SWAPPED:
        cookie = _swap_halves(cookie)
    unspecified = _UNSPECIFIED[family]
    local, remote = src[: len(unspecified)], dst[: len(unspecified)]
    laddr: str | None = addresses.get(local) or _decode(addresses, family, local)
    raddr: str | None = addresses.get(remote) or _decode(addresses, family, remote)
    rport = int.from_bytes(dport, "big") or None
    if rport is None:
        if remote == unspecified:
            raddr = None  # never connected: no remote end, as a dump shows it
        else:
            # Connected once, then cleared by tcp_disconnect: the counters are gone, not
            # zero, and so is the local address unless the socket was bound to one.
            counters = None
            if local == unspecified:
                laddr = None
    # tuple.__new__: the NamedTuple without its slower Python-level __new__.
    return _new(End, (proto, laddr, lport, raddr, rport, cookie, received, counters, netns))

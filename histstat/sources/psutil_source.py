"""The portable source: psutil's socket table as immutable connection records."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Iterable
from typing import Any, Optional

import psutil

from histstat.records import Connection
from histstat.sources.base import NO_ENDS, Ends, SourceAccessDenied

# (proto, laddr, lport, raddr, rport, status): a socket but for its owner
SocketKey = tuple[str, str, int, Optional[str], Optional[int], Optional[str]]
Holder = tuple[Optional[int], Optional[int]]  # pid, fd

_PROTO_NAMES = {
    (socket.AF_INET, socket.SOCK_STREAM): "tcp",
    (socket.AF_INET6, socket.SOCK_STREAM): "tcp6",
    (socket.AF_INET, socket.SOCK_DGRAM): "udp",
    (socket.AF_INET6, socket.SOCK_DGRAM): "udp6",
}


_LINUX = sys.platform.startswith("linux")


def socket_identity(pid: int | None, fd: int | None) -> str | None:
    """Linux: the socket's inode ("socket:[1234]"), which tells one socket shared by
    several processes from distinct sockets bound to the same address and port
    (SO_REUSEPORT, a known way to hijack a port). None where it cannot be read."""
    if not _LINUX or pid is None or fd is None or fd < 0:
        return None
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None


def process_start_time(pid: int) -> float | None:
    """psutil's create time of ``pid``, None when it is gone or hides it."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


class _OwnerOrder:
    """Orders a socket's holders, the likeliest opener first: the earliest start time,
    the lowest pid on a tie, unknown start times last. Each pid's start time is asked
    once per snapshot at most, and only for sockets with several holders."""

    def __init__(self, start_time: Callable[[int], float | None]) -> None:
        self._start_time = start_time
        self._started: dict[int, float | None] = {}

    def owners(self, pids: Iterable[int | None]) -> tuple[int, ...]:
        known = {pid for pid in pids if pid is not None}
        if len(known) < 2:
            return tuple(known)
        started = self._started
        for pid in known:
            if pid not in started:
                started[pid] = self._start_time(pid)
        return tuple(sorted(known, key=lambda pid: _start_order(started[pid], pid)))


def _start_order(started: float | None, pid: int) -> tuple[bool, float, int]:
    return started is None, started or 0.0, pid


def _one_per_socket(
    key: SocketKey, holders: list[Holder], order: _OwnerOrder, netns: int | None
) -> list[Connection]:
    """The records for one (proto, addresses, ports, status) listed for several pids."""
    pids_by_socket: dict[str | None, list[int | None]] = {}
    for pid, fd in holders:
        pids_by_socket.setdefault(socket_identity(pid, fd), []).append(pid)
    records = []
    for pids in pids_by_socket.values():
        owners = order.owners(pids)
        pid = owners[0] if owners else None
        records.append(Connection(*key, pid=pid, owners=owners, netns=netns))
    return records


def own_namespace() -> int | None:
    """Linux: the inode of histstat's own network namespace, the only one psutil reads;
    None elsewhere or where it cannot be read."""
    if not _LINUX:
        return None
    try:
        return os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return None


def connections_from_psutil(
    entries: Iterable[Any],
    start_time: Callable[[int], float | None] = process_start_time,
    netns: int | None = None,
) -> frozenset[Connection]:
    """Turn psutil ``sconn`` entries into one Connection per socket.

    A socket held by several processes (a pre-fork server's listener, a shell's
    ``exec 3<>/dev/tcp/…`` shared with its children) is one record, whose ``owners``
    are the holders psutil lists, the likeliest opener first (the earliest
    ``start_time``, the lowest pid on a tie; unknown start times last), and whose pid
    is the first of them. On Linux psutil lists a socket once, for one of its holders;
    where a platform lists it once per holder, all of them are owners. Distinct sockets
    on the same address and port (SO_REUSEPORT) stay distinct where the platform tells
    them apart (Linux, by socket inode). Each record carries ``netns``, the network
    namespace psutil read (histstat's own).
    """
    holders_of: dict[SocketKey, list[Holder]] = {}
    for entry in entries:
        proto = _PROTO_NAMES.get((entry.family, entry.type))
        if proto is None or not entry.laddr:
            continue
        raddr = entry.raddr or None
        status = entry.status
        key = (
            proto,
            entry.laddr.ip,
            entry.laddr.port,
            raddr.ip if raddr else None,
            raddr.port if raddr else None,
            None if status in (psutil.CONN_NONE, "", None) else status,
        )
        holders_of.setdefault(key, []).append((entry.pid, entry.fd))
    order = _OwnerOrder(start_time)
    records = []
    for key, holders in holders_of.items():
        if len(holders) == 1:
            pid = holders[0][0]
            owners = () if pid is None else (pid,)
            records.append(Connection(*key, pid=pid, owners=owners, netns=netns))
        else:
            records.extend(_one_per_socket(key, holders, order, netns))
    return frozenset(records)


# psutil's kind for each set of protocols it can list alone; others take "inet".
_KINDS = {
    frozenset({"tcp", "tcp6"}): "tcp", frozenset({"udp", "udp6"}): "udp",
    frozenset({"tcp", "udp"}): "inet4", frozenset({"tcp6", "udp6"}): "inet6",
    frozenset({"tcp"}): "tcp4", frozenset({"tcp6"}): "tcp6",
    frozenset({"udp"}): "udp4", frozenset({"udp6"}): "udp6",
}  # fmt: skip


# States in which a socket is held by a process: one listed in them without a process
# may have been opened while psutil read the descriptors. (UDP has no state.)
_HELD_STATES = frozenset(
    (None, psutil.CONN_ESTABLISHED, psutil.CONN_SYN_SENT, psutil.CONN_LISTEN,
     psutil.CONN_CLOSE_WAIT)
)  # fmt: skip


def _without_owner(conn: Connection) -> Connection:
    return conn._replace(pid=None, owners=())


class PsutilSource:
    """The portable source: ``psutil.net_connections``, of the protocols asked for. It
    reads histstat's own network namespace alone (on Linux each Connection's ``netns``
    says which; containers in other namespaces need the Linux source).

    psutil reads every process's descriptors before the socket tables, so a socket
    opened between the two reads is listed without its process. A socket listed so
    for the first time, in a state a process holds, is looked up once more in the same
    snapshot (one more ``net_connections``, whose descriptor read comes after the
    first table read), rather than shown without its process."""

    name = "psutil"

    def __init__(
        self,
        protos: frozenset[str] | None = None,
        read: Callable[[str], Iterable[Any]] = lambda kind: psutil.net_connections(kind=kind),
    ) -> None:
        self._kind = _KINDS.get(frozenset(protos), "inet") if protos else "inet"
        self._read = read
        self.netns = own_namespace()
        self._ownerless: frozenset[Connection] = frozenset()  # the last snapshot's

    def _connections(self) -> frozenset[Connection]:
        try:
            entries = self._read(self._kind)
        except psutil.AccessDenied as exc:
            raise SourceAccessDenied(str(exc)) from exc
        return connections_from_psutil(entries, netns=self.netns)

    def snapshot(self, counters: bool = False) -> frozenset[Connection]:
        conns = self._connections()
        # A connection on a listening port may wait in its accept queue, held by no
        # process: a busy server's would cost a second read at every poll, and one
        # accepted meanwhile takes its listener's owner (attribution "listener").
        listening = {c.lport for c in conns if c.status == psutil.CONN_LISTEN}
        ownerless = frozenset(
            c for c in conns
            if c.pid is None and c.status in _HELD_STATES
            and (c.raddr is None or c.lport not in listening)
        )  # fmt: skip
        # Those ownerless in the last snapshot too are not asked again: a socket of a
        # process psutil cannot read would cost a second read at every poll.
        new = ownerless - self._ownerless
        self._ownerless = ownerless
        if not new:
            return conns
        found: dict[Connection, list[Connection]] = {}
        for conn in self._connections():
            if conn.pid is not None:
                found.setdefault(_without_owner(conn), []).append(conn)
        owned = [owner for conn in new for owner in found.get(conn, ())]
        if not owned:
            return conns
        return (conns - frozenset(c for c in new if c in found)) | frozenset(owned)

    def watches_ends(self) -> bool:
        return False

    def ends(self) -> Ends:
        return NO_ENDS

    def uid_of(self, conn: Connection) -> int | None:
        """psutil does not say who owns a socket whose process it cannot see."""
        return None

    def close(self) -> None:
        pass

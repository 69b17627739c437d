"""The Linux source: the kernel's socket tables and an incremental inode → process map."""

from __future__ import annotations

import os
import socket
import struct
import sys
from collections.abc import Iterable
from typing import Any, cast

import psutil

from histstat.records import Connection
from histstat.shortage import note_shortage
from histstat.sources.base import NO_ENDS, Ends
from histstat.sources.destroy import DestroyWatcher
from histstat.sources.sock_diag import DiagRow, NetlinkUnavailable, SockDiag

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
# (proto, laddr, lport, raddr, rport, status, inode, uid, cookie, counters); /proc/net
# gives no cookie and no counters.
ROW_FIELDS = (
    "proto",
    "laddr",
    "lport",
    "raddr",
    "rport",
    "status",
    "inode",
    "uid",
    "cookie",
    "counters",
)
TableRow = DiagRow


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
        row = (proto, local[0], local[1], remote[0], remote[1], status, inode, uid, None, None)
        rows.append(cast(TableRow, row))  # a local port means a local address
    return rows


def _start_time(proc: str, pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22),
    which tells a process from a later one given the same pid; None when it is gone."""
    try:
        # os.open and one read: this runs for every owning process every poll, and a
        # file object costs twice as much.
        fd = os.open(f"{proc}/{pid}/stat", os.O_RDONLY)
        try:
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
        # The command name (field 2) may hold spaces and parentheses; fields after its
        # closing parenthesis start at field 3.
        return int(data[data.rindex(b")") + 2 :].split(None, 20)[19])
    except OSError as exc:
        note_shortage(exc)  # no descriptor left: the process looks gone
        return None
    except (ValueError, IndexError):
        return None


class SocketOwners:
    """Which process holds each socket inode, learnt incrementally across polls.

    A poll whose inodes are all known reads no /proc/PID/fd at all; new inodes are looked
    for first in the processes that lately owned sockets, then from the newest pid down,
    stopping once all are found. An inode found in no process (a kernel socket, another
    user's process, one in another pid namespace) is looked for on one more poll, in case
    it was caught between being created and its descriptor being installed, then left
    alone until it leaves the table. Known owners are checked every poll by start time, so
    a pid reused by another process never keeps the old one's sockets.
    """

    UNOWNED_LOOKUPS = 2  # full scans that must miss an inode before it is left alone
    RECENT_OWNERS = 64
    UNOWNED_LIMIT = 1 << 16

    def __init__(self, proc: str = "/proc") -> None:
        self.proc = proc
        self._owner: dict[int, int] = {}  # inode → pid
        self._inodes_of: dict[int, set[int]] = {}  # pid → set of inodes
        self._started: dict[int, int | None] = {}  # pid → start time when its inodes were read
        self._misses: dict[int, int] = {}  # inode → full scans that did not find it
        self._recent: dict[int, None] = {}  # pids that owned new sockets lately, most recent last

    def owners(self, inodes: Iterable[int]) -> dict[int, int]:
        """inode → pid for the given socket inodes (0 and unowned ones are left out)."""
        current = set(inodes)
        current.discard(0)
        self._forget(current)
        self._check_owners()
        wanted = current.difference(self._owner)
        if wanted:
            wanted = {
                inode for inode in wanted if self._misses.get(inode, 0) < self.UNOWNED_LOOKUPS
            }
        if wanted:
            self._look_for(wanted)
        return self._owner

    def _forget(self, current: set[int]) -> None:
        """Drop what left the socket table, which bounds every map by its size."""
        for inode in self._owner.keys() - current:
            self._drop_inode(inode)
        if self._misses:
            for inode in self._misses.keys() - current:
                del self._misses[inode]

    def _drop_inode(self, inode: int) -> None:
        pid = self._owner.pop(inode)
        held = self._inodes_of.get(pid)
        if held is not None:
            held.discard(inode)
            if not held:
                self._drop_pid(pid)

    def _drop_pid(self, pid: int) -> None:
        for inode in self._inodes_of.pop(pid, ()):
            self._owner.pop(inode, None)
        self._started.pop(pid, None)

    def _check_owners(self) -> None:
        for pid, started in list(self._started.items()):
            if self.start_time(pid) != started:
                self._drop_pid(pid)

    def _look_for(self, wanted: set[int]) -> None:
        scanned = set()
        for pid in self._candidates():
            if pid in scanned:
                continue
            scanned.add(pid)
            started = self.start_time(pid)
            if started is None:
                continue
            held = self.socket_inodes(pid)
            if self._started.get(pid, started) != started:
                wanted.update(self._inodes_of.get(pid, ()))
                self._drop_pid(pid)  # the pid now belongs to another process
            else:
                # A descriptor number reused for another socket: what the process no
                # longer holds must be found again, maybe in a process that shares it.
                lost = self._inodes_of.get(pid, set()).difference(held)
                for inode in lost:
                    self._drop_inode(inode)
                wanted |= lost
            found = wanted.intersection(held)
            if not found:
                continue
            self._started[pid] = started
            self._inodes_of.setdefault(pid, set()).update(found)
            for inode in found:
                self._owner[inode] = pid
                self._misses.pop(inode, None)
            self._recent.pop(pid, None)
            self._recent[pid] = None
            wanted -= found
            if not wanted:
                break
        while len(self._recent) > self.RECENT_OWNERS:
            del self._recent[next(iter(self._recent))]
        for inode in wanted:
            self._misses[inode] = self._misses.get(inode, 0) + 1
        while len(self._misses) > self.UNOWNED_LIMIT:
            del self._misses[next(iter(self._misses))]

    def _candidates(self):
        """Pids in the order most likely to own a new socket: lately active owners, then
        every process from the newest pid down."""
        yield from reversed(list(self._recent))
        yield from sorted(self.pids(), reverse=True)

    # The /proc reads, one method each so tests can count or replace them.
    def pids(self) -> list[int]:
        try:
            names = os.listdir(self.proc)
        except OSError as exc:
            note_shortage(exc)
            return []
        return [int(name) for name in names if name.isdigit()]

    def start_time(self, pid: int) -> int | None:
        return _start_time(self.proc, pid)

    def socket_inodes(self, pid: int) -> set[int]:
        """The inodes of the sockets among the process's descriptors; empty when it is
        gone or denies access."""
        held: set[int] = set()
        try:
            directory = os.open(f"{self.proc}/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            note_shortage(exc)  # no descriptor left: its sockets look unowned
            return held
        try:
            for name in os.listdir(directory):
                try:
                    target = os.readlink(name, dir_fd=directory)
                except OSError:  # closed meanwhile
                    continue
                if target.startswith("socket:["):
                    held.add(int(target[8:-1]))
        except OSError as exc:  # the process ended while its descriptors were listed
            note_shortage(exc)  # (or listing them needed a descriptor none was left for)
        finally:
            os.close(directory)
        return held


class LinuxSource:
    """The Linux source: sock_diag netlink dumps (else /proc/net files) for the socket
    table, with each socket's inode, owner uid and cookie (and byte counters when asked),
    ``SocketOwners`` for the pids, and the kernel's destroy broadcasts for the ends."""

    name = "linux"

    def __init__(
        self,
        proc: str = "/proc",
        netlink: bool | None = None,
        protos: frozenset[str] | None = None,
        watch_ends: bool | None = None,
    ) -> None:
        """``netlink`` None: use it when reading the live /proc, falling back to the
        /proc/net file of any table the kernel will not dump. ``protos`` (tcp, tcp6,
        udp, udp6) leaves out the tables nobody asked for: each dump costs the kernel a
        walk of its whole hash table, however few sockets it holds. ``watch_ends`` None:
        receive the kernel's destroy broadcasts of those tables when netlink reads the
        live /proc, joined by the first snapshot, before its dump."""
        self.proc = proc
        self._tables = tuple(t for t in _TABLES if protos is None or t[0] in protos)
        self.owners = SocketOwners(proc)
        live_netlink = proc == "/proc" if netlink is None else netlink
        self._diag = SockDiag() if live_netlink else None
        if watch_ends is None:
            watch_ends = live_netlink and proc == "/proc"
        self._watcher = DestroyWatcher(t[0] for t in self._tables) if watch_ends else None
        self._watch_started = False
        self._proc_tables: set[str] = set()  # tables netlink refused: read from /proc/net
        # (proto, reader) → that reader's address cache
        self._addresses: dict[tuple[str, str], dict[bytes, Any]] = {}
        self._table_sizes: dict[
            tuple[str, str], int
        ] = {}  # (proto, reader) → rows it gave last time
        self._uids: dict[Connection, int] = {}

    def table(self, counters: bool = False) -> list[TableRow]:
        """Rows (see ``ROW_FIELDS``) of every TCP and UDP socket, IPv4 and IPv6; with
        ``counters``, netlink's TCP rows carry their byte counters."""
        rows: list[TableRow] = []
        for proto, family, protocol, stateful in self._tables:
            if self._diag is not None and proto not in self._proc_tables:
                addresses = self._address_cache(proto, "netlink")
                states = _TCP_STATES if stateful else {}
                try:
                    dumped = self._diag.dump(
                        proto, family, protocol, states, addresses, counters=counters
                    )
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
        if self._watcher is not None and not self._watch_started:
            # Joined before the first dump, so that no end falls between the two.
            self._watch_started = True
            self._watcher.start()
        rows = self.table(counters)
        owner = self.owners.owners([row[6] for row in rows]).get
        # tuple.__new__ builds the same Connection without the Python-level __new__ that
        # NamedTuple adds, a third of the per-socket cost.
        make = tuple.__new__
        uids: dict[Connection, int] = {}
        for proto, laddr, lport, raddr, rport, status, inode, uid, cookie, tcp in rows:
            pid = owner(inode) if inode else None
            conn = make(
                Connection, (proto, laddr, lport, raddr, rport, status, pid, cookie, (), tcp)
            )
            uids.setdefault(conn, uid)
        self._uids = uids
        return frozenset(uids)

    def watches_ends(self) -> bool:
        """True from the first snapshot on, while the destroy broadcasts are received."""
        return self._watcher is not None and self._watcher.watching

    def ends(self) -> Ends:
        """The ends the destroy broadcasts reported since the previous call."""
        if self._watcher is None or not self._watch_started:
            return NO_ENDS
        return self._watcher.ends()

    def uid_of(self, conn: Connection) -> int | None:
        """The owner uid the kernel reported for the socket in the latest snapshot."""
        return self._uids.get(conn)

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
        if self._diag is not None:
            self._diag.close()

"""The Linux source: the kernel's socket tables, their owners and the ends the kernel reports."""

from __future__ import annotations

import socket
import struct
import sys
from collections.abc import Callable, Mapping
from typing import Any, cast

import psutil

from histstat.records import Connection
from histstat.shortage import note_shortage
from histstat.sources.base import NO_ENDS, Ends
from histstat.sources.destroy import DestroyWatcher
from histstat.sources.namespaces import (
    NamespaceDiscovery,
    NamespaceGone,
    NamespaceRegistry,
    namespace_inode,
    short_of_descriptors_notice,
    socket_in_namespace,
    sockets_in_namespace,
)
from histstat.sources.owners import SocketOwners
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

# The TCP tables dumped together, by family, when both are asked for: each dump walks
# the kernel's whole established hash (sized by its memory), and TCPDIAG_GETSOCK walks it
# once for both families.
_ONE_WALK: dict[int, str] = {socket.AF_INET: "tcp", socket.AF_INET6: "tcp6"}

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


# The per-namespace counters of /proc/PID/net/sockstat{,6} that count what a dump of the
# four tables could show: hashed TCP sockets (listeners, connections), TIME_WAIT ones,
# bound UDP sockets ("orphan" and "alloc" are machine-wide).
_SOCKSTAT_COUNTERS = {
    b"TCP:": (b"inuse", b"tw"),
    b"UDP:": (b"inuse",),
    b"TCP6:": (b"inuse",),
    b"UDP6:": (b"inuse",),
}


def holds_no_socket(net: str) -> bool:
    """True when the counters in the /proc/PID/net directory ``net`` say its namespace
    holds no TCP or UDP socket a dump would show; False when any is counted or the
    counters cannot be read. About 20 µs, where a dump of an empty namespace walks the
    kernel's hash tables, which all namespaces share (0.8 ms for the four tables here).

    The kernel sums per-CPU counters without a lock, so under churn a count may read 0
    while a socket lives: a caller may skip a dump on it only where a socket missed for
    one poll cannot be taken for one that ended (see ``LinuxSource``)."""
    try:
        with open(f"{net}/sockstat", "rb") as handle:
            data = handle.read()
        try:
            with open(f"{net}/sockstat6", "rb") as handle:
                data += handle.read()
        except FileNotFoundError:  # IPv6 disabled
            pass
    except OSError:
        return False
    seen = set()
    for line in data.splitlines():
        fields = line.split()
        names = _SOCKSTAT_COUNTERS.get(fields[0]) if fields else None
        if names is None:
            continue
        seen.add(fields[0])
        for at in range(1, len(fields) - 1, 2):
            if fields[at] in names and fields[at + 1] != b"0":
                return False
    return seen >= {b"TCP:", b"UDP:"}  # a format not understood: dump


def _still_in(pid: int | None, inode: int, proc: str) -> bool:
    """Whether ``pid`` is (still) in namespace ``inode``."""
    if pid is None:
        return False
    try:
        return namespace_inode(pid, proc) == inode
    except OSError:
        return False


class NamespaceReader:
    """What the source holds in one network namespace other than its own: a SockDiag
    for its dumps, and its broadcast socket, which the watcher owns. Both keep the
    namespace alive; ``close`` lets go of both."""

    def __init__(self, netns: int, diag: SockDiag, watcher: DestroyWatcher | None) -> None:
        self.netns = netns
        self.diag = diag
        self.watcher = watcher  # None: its ends are not heard (inferred from polls)
        self.empty = True  # its latest dump found nothing (or none was made yet)
        self.rows: list[TableRow] = []  # its latest rows read whole

    def close(self) -> None:
        self.diag.close()
        if self.watcher is not None:
            self.watcher.leave(self.netns)


class NamespaceReaders(NamespaceRegistry[NamespaceReader]):
    """A NamespaceReader in each namespace histstat can enter: its dump socket and its
    broadcast socket made by one worker thread, the broadcasts joined before it is
    handed back (so before its first dump)."""

    def __init__(self, discovery: NamespaceDiscovery, watcher: DestroyWatcher | None) -> None:
        super().__init__(discovery)
        self.watcher = watcher
        self.representatives: Mapping[int, int] = {}  # the latest scan

    def open(self, pid: int, inode: int) -> NamespaceReader:
        watcher = self.watcher if self.watcher is not None and self.watcher.watching else None
        socks = sockets_in_namespace(pid, inode, 2 if watcher else 1, proc=self.discovery.proc)
        if watcher is not None and not watcher.join(inode, socks[1]):
            watcher = None
        return NamespaceReader(inode, SockDiag(lambda: self._reenter(inode), socks[0]), watcher)

    def _reenter(self, inode: int) -> socket.socket:
        """A new dump socket in a namespace, after a failed dump closed the last one."""
        pid = self.representatives.get(inode)
        if pid is None:
            raise NamespaceGone(0, f"no process holds namespace {inode}")
        return socket_in_namespace(pid, inode, proc=self.discovery.proc)


class LinuxSource:
    """The Linux source: sock_diag netlink dumps (else /proc/net files) for the socket
    table, with each socket's inode, owner uid and cookie (and byte counters when asked),
    ``SocketOwners`` for every pid holding it (``pid`` is the first of them, the likeliest
    opener), and the kernel's destroy broadcasts for the ends."""

    name = "linux"

    def __init__(
        self,
        proc: str = "/proc",
        netlink: bool | None = None,
        protos: frozenset[str] | None = None,
        watch_ends: bool | None = None,
        namespaces: bool | None = None,
        notice: Callable[[str], None] | None = None,
    ) -> None:
        """``netlink`` None: use it when reading the live /proc, falling back to the
        /proc/net file of any table the kernel will not dump. ``protos`` (tcp, tcp6,
        udp, udp6) leaves out the tables nobody asked for: each dump costs the kernel a
        walk of its whole hash table, however few sockets it holds. ``watch_ends`` None:
        receive the kernel's destroy broadcasts of those tables when netlink reads the
        live /proc, joined by the first snapshot, before its dump. ``namespaces`` None:
        read every network namespace in use when netlink reads the live /proc (else
        histstat's own alone); ``notice`` is told once why some cannot be read."""
        self.proc = proc
        self._tables = tuple(t for t in _TABLES if protos is None or t[0] in protos)
        self._one_walk = set(_ONE_WALK.values()) <= {t[0] for t in self._tables}
        self.owners = SocketOwners(proc)
        live_netlink = proc == "/proc" if netlink is None else netlink
        self._diag = SockDiag() if live_netlink else None
        # /proc/net shows the namespace of the process reading it, histstat's own.
        self.netns = namespace_inode("self", proc)
        if watch_ends is None:
            watch_ends = live_netlink and proc == "/proc"
        self._watcher = (
            DestroyWatcher((t[0] for t in self._tables), netns=self.netns) if watch_ends else None
        )
        self._watch_started = False
        if namespaces is None:
            namespaces = live_netlink and proc == "/proc"
        self._readers: NamespaceReaders | None = None
        if namespaces and self.netns is not None:
            self._readers = NamespaceReaders(NamespaceDiscovery(proc), self._watcher)
        self._notice = notice
        self._told = False
        self._told_unread = False
        self._proc_tables: set[str] = set()  # tables netlink refused: read from /proc/net
        # (proto, reader) → that reader's address cache
        self._addresses: dict[tuple[str, str], dict[bytes, Any]] = {}
        # (proto, reader) → rows it gave last time, in all namespaces; and this time's
        self._table_sizes: dict[tuple[str, str], int] = {}
        self._counting: dict[tuple[str, str], int] = {}
        self._uids: dict[Connection, int] = {}

    def table(self, counters: bool = False) -> list[TableRow]:
        """Rows (see ``ROW_FIELDS``) of every TCP and UDP socket of histstat's own
        namespace, IPv4 and IPv6; with ``counters``, netlink's TCP rows carry their byte
        counters."""
        rows = self._table(self._diag, f"{self.proc}/net", counters)[0]
        self._count_done()
        return rows

    def tables(self, counters: bool = False) -> list[tuple[int | None, list[TableRow]]]:
        """(namespace inode, ``table``'s rows of that namespace) of histstat's own
        namespace, then of each other namespace it reads."""
        found = [(self.netns, self._table(self._diag, f"{self.proc}/net", counters)[0])]
        if self._readers is None:
            self._count_done()
            return found
        readers = self._readers
        held = readers.discovery.scan()
        readers.representatives = held
        readers.update(held)
        self._tell_reason()
        for inode, reader in list(readers.held.items()):
            pid = held.get(inode)
            # A namespace that ended since the scan: its rows are gone with it.
            net = f"{self.proc}/{pid}/net" if pid is not None else None
            # An idle namespace's counters spare its dump. Only one whose last dump was
            # empty too: a socket a skipped dump missed (a count read low) then has no
            # story yet, and is only late, never taken for one that ended.
            if reader.empty and net is not None and holds_no_socket(net):
                continue
            rows, fell_back = self._table(reader.diag, net, counters)
            if fell_back and not _still_in(pid, inode, self.proc):
                # Its files were read through a pid that ended or left the namespace (or
                # were not read at all): unknown this poll, so its latest rows stand in,
                # and nothing of it ends, opens or takes another namespace's rows.
                rows = reader.rows
            reader.rows = rows
            reader.empty = not rows
            found.append((inode, rows))
        self._count_done()
        return found

    def _count_done(self) -> None:
        """The rows of each table in all namespaces together size its address cache."""
        self._table_sizes, self._counting = self._counting, {}

    def _tell_reason(self) -> None:
        if self._readers is None or self._notice is None:
            return
        reason = self._readers.reason
        if reason is not None and not self._told:
            self._told = True
            self._notice(reason)
        if self._readers.unread and not self._told_unread:
            self._told_unread = True
            self._notice(short_of_descriptors_notice(self._readers.unread))

    def _table(
        self, diag: SockDiag | None, files: str | None, counters: bool
    ) -> tuple[list[TableRow], bool]:
        """The rows of one namespace: netlink dumps through ``diag``, else the files in
        ``files`` (a /proc/net directory of that namespace; None: none to read); and
        whether any table fell back to the files."""
        rows: list[TableRow] = []
        fell_back = False
        walked: dict[str, list[TableRow] | None] = {}
        if diag is not None and diag.one_walk and self._one_walk:
            walked = self._dump_tcp(diag, counters)
        for proto, family, protocol, stateful in self._tables:
            if proto in walked:
                dumped = walked[proto]
                if dumped is not None:
                    rows += dumped
                    continue
            elif diag is not None and proto not in self._proc_tables:
                addresses = self._address_cache(proto, "netlink")
                states = _TCP_STATES if stateful else {}
                try:
                    dumped = diag.dump(
                        proto, family, protocol, states, addresses, counters=counters
                    )
                    self._count((proto, "netlink"), len(dumped))
                    rows += dumped
                    continue
                except NetlinkUnavailable:
                    self._proc_tables.add(proto)
                except NamespaceGone:
                    pass  # no way back in: its files, through its representative
                except (OSError, struct.error) as exc:
                    note_shortage(exc)  # this poll reads the file; netlink next poll
            fell_back = True
            if files is not None:
                rows += self._read_proc_net(files, proto)
        return rows, fell_back

    def _dump_tcp(self, diag: SockDiag, counters: bool) -> dict[str, list[TableRow] | None]:
        """Both TCP tables from one walk of the kernel's hash tables: proto → its rows,
        or → None when the dump failed this poll (its file is read, as a table dumped
        alone would be); empty when the kernel refused (``diag`` remembers it, and each
        table is dumped alone)."""
        if self._proc_tables.intersection(_ONE_WALK.values()):
            return {}
        tables = {
            family: (proto, self._address_cache(proto, "netlink"))
            for family, proto in _ONE_WALK.items()
        }
        try:
            found = diag.dump_tcp(tables, _TCP_STATES, counters=counters)
        except NetlinkUnavailable:
            return {}
        except NamespaceGone:
            return dict.fromkeys(_ONE_WALK.values())
        except (OSError, struct.error) as exc:
            note_shortage(exc)
            return dict.fromkeys(_ONE_WALK.values())
        for proto, dumped in found.items():
            self._count((proto, "netlink"), len(dumped))
        return dict(found)

    def _read_proc_net(self, directory: str, proto: str) -> list[TableRow]:
        try:
            with open(f"{directory}/{proto}", "rb") as handle:
                data = handle.read()
        except FileNotFoundError:  # IPv6 disabled, or another namespace's process ended
            return []
        except ProcessLookupError:
            return []
        parsed = parse_proc_net(data, proto, self._address_cache(proto, "proc"))
        self._count((proto, "proc"), len(parsed))
        return parsed

    def _count(self, key: tuple[str, str], rows: int) -> None:
        self._counting[key] = self._counting.get(key, 0) + rows

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
        tables = self.tables(counters)
        # Socket inodes are global: one lookup finds the holders in every namespace.
        holders = self.owners.owners([row[6] for _, rows in tables for row in rows]).get
        # tuple.__new__ builds the same Connection without the Python-level __new__ that
        # NamedTuple adds, a third of the per-socket cost.
        make = tuple.__new__
        uids: dict[Connection, int] = {}
        for netns, rows in tables:
            for proto, laddr, lport, raddr, rport, status, inode, uid, cookie, tcp in rows:
                owners = holders(inode, ()) if inode else ()
                pid = owners[0] if owners else None
                conn = make(
                    Connection,
                    (proto, laddr, lport, raddr, rport, status, pid, cookie, owners, tcp, netns),
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

    @property
    def namespaces(self) -> frozenset[int]:
        """The namespaces other than its own that the source reads now."""
        return frozenset(self._readers.held) if self._readers is not None else frozenset()

    def close(self) -> None:
        if self._readers is not None:
            self._readers.close()
        if self._watcher is not None:
            self._watcher.close()
        if self._diag is not None:
            self._diag.close()

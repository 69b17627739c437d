"""The network namespaces in use on Linux, and sockets created inside them."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import resource
import socket
import threading
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from histstat.procfs import read_stat
from histstat.shortage import note_shortage

CLONE_NEWNET = 0x40000000  # linux/sched.h
NETLINK_SOCK_DIAG = 4  # linux/netlink.h

# Without root, the ns links of other users' processes cannot be read or entered (a ptrace
# access check, which can refuse root too, e.g. for a supervisor holding capabilities
# root lacks); those namespaces are not watched, and the caller says so once.
UNPRIVILEGED_REASON = (
    "connections in other network namespaces (containers) may be missing: reading them"
    " needs root, allowed to ptrace their processes"
)
ENTER_TIMEOUT = 5.0  # seconds for a worker thread to open a socket inside a namespace


class NamespaceGone(OSError):
    """The pid no longer holds the namespace asked for: it ended, or its pid was reused
    by a process in another namespace, or it moved to another namespace."""


def process_start_time(pid: int | str, proc: str = "/proc") -> int | None:
    """The process's start time in clock ticks since boot, which tells a process from a
    later one given the same pid; None when it is gone."""
    stat = read_stat(pid, proc)
    return None if stat is None else stat.start_time


def namespace_inode(pid: int | str, proc: str = "/proc") -> int | None:
    """The inode of the network namespace of a process ("self" and "thread-self" work
    too) from its ns link, ``net:[INODE]``; None when the process is gone (a zombie has
    no namespace left). Raises PermissionError for another user's process without
    root."""
    try:
        target = os.readlink(f"{proc}/{pid}/ns/net")
    except PermissionError:
        raise
    except OSError as exc:
        note_shortage(exc)
        return None
    if not (target.startswith("net:[") and target.endswith("]")):
        return None
    try:
        return int(target[5:-1])
    except ValueError:
        return None


def _net_files_inode(pid: int | str, proc: str = "/proc") -> int | None:
    """The inode of /proc/PID/net/dev, which each network namespace has its own of, and
    which (unlike the ns link) anyone may stat: it tells whether a process another user
    owns is in histstat's namespace. None when it cannot be read (a fake /proc, a process
    gone)."""
    try:
        return os.stat(f"{proc}/{pid}/net/dev").st_ino
    except OSError:
        return None


class NamespaceDiscovery:
    """Which network namespaces processes hold, with one representative pid each, kept
    incrementally across calls of ``scan``.

    A call lists /proc and reads only the pids it has not seen (their start time and ns
    link). Each representative's ns link is read again every call, so a process that
    ended, or a pid now another's in another namespace, is never kept as the way into a
    namespace (a reused pid in the same namespace is as good a way in); when it fails,
    another known member, read again, takes its place, and a namespace without members
    is dropped. A process that stays but changes namespace (``unshare``, ``setns``, as
    ``ip netns exec`` does after fork) is found at the next call when it was new at the
    previous one, else by a sweep that re-reads the known pids in turn, paced by time (as
    the owners' sweep is), so within ``SWEEP_SECONDS`` whatever the interval. Threads are
    not looked at: a namespace held only by a thread other than a process's main thread
    is not found.
    """

    SWEEP_SECONDS = 16.0  # a pass of the sweep through every known process

    def __init__(self, proc: str = "/proc", clock: Callable[[], float] = time.monotonic) -> None:
        self.proc = proc
        self._clock = clock
        self._last_scan: float | None = None
        self._sweep_credit = 0.0  # pids the sweep owes, by the time since the last call
        own = namespace_inode("self", proc)
        if own is None:
            raise OSError(f"cannot read {proc}/self/ns/net")
        self.own = own  # histstat's own namespace, where its main thread stays
        self._own_net_files = _net_files_inode("self", proc)
        # pid → (start time, namespace inode); the inode is None when it is unreadable
        self._known: dict[int, tuple[int, int | None]] = {}
        self._members: dict[int, set[int]] = {}  # namespace inode → pids in it
        self._representative: dict[int, int] = {}  # namespace inode → pid
        self._denied: set[int] = set()  # pids whose ns link was refused (not root)
        self._sweep: list[int] = []
        self._young: list[int] = []  # pids first read by the latest call

    @property
    def denied(self) -> int:
        """How many known processes' namespaces could not be read (without root)."""
        return len(self._denied)

    @property
    def reason(self) -> str | None:
        """Why some namespaces are not seen, None when all could be read."""
        return UNPRIVILEGED_REASON if self._denied else None

    def scan(self) -> Mapping[int, int]:
        """namespace inode → a pid that holds it (histstat's own included), as of now: a
        read-only view that the next call updates."""
        listed = set(self.pids())
        known = self._known
        for pid in known.keys() - listed:
            self._forget(pid)
        self._denied.intersection_update(listed)
        # Pids first read last call are read once more: a process caught between fork
        # and unshare()/setns() (unshare(1), ip netns exec) is then seen where it went.
        for pid in self._sweep_batch() + self._young:
            if pid in known:
                self._learn(pid)
        self._young = [pid for pid in listed.difference(known) if self._learn(pid)]
        self._check_representatives()
        return MappingProxyType(self._representative)

    def members(self, inode: int) -> frozenset[int]:
        """The known pids in a namespace."""
        return frozenset(self._members.get(inode, ()))

    def _sweep_batch(self) -> list[int]:
        now = self._clock()
        elapsed = 0.0 if self._last_scan is None else now - self._last_scan
        self._last_scan = now
        share = min(max(elapsed, 0.0), self.SWEEP_SECONDS) / self.SWEEP_SECONDS
        self._sweep_credit = min(self._sweep_credit + share * len(self._known), len(self._known))
        size = int(self._sweep_credit)
        self._sweep_credit -= size
        if not self._sweep:
            self._sweep = list(self._known)
        batch = self._sweep[-size:] if size else []
        del self._sweep[len(self._sweep) - len(batch) :]
        return batch

    def _read(self, pid: int) -> tuple[int, int | None] | None:
        """(start time, namespace inode or None when refused) of a pid; None when gone."""
        started = self.start_time(pid)
        if started is None:
            return None
        try:
            inode = self.namespace_of(pid)
        except PermissionError:
            self._denied.add(pid)
            return started, None
        self._denied.discard(pid)
        if inode is None:
            return None  # ended meanwhile, or a zombie
        return started, inode

    def _learn(self, pid: int) -> tuple[int, int | None] | None:
        """Read the pid again and file it under its namespace; what it read."""
        now = self._read(pid)
        before = self._known.get(pid)
        if now == before:
            return now
        if before is not None:
            self._leave(pid, before[1])
        if now is None:
            self._known.pop(pid, None)
            return None
        self._known[pid] = now
        if now[1] is not None:
            self._members.setdefault(now[1], set()).add(pid)
        return now

    def _forget(self, pid: int) -> None:
        before = self._known.pop(pid, None)
        if before is not None:
            self._leave(pid, before[1])

    def _leave(self, pid: int, inode: int | None) -> None:
        if inode is None:
            return
        members = self._members.get(inode)
        if members is not None:
            members.discard(pid)
        if self._representative.get(inode) == pid:
            del self._representative[inode]

    def _check_representatives(self) -> None:
        # A representative found moved files itself under a namespace that may be new
        # to this call: that one is checked too, until every namespace has one.
        checked: set[int] = set()
        while True:
            unchecked = [
                inode
                for inode in self._members
                if inode not in checked or inode not in self._representative
            ]
            if not unchecked:
                return
            for inode in unchecked:
                checked.add(inode)
                self._check_representative(inode)

    def _check_representative(self, inode: int) -> None:
        members = self._members.get(inode)
        if members is None:
            return
        pid = self._representative.get(inode)
        if pid is not None:
            # Its ns link alone: whichever process has the pid now, if it is in this
            # namespace it is a way in (and entering checks the namespace again).
            with contextlib.suppress(PermissionError):
                if self.namespace_of(pid) == inode:
                    return
            self._learn(pid)
        # The representative ended or moved, or its pid is another's: another member.
        for candidate in sorted(members):
            now = self._learn(candidate)
            if now is not None and now[1] == inode:
                self._representative[inode] = candidate
                return
        if not members:
            del self._members[inode]

    # The /proc reads, one method each so tests can count or replace them.
    def pids(self) -> list[int]:
        try:
            names = os.listdir(self.proc)
        except OSError as exc:
            note_shortage(exc)
            return []
        return [int(name) for name in names if name.isdigit()]

    def start_time(self, pid: int) -> int | None:
        return process_start_time(pid, self.proc)

    def read_link(self, pid: int) -> int | None:
        return namespace_inode(pid, self.proc)

    def namespace_of(self, pid: int) -> int | None:
        """The ns link's inode; for a process whose link is refused, histstat's own
        namespace when its /proc/PID/net files are histstat's own (which needs no
        right to the process), else PermissionError."""
        try:
            return self.read_link(pid)
        except PermissionError:
            if self._own_net_files is None:
                raise
            files = _net_files_inode(pid, self.proc)
            if files is None:
                return None  # ended meanwhile
            if files == self._own_net_files:
                return self.own
            raise


_libc_setns = None


def _setns(fd: int, nstype: int) -> None:
    """setns(2): os.setns from Python 3.12, else libc's through ctypes."""
    if hasattr(os, "setns"):
        os.setns(fd, nstype)
        return
    global _libc_setns
    if _libc_setns is None:
        function = ctypes.CDLL(None, use_errno=True).setns
        function.argtypes = (ctypes.c_int, ctypes.c_int)
        function.restype = ctypes.c_int
        _libc_setns = function
    if _libc_setns(fd, nstype) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


class _Handoff:
    """What a worker thread hands back, guarded so that sockets finished after the
    caller stopped waiting are closed rather than lost."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.abandoned = False
        self.socks: list[socket.socket] | None = None
        self.error: BaseException | None = None

    def close_all(self) -> None:
        for sock in self.socks or ():
            sock.close()


def _create_inside(
    handoff: _Handoff, path: str, inode: int, family: int, kind: int, proto: int, count: int
) -> None:
    """The worker thread's whole life: enter the namespace, create the sockets, end.

    The thread is never reused: once it has called setns it belongs to the other
    namespace, and ending it is simpler to trust than moving it back.
    """
    socks: list[socket.socket] = []
    try:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError) as exc:
            raise NamespaceGone(exc.errno, f"{path}: the process ended") from None
        try:
            opened = os.fstat(fd).st_ino
            if opened != inode:
                # The pid was reused, or its process moved: not the namespace wanted.
                raise NamespaceGone(0, f"{path} is namespace {opened}, not {inode}")
            _setns(fd, CLONE_NEWNET)
        finally:
            os.close(fd)
        entered = os.stat("/proc/thread-self/ns/net").st_ino
        if entered != inode:
            raise OSError(0, f"setns entered namespace {entered}, not {inode}")
        for _ in range(count):
            socks.append(socket.socket(family, kind, proto))
    except BaseException as exc:  # handed to the caller, which raises it
        for sock in socks:
            sock.close()
        with handoff.lock:
            handoff.error = exc
        return
    with handoff.lock:
        handoff.socks = socks
        if handoff.abandoned:
            handoff.close_all()


def sockets_in_namespace(
    pid: int,
    inode: int,
    count: int = 1,
    family: int = socket.AF_NETLINK,
    kind: int = socket.SOCK_RAW,
    proto: int = NETLINK_SOCK_DIAG,
    proc: str = "/proc",
    timeout: float = ENTER_TIMEOUT,
) -> list[socket.socket]:
    """``count`` sockets (by default netlink sock_diag) created inside network namespace
    ``inode``, entered through ``pid``'s ns link by one worker thread; each stays bound to
    that namespace for its dumps and broadcasts, and keeps it alive until closed.

    The worker opens the link, checks that the opened namespace is ``inode`` (the pid
    may have been reused), enters it, creates the sockets and ends; the calling thread
    never leaves its namespace. Raises NamespaceGone when the pid no longer holds the
    namespace, PermissionError without the right to enter it, TimeoutError when the
    worker did not finish in time (its sockets, if any, are then closed).
    """
    handoff = _Handoff()
    worker = threading.Thread(
        target=_create_inside,
        args=(handoff, f"{proc}/{pid}/ns/net", inode, family, kind, proto, count),
        name=f"histstat-netns-{inode}",
        daemon=True,
    )
    try:
        worker.start()
    except RuntimeError as exc:  # no thread left to the process
        raise OSError(errno.EAGAIN, f"no thread to enter namespace {inode}: {exc}") from None
    try:
        worker.join(timeout)
    except BaseException:  # Ctrl-C while waiting: the sockets, made or to come, are closed
        with handoff.lock:
            handoff.abandoned = True
            handoff.close_all()
        raise
    with handoff.lock:
        handoff.abandoned = True
        socks, error = handoff.socks, handoff.error
    if socks is not None:
        return socks
    if error is not None:
        raise error
    raise TimeoutError(f"no socket from namespace {inode} within {timeout:g} s")


def socket_in_namespace(
    pid: int,
    inode: int,
    family: int = socket.AF_NETLINK,
    kind: int = socket.SOCK_RAW,
    proto: int = NETLINK_SOCK_DIAG,
    proc: str = "/proc",
    timeout: float = ENTER_TIMEOUT,
) -> socket.socket:
    """One socket created inside network namespace ``inode``: ``sockets_in_namespace``
    with a count of one."""
    return sockets_in_namespace(pid, inode, 1, family, kind, proto, proc, timeout)[0]


# Descriptors kept for everything else histstat opens (the owners lookup, process facts,
# output files): a host with many namespaces, or a user making them (an unprivileged
# user may, through a user namespace), must not take what the rows need.
RESERVED_DESCRIPTORS = 256


def spare_descriptors() -> int:
    """How many more descriptors the process may open (its soft RLIMIT_NOFILE less those
    open); a large number when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    try:
        used = len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0
    return soft - used


def short_of_descriptors_notice(unread: int) -> str:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    namespaces = "namespace is" if unread == 1 else "namespaces are"
    return (
        f"{unread} network {namespaces} not read, to keep {RESERVED_DESCRIPTORS} file"
        f" descriptors for the rest (ulimit -n is {soft}; each namespace read takes one or"
        " two): raise the limit to see their connections"
    )


class NamespaceChanges(NamedTuple):
    """Namespaces whose socket an ``update`` opened and closed."""

    opened: tuple[int, ...]
    closed: tuple[int, ...]


class Closeable(Protocol):
    def close(self) -> None: ...


Held = TypeVar("Held", bound=Closeable)


class NamespaceRegistry(Generic[Held]):
    """What a caller holds in each network namespace in use other than histstat's own
    (sockets, or readers of them), opened as a namespace appears and closed once no
    process holds it: a socket alone would keep a dead container's namespace, and its
    veth, alive.

    ``update`` follows the discovery; ``held`` maps each watched namespace's inode to what
    ``open`` made for it. A namespace that cannot be entered (without root) is not tried
    again while it lasts, and ``reason`` says why once there is one. A namespace whose
    ``DESCRIPTORS`` would leave fewer than ``RESERVED_DESCRIPTORS`` spare is not opened
    (``unread`` counts them) until some are free again.
    """

    DESCRIPTORS = 2  # what ``open`` takes in one namespace, at most

    def __init__(self, discovery: NamespaceDiscovery | None = None) -> None:
        self.discovery = discovery if discovery is not None else NamespaceDiscovery()
        self._held: dict[int, Held] = {}
        self._refused: set[int] = set()
        self._reason: str | None = None
        self.unread = 0  # namespaces the latest update left unread to spare descriptors

    @property
    def own(self) -> int:
        """histstat's own namespace, which has nothing here."""
        return self.discovery.own

    @property
    def held(self) -> Mapping[int, Held]:
        return MappingProxyType(self._held)

    @property
    def reason(self) -> str | None:
        """Why some namespaces are not watched (for the caller to say once), or None."""
        return self._reason or self.discovery.reason

    def update(self, held: Mapping[int, int] | None = None) -> NamespaceChanges:
        """Open in the namespaces that appeared, close in the ones gone. ``held`` is the
        discovery's latest scan when the caller made it (registries of different things
        may share one discovery); by default this call scans."""
        if held is None:
            held = self.discovery.scan()
        closed = []
        for inode in list(self._held):
            if inode not in held:
                self._held.pop(inode).close()
                closed.append(inode)
        self._refused.intersection_update(held)
        opened = []
        spare: int | None = None  # descriptors histstat may still open, read when needed
        self.unread = 0
        for inode, pid in list(held.items()):
            if inode == self.own or inode in self._held or inode in self._refused:
                continue
            if spare is None:
                spare = spare_descriptors()
            if spare - self.DESCRIPTORS < RESERVED_DESCRIPTORS:
                self.unread += 1  # tried again at the next update, without a thread
                continue
            spare -= self.DESCRIPTORS
            try:
                self._held[inode] = self.open(pid, inode)
            except NamespaceGone:
                continue  # its representative changed: tried again next update
            except PermissionError:
                self._refused.add(inode)
                self._reason = self._reason or UNPRIVILEGED_REASON
                continue
            except OSError as exc:
                note_shortage(exc)
                continue
            opened.append(inode)
        return NamespaceChanges(tuple(opened), tuple(closed))

    def open(self, pid: int, inode: int) -> Held:
        """What to hold in namespace ``inode``, entered through ``pid``; raises as
        ``sockets_in_namespace`` does."""
        raise NotImplementedError

    def close(self) -> None:
        while self._held:
            self._held.popitem()[1].close()

    def __enter__(self: Registry) -> Registry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


Registry = TypeVar("Registry", bound="NamespaceRegistry[Any]")


class NamespaceSockets(NamespaceRegistry[socket.socket]):
    """One socket per network namespace in use other than histstat's own (see
    ``NamespaceRegistry``); ``sockets`` maps each watched namespace's inode to its
    socket."""

    def __init__(
        self,
        discovery: NamespaceDiscovery | None = None,
        family: int = socket.AF_NETLINK,
        kind: int = socket.SOCK_RAW,
        proto: int = NETLINK_SOCK_DIAG,
    ) -> None:
        super().__init__(discovery)
        self._socket_type = (family, kind, proto)

    @property
    def sockets(self) -> Mapping[int, socket.socket]:
        return self.held

    def open(self, pid: int, inode: int) -> socket.socket:
        return self.open_socket(pid, inode)

    def open_socket(self, pid: int, inode: int) -> socket.socket:
        family, kind, proto = self._socket_type
        return socket_in_namespace(pid, inode, family, kind, proto, self.discovery.proc)

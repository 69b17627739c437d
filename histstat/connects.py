"""Connections attributed at connect time: the kernel's connect events, read off the poll
loop, joined into whole connects with the connecting process's facts taken at once."""

from __future__ import annotations

import os
import resource
import select
import socket
import threading
import time
from collections import OrderedDict, deque
from typing import Any, Callable, NamedTuple, Optional

import psutil

from histstat.enrich import COMMAND_LIMIT, PROCESS_FACTS, start_time
from histstat.records import ProcessFacts
from histstat.sources.namespaces import namespace_inode
from histstat.sources.trace_lines import ConnectEvent
from histstat.sources.tracefs import ConnectEventReader, process_start_time

_pidfd_open = getattr(os, "pidfd_open", None)  # Python 3.9 and later, on Linux

# How long a whole connect is remembered for the poll to find its connection: longer
# than any interval people use, and than TIME_WAIT, which keeps the 5-tuple from reuse.
CONNECT_MEMORY = 60.0
MAX_CONNECTS = 65536
# How long a connect waits for its outcome: longer than Linux's SYN retries (127 s).
PENDING_MEMORY = 150.0
MAX_PENDING = 65536
MAX_FAILED = 65536  # failed connects waiting for the next poll
# After a batch of events, the reader waits this long before it reads again: a connect
# after a quiet spell (a beacon, a one-shot tool) is read at once, within milliseconds,
# while a stream of connects wakes it at most ten times a second (each wake-up costs
# more than the events it reads: waking on every connect of 14 a second took twice the
# CPU). A process in such a stream that exits within this long of its connect may keep
# only its pid and name (see RecentProcesses).
BATCH_PAUSE = 0.1  # seconds
# Without a wake pipe (no descriptor to spare: ulimit -n), the thread looks for close()
# this often instead of sleeping until events come.
NO_PIPE_WAIT = 0.25  # seconds
# The longest a poll waits for the thread to read what waits (a flood may keep it busy).
CATCH_UP = 0.2  # seconds

_UNSPECIFIED = ("0.0.0.0", "::")
# The transitions the kernel is asked for (tcp_states.h numbers): CLOSE→SYN_SENT (the
# connect, in the connecting thread), SYN_SENT→ESTABLISHED and SYN_SENT→CLOSE (its
# outcome, with the full 4-tuple). Accepted connections need none: the poll and the
# listener's owner tell them.
CONNECT_OUTCOMES = ((7, 2), (2, 1), (2, 7))


Address = tuple[str, str, int, str, int]  # proto, laddr, lport, raddr, rport
ConnectKey = tuple[str, str, int, str, int, Optional[int]]  # and the netns inode


class Process(NamedTuple):
    """The connecting process as read at its connect: ``created`` is its start (epoch
    seconds), None when it had already exited, and then ``facts`` holds only the name the
    kernel gave (its command line, user and executable unknown). ``netns`` is the inode
    of the connecting thread's network namespace at the connect, None when it was gone
    before it could be read."""

    pid: int
    created: float | None
    facts: ProcessFacts
    netns: int | None = None


class Connect(NamedTuple):
    """One connect() and its outcome: the full 4-tuple, the times of both events, who
    made it (None: unknown, or ambiguous) and the network namespace it was made in (the
    connecting thread's; None when unknown: the event carries none)."""

    proto: str  # tcp or tcp6
    laddr: str
    lport: int
    raddr: str
    rport: int
    time: float  # wall clock of CLOSE→SYN_SENT (else of the outcome)
    end_time: float  # wall clock of the outcome
    failed: bool  # SYN_SENT→CLOSE: refused, reset or timed out
    process: Process | None
    netns: int | None = None

    @property
    def key(self) -> ConnectKey:
        """The connection's identity as the tracker has it (identity_key): the 5-tuple
        and the network namespace's inode."""
        return (self.proto, self.laddr, self.lport, self.raddr, self.rport, self.netns)

    @property
    def address(self) -> Address:
        """The 5-tuple alone, which two namespaces may share."""
        return (self.proto, self.laddr, self.lport, self.raddr, self.rport)


# Addresses as normal_address gave them lately (the same few addresses come again and
# again); past this many, they are forgotten at once.
MAX_NORMAL_ADDRESSES = 4096
_normal_addresses: dict[tuple[int, str], str] = {}


def normal_address(family: int, text: str) -> str:
    """The address as sources print it (inet_ntop), whatever the kernel's spelling."""
    known = _normal_addresses.get((family, text))
    if known is not None:
        return known
    try:
        normal = socket.inet_ntop(family, socket.inet_pton(family, text))
    except (OSError, ValueError):
        normal = text
    if len(_normal_addresses) >= MAX_NORMAL_ADDRESSES:
        _normal_addresses.clear()
    _normal_addresses[(family, text)] = normal
    return normal


def _status_tgid(tid: int) -> int | None:
    """The process (thread group) of thread ``tid``, from /proc/<tid>/status; None once
    the thread is gone."""
    try:
        with open(f"/proc/{tid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def thread_namespace(tid: int) -> int | None:
    """The inode of thread ``tid``'s network namespace (a thread may setns() alone);
    None once it is gone, or when its link cannot be read."""
    try:
        return namespace_inode(tid)
    except PermissionError:
        return None


def _known_process(event: ConnectEvent, known: KnownProcesses) -> Process | None:
    """The connecting process when it was read whole before, found without reading it
    again: the trace's tgid names it, and either a pidfd held on it says it has not
    exited (so the pid is still its own), or its start time (the key of ``known``, with
    the pid) says it is the same process. A thread other than its main one must be
    listed under it, as the tgid is a cache's hint that may name a former holder of the
    thread id. None: not known, or not sure (the caller reads the thread's status)."""
    pid = event.tgid
    if pid is None:
        return None
    found = known.running(pid)
    if found is None:
        # The pidfd first: the start time read after it says whose process it holds
        # (a pid is not given again while its process has not exited).
        pidfd = known.open_pidfd(pid)
        try:
            ticks = process_start_time(pid)
            found = None if ticks is None else known.get(pid, ticks)
        except BaseException:
            known.discard_pidfd(pidfd)
            raise
        if found is None or ticks is None:
            known.discard_pidfd(pidfd)
            return None
        known.watch(pid, ticks, pidfd)
    if event.tid != pid and not os.path.exists(f"/proc/{pid}/task/{event.tid}"):
        return None
    return found


def read_connecting_process(
    event: ConnectEvent, command_limit: int = COMMAND_LIMIT, known: KnownProcesses | None = None
) -> Process:
    """The process that ran a CLOSE→SYN_SENT, read from /proc now, with the connecting
    thread's network namespace: the thread's own status says its process while it lives
    (the trace's tgid is a cache's hint, or unknown); once it is gone, the trace's tgid
    (else the thread id) and name. A process in ``known`` (the same pid and start time)
    is not read again, its namespace included (each /proc read costs tens of
    microseconds on a cold cache: a thread that alone moves to another namespace after
    its process's first connect keeps the namespace read then)."""
    if known is not None:
        found = _known_process(event, known)
        if found is not None:
            return found
    netns = thread_namespace(event.tid)  # first: the thread may end any moment
    tgid = _status_tgid(event.tid)
    pid = tgid or event.tgid or event.tid
    gone = Process(pid, None, ProcessFacts(name=event.name), netns)
    if tgid is None:
        return gone
    ticks = process_start_time(pid)
    if ticks is None:
        return gone
    if known is not None:
        found = known.get(pid, ticks)
        if found is not None:
            return found
    try:
        proc = psutil.Process(pid)
        created = proc.create_time()
    except (psutil.Error, OSError):
        return gone
    facts = PROCESS_FACTS(proc, command_limit)
    if facts.name is None:  # it exited while being read
        return gone
    process = Process(pid, created, facts._replace(started=start_time(created)), netns)
    if known is not None:
        known.add(pid, ticks, process)
    return process


# How many of the known processes are watched through a pidfd (see KnownProcesses): a
# few, as each holds a descriptor; the ones connecting most recently.
MAX_WATCHED = 16


def _pidfd_ceiling() -> int:
    """The lowest descriptor number a pidfd may not have: half of ulimit -n (at most
    64 below it), so watching never leaves the rest of histstat short of descriptors
    (descriptors are given lowest first: a high one says the table is filling)."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return 0
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(0, min(soft // 2, soft - 64))


class KnownProcesses:
    """The connecting processes read lately, by (pid, start time in clock ticks), so a
    process connecting again and again is read from /proc once (the poll's ProcessCache
    keeps facts the same way); at most ``limit``, the least recent dropped.

    The MAX_WATCHED processes that connected last are also watched through a pidfd
    (Linux 5.3 and later): while it is not readable the process has not exited, so its
    pid names it still, and a connect of that pid needs no /proc read at all (a read of
    /proc/<pid>/stat costs about 50 µs on the reader's cold caches, a poll() of the
    pidfd a few). A pidfd is let go once its process exited and the reader is idle:
    ``exits_fileno`` is readable then (the idle reader thread sleeps on it too), and
    ``release_exited`` closes what exited; while events keep the reader busy, at most
    MAX_WATCHED stay open. ``close`` closes them all."""

    def __init__(self, limit: int = 1024, watched: int = MAX_WATCHED) -> None:
        self._limit = limit
        self._processes: OrderedDict[tuple[int, int], Process] = OrderedDict()
        self._watched_limit = watched
        # pid → (its pidfd, a poll object on it, its start time)
        self._watched: OrderedDict[int, tuple[int, Any, int]] = OrderedDict()
        # An epoll of the pidfds held, readable when one exited; only while any is held.
        self._exits: Any = None
        self._pids: dict[int, int] = {}  # pidfd → pid
        self._pidfd_ceiling = _pidfd_ceiling() if watched else 0

    def exits_fileno(self) -> int | None:
        """A descriptor readable when a watched process exited (None: none watched); it
        is closed once no process is watched, and may be another one after."""
        return None if self._exits is None else self._exits.fileno()

    def release_exited(self) -> None:
        """Close the pidfds of the watched processes that exited."""
        if not self._pids:
            return
        try:
            exited = self._exits.poll(0)
        except OSError:
            return
        for pidfd, _ in exited:
            pid = self._pids.get(pidfd)
            if pid is not None:
                self._unwatch(pid)

    def running(self, pid: int) -> Process | None:
        """The known process watched under ``pid``, if its pidfd says it has not exited;
        None otherwise (then the caller checks its start time)."""
        watch = self._watched.get(pid)
        if watch is None:
            return None
        pidfd, poller, ticks = watch
        process = None
        try:
            if not poller.poll(0):
                process = self._processes.get((pid, ticks))
        except (OSError, ValueError):
            pass
        if process is None:  # it exited, or was forgotten: its pid may be another's
            self._unwatch(pid)
        else:
            self._processes.move_to_end((pid, ticks))
            self._watched.move_to_end(pid)
        return process

    def open_pidfd(self, pid: int) -> int:
        """A pidfd on whatever process holds ``pid`` now, or -1 (none can be had, or
        descriptors are getting scarce). Whose process it holds is for the caller to
        say, by the start time it reads after this (see ``watch``)."""
        if pid in self._watched or not self._pidfd_ceiling or _pidfd_open is None:
            return -1
        try:
            pidfd = _pidfd_open(pid)
        except OSError:  # gone, no pidfds before Linux 5.3, no descriptor to spare
            return -1
        if pidfd >= self._pidfd_ceiling:
            os.close(pidfd)
            return -1
        return pidfd

    def watch(self, pid: int, ticks: int, pidfd: int) -> None:
        """Watch the known process (``pid``, ``ticks``) through ``pidfd``, opened before
        ``ticks`` was read (-1: nothing to watch)."""
        if pidfd < 0:
            return
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        try:
            if self._exits is None:
                self._exits = select.epoll()
            self._exits.register(pidfd, select.EPOLLIN)
        except OSError:  # then it could not be let go at its exit
            os.close(pidfd)
            return
        self._watched[pid] = (pidfd, poller, ticks)
        self._pids[pidfd] = pid
        while len(self._watched) > self._watched_limit:
            self._unwatch(next(iter(self._watched)))

    @staticmethod
    def discard_pidfd(pidfd: int) -> None:
        if pidfd >= 0:
            os.close(pidfd)

    def _unwatch(self, pid: int) -> None:
        watch = self._watched.pop(pid, None)
        if watch is not None:
            pidfd = watch[0]
            del self._pids[pidfd]
            try:
                self._exits.unregister(pidfd)
            except OSError:
                pass
            os.close(pidfd)
            if not self._watched:  # no descriptor is kept for nothing to watch
                self._exits.close()
                self._exits = None

    def close(self) -> None:
        """Close every pidfd held, and the epoll of their exits."""
        while self._watched:
            self._unwatch(next(iter(self._watched)))
        self._pidfd_ceiling = 0

    def get(self, pid: int, ticks: int) -> Process | None:
        process = self._processes.get((pid, ticks))
        if process is not None:
            self._processes.move_to_end((pid, ticks))
        return process

    def add(self, pid: int, ticks: int, process: Process) -> None:
        self._processes[(pid, ticks)] = process
        while len(self._processes) > self._limit:
            self._processes.popitem(last=False)


# How long after a process was read whole its facts stand in for it once it is gone:
# a burst of connects followed by an exit (a scan) may outrun the reader by
# milliseconds, while a pid is taken again only after the kernel's whole pid range.
RECENT_PROCESS = 1.0  # seconds
MAX_RECENT_PROCESSES = 1024


class RecentProcesses:
    """The processes lately read whole, by pid: a connect whose process was gone by the
    time it was read takes their facts when the same pid was read alive moments before
    (RECENT_PROCESS), under the same name."""

    def __init__(self) -> None:
        self._read: OrderedDict[int, tuple[float, Process]] = OrderedDict()

    def fill(self, process: Process, when: float) -> Process:
        """``process`` as read at a connect at ``when`` (wall clock), filled in from an
        earlier read when it was already gone."""
        if process.created is not None:
            self._read[process.pid] = (when, process)
            self._read.move_to_end(process.pid)
            while len(self._read) > MAX_RECENT_PROCESSES:
                self._read.popitem(last=False)
            return process
        known = self._read.get(process.pid)
        if known is None:
            return process
        read_at, earlier = known
        name = process.facts.name or ""
        if 0 <= when - read_at <= RECENT_PROCESS and (earlier.facts.name or "").startswith(name):
            return earlier  # the kernel's name is the comm: 15 bytes of the name at most
        return process


class _Pending(NamedTuple):
    event: ConnectEvent
    process: Process


class ConnectJoiner:
    """Joins each CLOSE→SYN_SENT to its outcome (SYN_SENT→ESTABLISHED or →CLOSE) by
    family, destination and order, and the source address and port where the connect
    already had them; then keeps the whole connects for the poll (bounded: CONNECT_MEMORY
    seconds, MAX_CONNECTS of them), by the connection's identity: its 5-tuple and
    network namespace.

    Two connects pending to one destination from different processes, with no source
    port yet, cannot be told apart: the outcome takes no process, and ``ambiguous``
    counts it, rather than a guess. A connect whose namespace is unknown (its thread
    ended before it was read) is given to a connection of that 5-tuple only when no
    other namespace's connect has the 5-tuple and no other namespace asked for it
    before; otherwise ``ambiguous_namespace`` counts it (see ``connect_of``).
    """

    def __init__(self, own_netns: int | None = None) -> None:
        self.own_netns = own_netns  # the namespace of the connections a 5-tuple asks for
        self._pending: dict[tuple[int, str, int], deque[_Pending]] = {}
        self._pending_count = 0
        self._connects: OrderedDict[ConnectKey, Connect] = OrderedDict()
        # The namespaces each remembered 5-tuple was connected in (None: unknown).
        self._namespaces: dict[Address, dict[int | None, None]] = {}
        # A connect of unknown namespace → the namespace that took it, or AMBIGUOUS.
        self._taken: dict[ConnectKey, object] = {}
        self._failed: deque[Connect] = deque()
        self.ambiguous = 0
        self.ambiguous_namespace = 0
        self.unmatched = 0  # outcomes whose connect was never seen
        self.dropped = 0  # connects given up for lack of room

    def connected(self, event: ConnectEvent, process: Process) -> None:
        """A CLOSE→SYN_SENT, with its process read."""
        key = (event.family, normal_address(event.family, event.daddr), event.dport)
        if self._pending_count >= MAX_PENDING:
            self._expire_pending(event.time, force=True)
        self._pending.setdefault(key, deque()).append(_Pending(event, process))
        self._pending_count += 1

    def finished(self, event: ConnectEvent) -> Connect:
        """A SYN_SENT→ESTABLISHED or →CLOSE: the whole connect it ends."""
        family = event.family
        saddr = normal_address(family, event.saddr)
        daddr = normal_address(family, event.daddr)
        key = (family, daddr, event.dport)
        queue = self._pending.get(key)
        chosen = None
        if queue:
            for index, pending in enumerate(queue):
                if pending.event.sport in (0, event.sport) and (
                    pending.event.saddr in _UNSPECIFIED
                    or pending.event.saddr == event.saddr  # then their normal forms are too
                    or normal_address(family, pending.event.saddr) == saddr
                ):
                    chosen = index
                    break
        process = None
        netns = None
        started = event.time
        if chosen is None:
            self.unmatched += 1
        else:
            assert queue is not None
            pending = queue[chosen]
            del queue[chosen]
            self._pending_count -= 1
            if not queue:
                del self._pending[key]
            started = pending.event.time
            process = pending.process
            netns = process.netns
            if pending.event.sport == 0 and queue:
                rivals = [other.process for other in queue if other.event.sport == 0]
                if any(_who(other) != _who(process) for other in rivals):
                    self.ambiguous += 1
                    process = None
                if any(other.netns != netns for other in rivals):
                    netns = None  # which of their namespaces is not known either
        connect = Connect(
            "tcp" if family == socket.AF_INET else "tcp6",
            saddr,
            event.sport,
            daddr,
            event.dport,
            started,
            event.time,
            event.newstate == "CLOSE",
            process,
            netns,
        )
        self._remember(connect)
        if connect.failed:
            if len(self._failed) >= MAX_FAILED:
                self._failed.popleft()
                self.dropped += 1
            self._failed.append(connect)
        return connect

    def _remember(self, connect: Connect) -> None:
        address: Address = connect[:5]  # connect.address, without a property's frame
        key: ConnectKey = (*address, connect.netns)
        if key in self._connects:
            self._forget(key)  # the 5-tuple was used again: the older connect goes
        self._connects[key] = connect
        self._namespaces.setdefault(address, {})[connect.netns] = None
        while len(self._connects) > MAX_CONNECTS:
            self._forget(next(iter(self._connects)))

    def _forget(self, key: ConnectKey) -> None:
        connect = self._connects.pop(key)
        self._taken.pop(key, None)
        namespaces = self._namespaces.get(connect.address)
        if namespaces is not None:
            namespaces.pop(connect.netns, None)
            if not namespaces:
                del self._namespaces[connect.address]

    def _expire_pending(self, now: float, force: bool = False) -> None:
        for key in list(self._pending):
            queue = self._pending[key]
            while queue and (force or now - queue[0].event.time > PENDING_MEMORY):
                queue.popleft()
                self._pending_count -= 1
                if force:
                    self.dropped += 1
                    force = False
            if not queue:
                del self._pending[key]

    def expire(self, now: float) -> None:
        """Forget connects older than their memories (``now``: wall clock)."""
        while self._connects:
            key, oldest = next(iter(self._connects.items()))
            if now - oldest.end_time <= CONNECT_MEMORY:
                break
            self._forget(key)
        self._expire_pending(now)

    def connect_of(self, key: tuple[Any, ...], alone: bool = True) -> Connect | None:
        """The latest whole connect of the connection ``key``, if remembered: (proto,
        laddr, lport, raddr, rport, netns) as identity_key gives it, or the 5-tuple alone
        for a connection of histstat's own namespace (``own_netns``).

        A connect in that namespace comes first. Else one whose namespace is unknown is
        given when nothing says it may be another connection's: ``alone`` (the caller
        knows no other live connection with this 5-tuple), no connect of another
        namespace has the 5-tuple, and no other namespace took it before; otherwise it
        is given to none, and counted once in ``ambiguous_namespace``."""
        address = tuple(key[:5])
        netns = key[5] if len(key) > 5 else self.own_netns
        found = self._connects.get((*address, netns))
        if found is not None or netns is None:
            return found
        unknown_key: ConnectKey = (*address, None)
        unknown = self._connects.get(unknown_key)
        if unknown is None:
            return None
        taken = self._taken.get(unknown_key)
        if taken == netns:
            return unknown
        if taken is None and alone and len(self._namespaces.get(unknown.address, ())) == 1:
            self._taken[unknown_key] = netns
            return unknown
        if taken is not _AMBIGUOUS:
            self._taken[unknown_key] = _AMBIGUOUS
            self.ambiguous_namespace += 1
        return None

    def take_failed(self) -> list[Connect]:
        """The failed connects since the last call, in order."""
        failed = list(self._failed)
        self._failed.clear()
        return failed


_AMBIGUOUS = object()  # a connect of unknown namespace that two namespaces could own


def _who(process: Process | None) -> tuple[int, float | None] | None:
    return None if process is None else (process.pid, process.created)


class ConnectWatcher:
    """A thread that reads a ConnectEventReader as events come (poll() on its
    descriptor, never a blocking read), reads each connecting process from /proc at
    once, since it may exit within milliseconds, and joins the events (ConnectJoiner).
    The poll loop asks ``connect_of`` and ``take_failed``; ``close`` stops the thread
    and removes the tracefs instance.

    The thread sleeps in poll() until events come, with no timeout: an idle machine
    costs nothing. After a batch it pauses BATCH_PAUSE; a byte on its wake pipe ends a
    sleep or a pause early (``catch_up``, ``close``).
    """

    def __init__(
        self,
        reader: ConnectEventReader,
        command_limit: int = COMMAND_LIMIT,
        read_process: Callable[..., Process] = read_connecting_process,
    ) -> None:
        self._reader = reader
        self._command_limit = command_limit
        self._read_process = read_process
        self._joiner = ConnectJoiner(own_netns=thread_namespace(os.getpid()))
        self._recent = RecentProcesses()
        self._known = KnownProcesses()
        self._lock = threading.Lock()
        self._stop = False
        # The thread's cycle (a read and its events handled), for catch_up.
        self._state_lock = threading.Lock()  # the thread takes it bare: no Python frame
        self._state = threading.Condition(self._state_lock)
        self._cycles = 0
        self._busy = False  # reading, or handling what a read gave
        self._catching_up = 0  # callers of catch_up waiting for a cycle
        self._probe = select.poll()  # the poll loop's look at what waits in the kernel
        self._probe.register(reader.fileno(), select.POLLIN)
        try:
            self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:  # no descriptor to spare: the thread wakes every NO_PIPE_WAIT
            self._wake_read = self._wake_write = -1
        self.thread_error: str | None = None
        # Events whose handling failed (a /proc read, say): each is lost alone, counted.
        self.unhandled = 0
        self.unhandled_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="histstat-connects", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        waiting = select.poll()  # for events, or a wake
        waiting.register(self._reader.fileno(), select.POLLIN)
        pausing = select.poll()  # for a wake alone
        sleep: float | None = None  # until events come
        if self._wake_read >= 0:
            waiting.register(self._wake_read, select.POLLIN)
            pausing.register(self._wake_read, select.POLLIN)
        else:
            sleep = NO_PIPE_WAIT * 1000
        exits: int | None = None  # the known processes' exits, as registered in waiting
        try:
            while not self._stop:
                with self._state_lock:
                    self._busy = True
                try:
                    # Read before any poll(): text the kernel formatted for a read cut
                    # short waits in the reader, and poll() does not report it.
                    events = self._reader.read()
                    if events:
                        self._handle(events)
                finally:
                    with self._state_lock:
                        self._busy = False
                        self._cycles += 1
                        if self._catching_up:  # a poll waits (notify_all costs, cold)
                            self._state.notify_all()
                if self._stop:
                    break
                if events:
                    woken = pausing.poll(BATCH_PAUSE * 1000)
                else:
                    # A watched process's exit wakes the thread, to let its pidfd go.
                    self._known.release_exited()  # else an exit would end the sleep at once
                    watching = self._known.exits_fileno()
                    if watching != exits:
                        if exits is not None:
                            waiting.unregister(exits)
                        if watching is not None:
                            waiting.register(watching, select.POLLIN)
                        exits = watching
                    woken = waiting.poll(sleep)
                if woken and any(fd == self._wake_read for fd, _ in woken):
                    self._drain_wake()
        except (OSError, ValueError) as exc:  # the reader closed under us, or tracefs went
            if not self._stop:
                self.thread_error = str(exc)
        finally:
            with self._state:
                self._state.notify_all()

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_read, 512):
                pass
        except BlockingIOError:
            pass

    def _wake(self) -> None:
        if self._wake_write < 0:
            return
        try:
            os.write(self._wake_write, b"!")
        except BlockingIOError:
            pass  # the pipe is full of wakes already

    def _cycle_after(self, start: int) -> Callable[[], bool]:
        return lambda: self._cycles > start

    def _readable(self) -> bool:
        """Whether events wait in the kernel for the thread to read."""
        try:
            return bool(self._probe.poll(0))
        except (OSError, ValueError):
            return False

    def catch_up(self, timeout: float = CATCH_UP) -> None:
        """Return once the thread has handled the events that waited when called (so a
        poll's sockets find their connects), or after ``timeout`` seconds under a flood."""
        deadline = time.monotonic() + timeout
        with self._state:
            while self._thread.is_alive():
                if not (self._busy or self._readable()):
                    return
                self._wake()  # ends a pause
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._catching_up += 1
                try:
                    self._state.wait_for(self._cycle_after(self._cycles), remaining)
                finally:
                    self._catching_up -= 1

    def _handle(self, events: list[ConnectEvent]) -> None:
        """Join a read's events, in order: each connect's process is read first (at once:
        it may exit any moment), then all are joined under one taking of the lock. An
        event whose handling fails is lost alone, and counted."""
        joins: list[tuple[ConnectEvent, Process | None]] = []
        for event in events:
            oldstate = event.oldstate
            if oldstate == "CLOSE":
                if event.newstate != "SYN_SENT":
                    continue
                try:
                    process = self._read_process(event, self._command_limit, self._known)
                    joins.append((event, self._recent.fill(process, event.time)))
                except (OSError, ValueError) as exc:
                    self._unhandled(exc)
            elif oldstate == "SYN_SENT" and event.newstate in ("ESTABLISHED", "CLOSE"):
                joins.append((event, None))  # an outcome
        if not joins:
            return
        joiner = self._joiner
        with self._lock:
            for event, joining in joins:
                try:
                    if joining is None:
                        joiner.finished(event)
                    else:
                        joiner.connected(event, joining)
                except (OSError, ValueError) as exc:
                    self._unhandled(exc)

    def _unhandled(self, exc: Exception) -> None:
        self.unhandled += 1
        self.unhandled_error = str(exc)

    def connect_of(self, key: tuple[Any, ...], alone: bool = True) -> Connect | None:
        """See ConnectJoiner.connect_of."""
        with self._lock:
            return self._joiner.connect_of(key, alone)

    def take_failed(self) -> list[Connect]:
        """The failed connects since the last call; older connects are forgotten."""
        with self._lock:
            self._joiner.expire(time.time())
            return self._joiner.take_failed()

    def lost_since_told(self) -> int:
        """Events lost (the ring buffer overran) since the last call."""
        try:
            return self._reader.lost_events()
        except (OSError, ValueError):
            return 0

    @property
    def ambiguous(self) -> int:
        """Connects left unattributed: two processes connected to one destination."""
        with self._lock:
            return self._joiner.ambiguous

    @property
    def ambiguous_namespace(self) -> int:
        """Connects of unknown namespace left unattributed: their 5-tuple was another
        namespace's too."""
        with self._lock:
            return self._joiner.ambiguous_namespace

    def close(self) -> str | None:
        """Stop the thread, then remove the instance; returns why it could not be
        removed, or None. Safe to call again."""
        self._stop = True
        self._wake()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(NO_PIPE_WAIT + 5.0)
        if not self._thread.is_alive():
            self._known.close()
            if self._wake_write >= 0:
                os.close(self._wake_read)
                os.close(self._wake_write)
                self._wake_read = self._wake_write = -1
        return self._reader.close()


def connects_notice(reason: str) -> str:
    """What --kernel-events auto says when connect events cannot be had."""
    return (
        f"no kernel connect events ({reason}): connections shorter than the poll interval "
        "go unattributed and failed connects unseen"
    )

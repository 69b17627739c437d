"""Connections attributed at connect time: the kernel's connect events, read off the poll
loop, joined into whole connects with the connecting process's facts taken at once."""

from __future__ import annotations

import select
import socket
import threading
import time
from collections import OrderedDict, deque
from typing import Any, Callable, NamedTuple

import psutil

from histstat.enrich import COMMAND_LIMIT, PROCESS_FACTS, start_time
from histstat.records import ProcessFacts
from histstat.sources.trace_lines import ConnectEvent
from histstat.sources.tracefs import ConnectEventReader, process_start_time

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
WAIT = 0.25  # seconds a read waits for events, so that close() is heard promptly
# The longest a poll waits for the thread to read what waits (a flood may keep it busy).
CATCH_UP = 0.2  # seconds
LOSS_CHECK_EVERY = 1.0  # seconds between two looks at the ring buffer's loss counters

_UNSPECIFIED = ("0.0.0.0", "::")
# The transitions the kernel is asked for (tcp_states.h numbers): CLOSE→SYN_SENT (the
# connect, in the connecting thread), SYN_SENT→ESTABLISHED and SYN_SENT→CLOSE (its
# outcome, with the full 4-tuple). Accepted connections need none: the poll and the
# listener's owner tell them.
CONNECT_OUTCOMES = ((7, 2), (2, 1), (2, 7))


class Process(NamedTuple):
    """The connecting process as read at its connect: ``created`` is its start (epoch
    seconds), None when it had already exited, and then ``facts`` holds only the name the
    kernel gave (its command line, user and executable unknown)."""

    pid: int
    created: float | None
    facts: ProcessFacts


class Connect(NamedTuple):
    """One connect() and its outcome: the full 4-tuple, the times of both events, and
    who made it (None: unknown, or ambiguous)."""

    proto: str  # tcp or tcp6
    laddr: str
    lport: int
    raddr: str
    rport: int
    time: float  # wall clock of CLOSE→SYN_SENT (else of the outcome)
    end_time: float  # wall clock of the outcome
    failed: bool  # SYN_SENT→CLOSE: refused, reset or timed out
    process: Process | None

    @property
    def key(self) -> tuple[str, str, int, str, int]:
        """The connection's identity as the tracker has it (identity_key)."""
        return (self.proto, self.laddr, self.lport, self.raddr, self.rport)


def normal_address(family: int, text: str) -> str:
    """The address as sources print it (inet_ntop), whatever the kernel's spelling."""
    try:
        return socket.inet_ntop(family, socket.inet_pton(family, text))
    except (OSError, ValueError):
        return text


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


def read_connecting_process(
    event: ConnectEvent, command_limit: int = COMMAND_LIMIT, known: KnownProcesses | None = None
) -> Process:
    """The process that ran a CLOSE→SYN_SENT, read from /proc now: the thread's own
    status says its process while it lives (the trace's tgid is a cache's hint, or
    unknown); once it is gone, the trace's tgid (else the thread id) and name. A process
    in ``known`` (the same pid and start time) is not read again."""
    tgid = _status_tgid(event.tid)
    pid = tgid or event.tgid or event.tid
    gone = Process(pid, None, ProcessFacts(name=event.name))
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
    process = Process(pid, created, facts._replace(started=start_time(created)))
    if known is not None:
        known.add(pid, ticks, process)
    return process


class KnownProcesses:
    """The connecting processes read lately, by (pid, start time in clock ticks), so a
    process connecting again and again is read from /proc once (the poll's ProcessCache
    keeps facts the same way); at most ``limit``, the least recent dropped."""

    def __init__(self, limit: int = 1024) -> None:
        self._limit = limit
        self._processes: OrderedDict[tuple[int, int], Process] = OrderedDict()

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
    seconds, MAX_CONNECTS of them).

    Two connects pending to one destination from different processes, with no source
    port yet, cannot be told apart: the outcome takes no process, and ``ambiguous``
    counts it, rather than a guess.
    """

    def __init__(self) -> None:
        self._pending: dict[tuple[int, str, int], deque[_Pending]] = {}
        self._pending_count = 0
        self._connects: OrderedDict[tuple[str, str, int, str, int], Connect] = OrderedDict()
        self._failed: deque[Connect] = deque()
        self.ambiguous = 0
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
                    or normal_address(family, pending.event.saddr) == saddr
                ):
                    chosen = index
                    break
        process = None
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
            if pending.event.sport == 0 and any(
                other.event.sport == 0 and _who(other.process) != _who(process) for other in queue
            ):
                self.ambiguous += 1
                process = None
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
        )
        self._connects[connect.key] = connect
        self._connects.move_to_end(connect.key)
        while len(self._connects) > MAX_CONNECTS:
            self._connects.popitem(last=False)
        if connect.failed:
            if len(self._failed) >= MAX_FAILED:
                self._failed.popleft()
                self.dropped += 1
            self._failed.append(connect)
        return connect

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
            oldest = next(iter(self._connects.values()))
            if now - oldest.end_time <= CONNECT_MEMORY:
                break
            self._connects.popitem(last=False)
        self._expire_pending(now)

    def connect_of(self, key: tuple[Any, ...]) -> Connect | None:
        """The latest whole connect of the connection ``key`` (proto, laddr, lport,
        raddr, rport), if remembered."""
        return self._connects.get(key)

    def take_failed(self) -> list[Connect]:
        """The failed connects since the last call, in order."""
        failed = list(self._failed)
        self._failed.clear()
        return failed


def _who(process: Process | None) -> tuple[int, float | None] | None:
    return None if process is None else (process.pid, process.created)


class ConnectWatcher:
    """A thread that reads a ConnectEventReader as events come (poll() on its
    descriptor, never a blocking read), reads each connecting process from /proc at
    once, since it may exit within milliseconds, and joins the events (ConnectJoiner).
    The poll loop asks ``connect_of`` and ``take_failed``; ``close`` stops the thread
    and removes the tracefs instance."""

    def __init__(
        self,
        reader: ConnectEventReader,
        command_limit: int = COMMAND_LIMIT,
        read_process: Callable[..., Process] = read_connecting_process,
    ) -> None:
        self._reader = reader
        self._command_limit = command_limit
        self._read_process = read_process
        self._joiner = ConnectJoiner()
        self._recent = RecentProcesses()
        self._known = KnownProcesses()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._lost = 0
        self._lost_told = 0
        # The thread's cycle (a read and its events handled), for catch_up.
        self._state = threading.Condition()
        self._cycles = 0
        self._busy = False  # handling what a read gave
        self._pausing = False  # waiting BATCH_PAUSE after a batch
        self._wake = threading.Event()  # ends the pause: the poll wants what waits
        self.thread_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="histstat-connects", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        next_loss_check = 0.0
        woken = False
        try:
            while not self._stop.is_set():
                events = self._reader.read(0.0 if woken else WAIT)
                with self._state:
                    self._busy = True
                try:
                    for event in events:
                        self._handle(event)
                    now = time.monotonic()
                    if now >= next_loss_check:
                        next_loss_check = now + LOSS_CHECK_EVERY
                        lost = self._reader.lost_events()
                        with self._lock:
                            self._lost += lost
                            self._joiner.expire(time.time())
                finally:
                    with self._state:
                        self._busy = False
                        self._cycles += 1
                        self._state.notify_all()
                woken = False
                if events and not self._stop.is_set():
                    with self._state:
                        self._pausing = True
                    woken = self._wake.wait(BATCH_PAUSE)
                    self._wake.clear()
                    with self._state:
                        self._pausing = False
        except (OSError, ValueError) as exc:  # the reader closed under us, or tracefs went
            if not self._stop.is_set():
                self.thread_error = str(exc)
        finally:
            with self._state:
                self._state.notify_all()

    def _cycle_after(self, start: int) -> Callable[[], bool]:
        return lambda: self._cycles > start

    def _readable(self) -> bool:
        """Whether events wait in the kernel for the thread to read."""
        try:
            poller = select.poll()
            poller.register(self._reader.fileno(), select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return False

    def catch_up(self, timeout: float = CATCH_UP) -> None:
        """Return once the thread has handled the events that waited when called (so a
        poll's sockets find their connects), or after ``timeout`` seconds under a flood."""
        deadline = time.monotonic() + timeout
        with self._state:
            while self._thread.is_alive():
                readable = self._readable()
                if not (self._busy or readable):
                    return
                if self._pausing:
                    self._wake.set()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._state.wait_for(self._cycle_after(self._cycles), remaining)

    def _handle(self, event: ConnectEvent) -> None:
        if event.oldstate == "CLOSE" and event.newstate == "SYN_SENT":
            process = self._read_process(event, self._command_limit, self._known)
            process = self._recent.fill(process, event.time)
            with self._lock:
                self._joiner.connected(event, process)
        elif event.oldstate == "SYN_SENT" and event.newstate in ("ESTABLISHED", "CLOSE"):
            with self._lock:
                self._joiner.finished(event)

    def connect_of(self, key: tuple[Any, ...]) -> Connect | None:
        with self._lock:
            return self._joiner.connect_of(key)

    def take_failed(self) -> list[Connect]:
        with self._lock:
            return self._joiner.take_failed()

    def lost_since_told(self) -> int:
        """Events lost (the ring buffer overran) since the last call."""
        with self._lock:
            lost = self._lost - self._lost_told
            self._lost_told = self._lost
        return lost

    @property
    def ambiguous(self) -> int:
        with self._lock:
            return self._joiner.ambiguous

    def close(self) -> str | None:
        """Stop the thread, then remove the instance; returns why it could not be
        removed, or None. Safe to call again."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(WAIT + 5.0)
        return self._reader.close()


def connects_notice(reason: str) -> str:
    """What --kernel-events auto says when connect events cannot be had."""
    return (
        f"no kernel connect events ({reason}): connections shorter than the poll interval "
        "go unattributed and failed connects unseen"
    )

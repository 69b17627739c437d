"""One poll from source to rows, and the in-order writing of rows that wait for facts."""

from __future__ import annotations

import datetime
import time
from collections import deque
from concurrent.futures import Future, wait
from typing import TYPE_CHECKING, Callable, NamedTuple

from histstat.enrich import ProcessCache, user_name
from histstat.filters import RowFilter
from histstat.hashing import Hashes
from histstat.records import Connection, ProcessFacts, Row
from histstat.tracker import ConnectionTracker, EndpointMemory, ListenerMemory

if TYPE_CHECKING:  # optional stages, imported by the CLI only when asked for
    from histstat.geoip import GeoIP
    from histstat.resolve import ReverseResolver

# The longest a row waits for its executable's hashes before it is written with them
# unknown: a huge or slow file (a hostile process may choose one) cannot hold back the
# stream, and rows behind it keep their order.
MAX_HASH_WAIT = 3.0


# The longest a row waits for its remote address's name (-r) before it is written with
# it unknown: DNS answers in milliseconds or not at all.
MAX_NAME_WAIT = 0.5


class Fill(NamedTuple):
    """A fact that arrives later (hashes, a name): its future, how it goes into the
    row, and how long the row may wait for it."""

    future: Future
    apply: Callable
    max_wait: float


def _with_hashes(row: Row, hashes: Hashes) -> Row:
    return row._replace(md5=hashes.md5, sha256=hashes.sha256)


def _with_name(row: Row, name: str | None) -> Row:
    return row._replace(rhost=name)


class PendingRow(NamedTuple):
    """A row and the facts it waits for."""

    row: Row
    fills: tuple = ()
    queued: float = 0.0  # monotonic time it was found

    def ready(self, now: float | None = None) -> bool:
        """Every fill is known, or waited for as long as it may be."""
        now = time.monotonic() if now is None else now
        return all(f.future.done() or now >= self.queued + f.max_wait for f in self.fills)

    def waiting(self) -> tuple:
        """(futures still awaited, the monotonic time the row stops waiting for them)."""
        open_fills = [f for f in self.fills if not f.future.done()]
        give_up = max((self.queued + f.max_wait for f in open_fills), default=self.queued)
        return [f.future for f in open_fills], give_up

    def resolved(self) -> Row:
        """The row with every fact known by now; what is not known stays unknown."""
        row = self.row
        for fill in self.fills:
            if fill.future.done() and not fill.future.cancelled():  # cancelled at exit
                row = fill.apply(row, fill.future.result())
        return row


def make_row(conn: Connection, facts: ProcessFacts, seen: datetime.datetime, **more) -> Row:
    return Row(
        *conn,
        pname=facts.name,
        user=facts.user,
        command=facts.command,
        exe=facts.exe,
        md5=None,
        sha256=None,
        timestamp=seen,
        **more,
    )


class Owner(NamedTuple):
    """Who held an endpoint: enough to attribute its orphan later."""

    pid: int
    facts: ProcessFacts | None  # None: its row was filtered out, facts never read
    hashes: Future | None
    seen: float = 0.0  # wall-clock time it was seen owned, to detect a reused pid


class Poller:
    """source → tracker → filters → enrich: the rows of one poll.

    Besides new connections it reports, with ``closed``, those gone since the previous
    poll, repeating their open row's facts. It fills ``direction`` from the listeners
    it remembers and attributes sockets the kernel keeps without a process to the
    process that held the same endpoint earlier.
    """

    def __init__(
        self,
        source,
        tracker: ConnectionTracker,
        processes: ProcessCache,
        row_filter: RowFilter | None = None,
        closed: bool = False,
        resolver: ReverseResolver | None = None,
        geoip: GeoIP | None = None,
    ) -> None:
        self._source = source
        self._tracker = tracker
        self._processes = processes
        self._filter = row_filter or RowFilter()
        self._closed = closed
        self._resolver = resolver
        self._geoip = geoip
        self._listeners = ListenerMemory()
        self._endpoints = EndpointMemory()
        self._shown: dict = {}  # with --closed: open rows shown, by connection

    def poll(self) -> list:
        # Local time with its UTC offset, taken once: every row of a poll shares it.
        seen = datetime.datetime.now().astimezone()
        now = time.monotonic()
        new, gone = self._tracker.changes(self._source.snapshot(), now)
        rows = [self._close_row(conn, seen, now) for conn in gone]
        rows = [row for row in rows if row is not None]
        # A process's socket turns orphan in the kernel the moment it lets go, so an
        # orphan of a connection gone this poll is among this poll's new pid-less ones.
        orphans = {conn[:5] for conn in new if conn.pid is None}
        for conn in gone:
            if conn.status == "LISTEN":
                self._listeners.closed(conn, now)
            if conn.pid is not None:
                self._endpoints.touch(conn, now, orphaned=conn[:5] in orphans)
            else:  # an orphan's story ended: its endpoint may be someone else's next
                self._endpoints.forget(conn)
        # Listeners first, so that a connection accepted in the same poll reads "in".
        for conn in new:
            if conn.status == "LISTEN":
                self._listeners.opened(conn)
        for conn in new:
            row = self._open_row(conn, seen, now)
            if row is not None:
                rows.append(row)
        self._endpoints.forget_expired(now)
        self._listeners.forget_expired(now)
        self._processes.retain(self._tracker.live_pids())
        return rows

    def _close_row(self, conn: Connection, seen: datetime.datetime, now: float):
        opened = self._shown.pop(conn, None)
        if opened is None:
            return None
        duration, from_start = self._tracker.lifetime(conn)
        row = opened.row._replace(
            event="close",
            duration=round(duration, 6),
            duration_from_start=from_start,
            timestamp=seen,
        )
        # The open row's waits, already spent: a close row never waits again.
        return PendingRow(row, opened.fills, opened.queued)

    def _socket_user(self, conn: Connection) -> str | None:
        """The user the kernel names as the socket's owner, where the source knows it:
        an unprivileged run sees other users' sockets without their pids, but not
        without their uid. Never for TIME_WAIT, which the kernel reports as uid 0."""
        uid_of = getattr(self._source, "uid_of", None)
        if uid_of is None or conn.status == "TIME_WAIT":
            return None
        uid = uid_of(conn)
        return None if uid is None else user_name(uid)

    def _owner(self, conn: Connection) -> Owner | None:
        """The earlier holder of an orphan's endpoint, with its facts."""
        if conn.pid is not None or conn.raddr is None:
            return None
        owner = self._endpoints.owner_of(conn)
        if owner is not None and owner.facts is None:  # its own row was filtered out
            created = self._processes.created(owner.pid)
            if created is not None and created > owner.seen + 1.0:
                return None  # that pid is another process now: never a wrong owner
            facts = self._processes.lookup(owner.pid) if created is not None else None
            facts = facts or ProcessFacts()  # exited since: the pid alone is known
            owner = owner._replace(facts=facts, hashes=self._processes.hashes(owner.pid, facts))
        return owner

    def _open_row(self, conn: Connection, seen: datetime.datetime, now: float):
        owner = self._owner(conn)
        pid = owner.pid if owner is not None else conn.pid
        if not self._filter.keeps_connection(conn if owner is None else conn._replace(pid=pid)):
            if conn.pid is not None:  # its orphan may need it, at no process cost now
                self._endpoints.remember(conn, Owner(conn.pid, None, None, time.time()), now)
            return None  # decided on socket fields: no process lookup spent on it
        facts = owner.facts if owner is not None else self._processes.lookup(conn.pid)
        if not self._filter.keeps_process(facts):
            return None
        hashes = owner.hashes if owner is not None else self._processes.hashes(pid, facts)
        if owner is None and conn.pid is not None:
            self._endpoints.remember(conn, Owner(conn.pid, facts, hashes), now)
        attribution = "earlier" if owner is not None else "socket" if pid is not None else None
        if facts.user is None and owner is None:
            facts = facts._replace(user=self._socket_user(conn))
        place = self._geoip.place_of(conn.raddr) if self._geoip is not None else None
        row = make_row(
            conn._replace(pid=pid),
            facts,
            seen,
            direction=self._listeners.direction(conn, now),
            attribution=attribution,
            **(place._asdict() if place is not None else {}),
        )
        fills = []
        if hashes is not None:
            fills.append(Fill(hashes, _with_hashes, MAX_HASH_WAIT))
        if self._resolver is not None and conn.raddr is not None:
            name = self._resolver.name_of(conn.raddr)
            if name is not None:
                fills.append(Fill(name, _with_name, MAX_NAME_WAIT))
        pending = PendingRow(row, tuple(fills), now)
        if self._closed:
            self._shown[conn] = pending
        return pending


class OrderedWriter:
    """Writes rows in the order they were found, each once its hashes are known.

    ``outputs`` pairs a view (row → what its sink takes: a line, or values for a
    database) with a sink, files first and stdout last. Ready rows go out as a batch,
    one sink after the other, each sink flushed (a database committed) before the next
    gets the batch: a row shown on stdout is already saved. A terminal's view may differ
    from the log's (width, colour); sinks sharing a view share one formatted line. With
    ``limit``, writing stops for good after that many rows.
    """

    def __init__(self, outputs: list, limit: int | None = None) -> None:
        self._outputs = outputs
        self._limit = limit
        self._queue: deque = deque()
        self.written = 0

    @property
    def done(self) -> bool:
        return self._limit is not None and self.written >= self._limit

    def add(self, rows: list) -> None:
        self._queue.extend(rows)

    def write_ready(self, deadline: float, final: bool = False) -> None:
        """Write queued rows in order, waiting for hashes until ``deadline`` (a monotonic
        time). A row whose hashes took MAX_HASH_WAIT, or any row when ``final``, goes out
        with what is known: nothing found is ever dropped."""
        while True:
            ready = self._ready_count(final)
            if ready:
                self._emit(ready)
            if not self._queue or self.done or final:
                return
            awaited, give_up = self._queue[0].waiting()
            now = time.monotonic()
            if now >= give_up:
                continue  # its wait is over: it goes out with those facts unknown
            if now >= deadline:
                return  # the poll's time is up; the facts may still come
            wait(awaited, timeout=min(deadline, give_up) - now)

    def _ready_count(self, final: bool) -> int:
        """How many rows at the head of the queue may go out now."""
        room = len(self._queue) if self._limit is None else self._limit - self.written
        count = 0
        now = time.monotonic()
        for pending in self._queue:
            if count >= room:
                break
            if not (final or pending.ready(now)):
                break
            count += 1
        return count

    def _emit(self, count: int) -> None:
        rows = [self._queue[i].resolved() for i in range(count)]
        made: dict = {}
        for view, sink in self._outputs:
            items = made.get(view)
            if items is None:
                items = made[view] = [view(row) for row in rows]
            for item in items:
                sink.write(item)
            sink.flush()
        # Taken off the queue only once every sink has them: an interrupt mid-batch
        # may repeat a row at the final write, never lose one.
        for _ in range(count):
            self._queue.popleft()
        self.written += count

    def pending(self) -> int:
        return len(self._queue)

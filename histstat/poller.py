"""One poll from source to rows: source → tracker → filters → enrich."""

from __future__ import annotations

import datetime
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, NamedTuple

from histstat.attribution import Endpoint, EndpointMemory, ListenerMemory
from histstat.enrich import ProcessCache, user_name
from histstat.filters import RowFilter
from histstat.hashing import Hashes
from histstat.pending import Fill, PendingRow
from histstat.records import Connection, ProcessFacts, Row
from histstat.tracker import ConnectionTracker

if TYPE_CHECKING:  # optional stages, imported by the runner only when asked for
    from histstat.geoip import GeoIP
    from histstat.resolve import ReverseResolver
    from histstat.sources import Source

# The longest a row waits for its executable's hashes before it is written with them
# unknown: a huge or slow file (a hostile process may choose one) cannot hold back the
# stream, and rows behind it keep their order.
MAX_HASH_WAIT = 3.0


# The longest a row waits for its remote address's name (-r) before it is written with
# it unknown: DNS answers in milliseconds or not at all.
MAX_NAME_WAIT = 0.5


def _with_hashes(row: Row, hashes: Hashes) -> Row:
    return row._replace(md5=hashes.md5, sha256=hashes.sha256)


def _with_name(row: Row, name: str | None) -> Row:
    return row._replace(rhost=name)


def make_row(conn: Connection, facts: ProcessFacts, seen: datetime.datetime, **more) -> Row:
    return Row(
        *conn[:7],  # proto to pid: what a row shows of the socket
        pname=facts.name,
        user=facts.user,
        command=facts.command,
        command_length=facts.command_length,
        exe=facts.exe,
        ppid=facts.ppid,
        parent=facts.parent,
        args=facts.args,
        started=facts.started,
        md5=None,
        sha256=None,
        timestamp=seen,
        **more,
    )


class Owner(NamedTuple):
    """Who held an endpoint: enough to attribute its orphan later."""

    pid: int
    facts: ProcessFacts | None  # None: its row was filtered out, facts never read
    hashes: Future[Hashes] | None
    seen: float = 0.0  # wall-clock time it was seen owned, to detect a reused pid


class Poller:
    """source → tracker → filters → enrich: the rows of one poll.

    Besides new connections it reports, with ``closed``, those gone since the previous
    poll, repeating their open row's facts. It fills ``direction`` from the listeners
    it remembers and attributes sockets the kernel keeps without a process to the
    process that held the same endpoint earlier.

    With ``skip_existing`` the connections of the first poll get no rows, open or close,
    nor do their later states (a CLOSE_WAIT, the TIME_WAIT they leave) while their
    endpoints stay in the table; yet they teach the memories all the same: a listener
    that was already there still makes later connections on its port "in".
    """

    def __init__(
        self,
        source: Source,
        tracker: ConnectionTracker,
        processes: ProcessCache,
        row_filter: RowFilter | None = None,
        closed: bool = False,
        resolver: ReverseResolver | None = None,
        geoip: GeoIP | None = None,
        skip_existing: bool = False,
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
        self._shown: dict[Connection, PendingRow] = {}  # with --closed: open rows shown
        self._skip_existing = skip_existing
        self._polled = False
        # --skip-existing: the endpoints of the first poll's connections, while the
        # table still holds a socket on them; their later states are the same story.
        self._existing: set[Endpoint] = set()

    def poll(self) -> list[PendingRow]:
        # Local time with its UTC offset, taken once: every row of a poll shares it.
        seen = datetime.datetime.now().astimezone()
        now = time.monotonic()
        new, gone = self._tracker.changes(self._source.snapshot(), now)
        first = not self._polled
        if self._skip_existing and first:
            self._existing = {conn[:5] for conn in new}
        elif self._existing and any(conn[:5] in self._existing for conn in gone):
            self._existing &= {conn[:5] for conn in self._tracker.current}
        self._polled = True
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
            row = self._open_row(conn, seen, now, conn[:5] not in self._existing, first)
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
        if conn.status == "TIME_WAIT":
            return None
        uid = self._source.uid_of(conn)
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

    def _open_row(
        self,
        conn: Connection,
        seen: datetime.datetime,
        now: float,
        shown: bool = True,
        from_start: bool = False,
    ):
        """The open row of a new connection; None when the filters leave it out, or when
        it is not ``shown`` (--skip-existing), learnt from then as if it were.
        ``from_start``: it was there at histstat's first poll."""
        owner = self._owner(conn)
        pid = owner.pid if owner is not None else conn.pid
        if not self._filter.keeps_connection(conn if owner is None else conn._replace(pid=pid)):
            if conn.pid is not None:  # its orphan may need it, at no process cost now
                self._endpoints.remember(conn, Owner(conn.pid, None, None, time.time()), now)
            return None  # decided on socket fields: no process lookup spent on it
        if owner is not None:
            assert owner.facts is not None  # _owner reads the facts of one filtered out
            facts = owner.facts
        else:
            facts = self._processes.lookup(conn.pid)
        if not self._filter.keeps_process(facts):
            return None
        hashes = owner.hashes if owner is not None else self._processes.hashes(pid, facts)
        if owner is None and conn.pid is not None:
            self._endpoints.remember(conn, Owner(conn.pid, facts, hashes), now)
        if not shown:
            # Learnt from exactly as a shown row, facts and hashes included: its process
            # may be gone by the time its orphan appears.
            return None
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
            duration_from_start=from_start,
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

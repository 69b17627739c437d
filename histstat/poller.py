"""One poll from source to rows: source → tracker → filters → enrich."""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from histstat.attribution import ListenerKey, ListenerMemory
from histstat.enrich import ProcessCache, user_name
from histstat.filters import RowFilter
from histstat.hashing import Hashes
from histstat.pending import Fill, PendingRow
from histstat.records import (
    MAX_OWNERS,
    UNKNOWN_PROCESS,
    Connection,
    ProcessFacts,
    ProcessRef,
    Row,
    sort_key,
)
from histstat.sources.base import NO_ENDS
from histstat.tracker import Change, ConnectionTracker, Story, payload_bytes

if TYPE_CHECKING:  # optional stages, imported by the runner only when asked for
    from histstat.connects import Connect, ConnectWatcher, Process
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


def fact_fields(facts: ProcessFacts) -> dict[str, Any]:
    """A row's fields that come from its process."""
    return {
        "pname": facts.name,
        "user": facts.user,
        "command": facts.command,
        "command_length": facts.command_length,
        "exe": facts.exe,
        "ppid": facts.ppid,
        "parent": facts.parent,
        "args": facts.args,
        "started": facts.started,
        "args_count": facts.args_count,
        "container": facts.container,
    }


def make_row(conn: Connection, facts: ProcessFacts, seen: datetime.datetime, **more) -> Row:
    # proto to pid: what a row shows of the socket
    shown: dict[str, Any] = dict(zip(Row._fields[:7], conn[:7]))
    return Row(
        **shown,
        **fact_fields(facts),
        netns=conn.netns,
        md5=None,
        sha256=None,
        timestamp=seen,
        **more,
    )


class Owner(NamedTuple):
    """Who held a socket: enough to attribute its later, ownerless states."""

    pid: int
    facts: ProcessFacts | None  # None: not read yet (its rows were filtered out)
    hashes: Future[Hashes] | None
    seen: float = 0.0  # wall-clock time it was seen holding it, to detect a reused pid
    owners: tuple[int, ...] = ()  # every holder then, the likeliest opener first


class StoryRows:
    """What the poller keeps of one story: its owner, its open row once shown, and its
    direction; ``skipped`` (--skip-existing) stories never get a row."""

    __slots__ = ("owner", "opened", "direction", "skipped", "connect", "hashable", "listener")

    def __init__(self, skipped: bool) -> None:
        self.owner: Owner | None = None
        self.connect: Connect | None = None  # the connect event its owner came from
        self.hashable = True  # False: the owner's pid may be another process now
        self.listener = False  # its owner is the listener's it arrived on
        self.opened: PendingRow | None = None
        self.direction: str | None = None  # decided with the open row
        self.skipped = skipped


def _filled(facts: ProcessFacts, more: ProcessFacts) -> ProcessFacts:
    """``facts`` with what it does not know taken from ``more``."""
    return ProcessFacts._make(
        mine if mine is not None else theirs for mine, theirs in zip(facts, more)
    )


def _wall_time(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds).astimezone()


class Poller:
    """source → tracker → filters → enrich: the rows of one poll.

    One story per socket (the tracker's): an ``open`` row the first time it passes the
    filters, ``state`` rows for its later states with ``transitions``, a ``close`` row
    at its end with ``closed``, and ``update`` rows of its bytes every ``update``
    seconds. The owner found at any poll stays with the story: rows of a moment when no
    process held the socket say ``attribution: "earlier"``. It fills ``direction`` from
    the listeners it remembers.

    With ``skip_existing`` the stories of the first poll get no rows, whatever happens
    to them later (their remainders are the same stories); yet they teach the memories
    all the same: a listener that was already there still makes later connections on
    its port "in".
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
        transitions: bool = False,
        update: float | None = None,
        notice: Callable[[str], None] | None = None,
        connects: ConnectWatcher | None = None,
    ) -> None:
        self._source = source
        self._connects = connects
        self._tracker = tracker
        self._processes = processes
        self._filter = row_filter or RowFilter()
        self._closed = closed
        self._resolver = resolver
        self._geoip = geoip
        self._listeners = ListenerMemory()
        # An open listener's key → its story's rows, whose owner accepted sockets take.
        self._listener_rows: dict[ListenerKey, StoryRows] = {}
        self._skip_existing = skip_existing
        self._transitions = transitions
        self._update = update
        self._next_update = -math.inf
        self._notice = notice
        self._polled = False
        self._told_ambiguous: set[str] = set()  # --container values said to name several

    def poll(self) -> list[PendingRow]:
        self._processes.begin_poll()
        # Local time with its UTC offset, taken once: every row of a poll shares it.
        seen = datetime.datetime.now().astimezone()
        now = time.monotonic()
        due = self._update is not None and now >= self._next_update
        snapshot = self._source.snapshot(counters=True) if due else self._source.snapshot()
        # Asked after the snapshot: the Linux source joins the end events at its first.
        watches = self._source.watches_ends()
        ends = self._source.ends() if watches else NO_ENDS
        failed: Sequence[Connect] = ()
        if self._connects is not None:
            # Every socket of the snapshot made its connect events already: read them, so
            # that its story finds its connect.
            self._connects.catch_up()
            failed = self._connects.take_failed()
        result = self._tracker.update(snapshot, now, ends, watches, seen.timestamp(), failed)
        first = not self._polled
        self._polled = True
        # Listeners first, so that a connection accepted in the same poll reads "in".
        for change in result.changes:
            if change.kind == "open" and change.conn.status == "LISTEN":
                self._listeners.opened(change.conn)
        rows: list[PendingRow] = []
        for change in result.changes:
            row = self._row_of(change, seen, now, first)
            if row is not None:
                rows.append(row)
        if due:
            assert self._update is not None
            self._next_update = now + self._update
            rows.extend(self._update_rows(seen, now))
        if result.inferred_after_loss is not None and self._notice is not None:
            count = result.inferred_after_loss
            self._notice(
                "the kernel dropped end events (its buffer overflowed): "
                f"{count} {'end was' if count == 1 else 'ends were'} inferred from the socket "
                "table, at the poll's time and without bytes"
            )
        if self._connects is not None and self._notice is not None:
            lost = self._connects.lost_since_told()
            if lost:
                self._notice(
                    f"the kernel's trace buffer overran: {lost} connect "
                    f"{'event was' if lost == 1 else 'events were'} lost, and the "
                    "connections they told of may go unattributed"
                )
        self._tell_ambiguous_containers()
        self._listeners.forget_expired(now)
        # A story keeps its owner's facts itself: the cache needs only the live owners.
        self._processes.retain(self._tracker.live_pids())
        return rows

    def _tell_ambiguous_containers(self) -> None:
        """Say once of each --container prefix that it named a second container: its
        rows are shown too, and the analyst may have meant one."""
        chosen = self._filter.container_filter
        if chosen is None or self._notice is None:
            return
        for value, ids in chosen.ambiguous().items():
            if value not in self._told_ambiguous:
                self._told_ambiguous.add(value)
                self._notice(
                    f"--container {value} names {len(ids)} containers, and rows of each are "
                    f"shown: {', '.join(ids)}"
                )

    def _row_of(self, change: Change, seen: datetime.datetime, now: float, first: bool):
        story, conn = change.story, change.conn
        if change.kind == "open":
            story.rows = StoryRows(self._skip_existing and first)
        rows: StoryRows = story.rows
        if change.kind == "open" and conn.status == "LISTEN":
            self._listener_rows[ListenerMemory.key_of(conn)] = rows
        if conn.pid is not None and change.kind != "close":
            self._learn_owner(rows, conn)
        if change.kind == "close":
            if story.conn.status == "LISTEN":
                self._listeners.closed(story.conn, now)
                key = ListenerMemory.key_of(story.conn)
                if self._listener_rows.get(key) is rows:
                    del self._listener_rows[key]
            return self._close_row(story, seen) if self._closed else None
        if rows.skipped:
            return None
        if rows.opened is None:
            return self._open_row(story, conn, seen, now)
        if change.kind == "state" and self._transitions:
            if not self._filter.keeps_connection(self._with_owner(conn, rows)):
                return None
            return self._later_row(story, conn, "state", seen)
        return None

    def _learn_owner(self, rows: StoryRows, conn: Connection) -> None:
        assert conn.pid is not None
        # A poll saw its holder: later ownerless moments are "earlier", not the event's.
        rows.connect = None
        rows.listener = False
        owners = conn.owners or (conn.pid,)
        known = rows.owner
        if known is not None and known.pid == conn.pid:
            if known.owners != owners:
                rows.owner = known._replace(owners=owners, seen=time.time())
            return
        rows.owner = Owner(conn.pid, None, None, time.time(), owners)

    @staticmethod
    def _with_owner(conn: Connection, rows: StoryRows) -> Connection:
        """The record as filters see it: an ownerless moment keeps the story's owner."""
        if conn.pid is None and rows.owner is not None:
            return conn._replace(pid=rows.owner.pid, owners=rows.owner.owners)
        return conn

    @staticmethod
    def _attribution(conn: Connection, rows: StoryRows) -> str:
        """How the row's process was found (docs/story.md)."""
        if conn.pid is not None:
            return "socket"
        if rows.connect is not None:
            return "connect"
        return "listener" if rows.listener else "earlier"

    def _owner_from_listener(self, conn: Connection, rows: StoryRows) -> None:
        """An accepted connection no process was seen holding takes the owner of the
        listener it arrived on (the process that would accept it)."""
        key = self._listeners.listener_of(conn)
        listener = self._listener_rows.get(key) if key is not None else None
        if listener is None or listener.owner is None:
            return
        rows.owner = listener.owner._replace(owners=(listener.owner.pid,))
        rows.listener = True

    def _owner_from_connect(self, story: Story, rows: StoryRows) -> None:
        """The process the kernel's connect event gave, for a story no poll saw owned:
        its pid now, its facts once the row passes the filters (``_owner_facts``)."""
        assert self._connects is not None
        # The key has the namespace; a connect whose namespace is unknown is given to
        # it only where no other namespace may own it (ConnectJoiner.connect_of): no
        # other connection of the 5-tuple in another namespace is known either.
        connect = story.connect or self._connects.connect_of(
            story.key, alone=not self._tracker.shares_address(story)
        )
        if connect is None or connect.process is None:
            return
        pid = connect.process.pid
        rows.connect = connect
        rows.owner = Owner(pid, None, None, connect.time, (pid,))

    def _owner_facts(self, owner: Owner, rows: StoryRows) -> Owner | None:
        """The owner with its facts read; None when its pid is another process now."""
        if owner.facts is not None:
            return owner
        connect = rows.connect
        if connect is not None and connect.process is not None:
            return self._connect_owner_facts(owner, connect.process, rows)
        seen = owner.seen
        created, facts = self._processes.start_and_facts(
            owner.pid, lambda created: created <= seen + 1.0
        )
        if facts is None:
            return None  # that pid is another process now: never a wrong owner
        return owner._replace(facts=facts)  # exited: the pid alone is known (no facts)

    def _connect_owner_facts(self, owner: Owner, process: Process, rows: StoryRows) -> Owner:
        """The connecting process's facts: from the cache while that process (pid and
        start time) lives, else as read at the connect; a process gone by then keeps its
        pid and name alone. Its executable is hashed only while it lives."""
        facts = process.facts
        alive = False
        if process.created is not None:
            created, cached = self._processes.start_and_facts(
                process.pid, lambda created: created == process.created
            )
            alive = cached is not None and created == process.created
            if cached is not None and alive:
                if cached.command or not facts.command:
                    facts = cached
                else:  # a zombie (exited, not yet reaped): its command line went with it
                    facts = _filled(facts, cached)
        rows.hashable = alive
        return owner._replace(facts=facts)

    def _socket_user(self, conn: Connection) -> str | None:
        """The user the kernel names as the socket's owner, where the source knows it:
        an unprivileged run sees other users' sockets without their pids, but not
        without their uid. Never for TIME_WAIT, which the kernel reports as uid 0."""
        if conn.status == "TIME_WAIT":
            return None
        uid = self._source.uid_of(conn)
        return None if uid is None else user_name(uid)

    def _owner_refs(self, owner: Owner) -> tuple[tuple[ProcessRef, ...], int]:
        """The holders as a row lists them (at most MAX_OWNERS), and how many."""
        assert owner.facts is not None
        refs = []
        for pid in owner.owners[:MAX_OWNERS]:
            name = owner.facts.name if pid == owner.pid else self._processes.lookup(pid).name
            refs.append(ProcessRef(pid, name))
        return tuple(refs), len(owner.owners)

    def _open_row(self, story: Story, conn: Connection, seen: datetime.datetime, now: float):
        """The story's open row, the first time it passes the filters; None until then.
        One known only by its end event was learnt of when that event came."""
        if story.end_wall is not None and story.life_unseen:
            seen = _wall_time(story.end_wall)
        rows: StoryRows = story.rows
        if not self._filter.keeps_socket(conn):
            return None  # decided on socket fields: no owner searched, no process read
        if rows.owner is None and conn.pid is None and self._connects is not None:
            self._owner_from_connect(story, rows)
        if rows.owner is None and conn.pid is None:
            self._owner_from_listener(conn, rows)
        shown = self._with_owner(conn, rows)
        if not self._filter.keeps_owner(shown):
            return None  # decided on the owner's pid: no process lookup spent on it
        owner = rows.owner
        if owner is not None:
            owner = self._owner_facts(owner, rows)
            if owner is None:  # its pid was reused: the story has no known owner
                rows.owner = None
                shown = conn
                if not self._filter.keeps_connection(shown):
                    return None
            else:
                rows.owner = owner
        facts = owner.facts if owner is not None and owner.facts is not None else UNKNOWN_PROCESS
        if not self._filter.keeps_process(facts):
            return None
        if owner is not None and owner.hashes is None and rows.hashable:  # only rows kept
            owner = rows.owner = owner._replace(hashes=self._processes.hashes(owner.pid, facts))
        attribution = None
        if owner is not None:
            attribution = self._attribution(conn, rows)
        if rows.connect is not None:  # when it happened, not when a poll saw it
            seen = _wall_time(rows.connect.time)
        if facts.user is None and attribution != "earlier":  # the socket's own owner uid
            facts = facts._replace(user=self._socket_user(conn))
        owners, count = self._owner_refs(owner) if owner is not None else (None, None)
        # Decided when shown, from the listeners known by then: /proc/net/tcp (psutil)
        # may miss a listener in the poll that first lists a connection it accepted.
        rows.direction = self._listeners.direction(conn, now)
        place = self._geoip.place_of(conn.raddr) if self._geoip is not None else None
        row = make_row(
            shown._replace(pid=owner.pid if owner is not None else None),
            facts,
            seen,
            direction=rows.direction,
            attribution=attribution,
            duration_from_start=story.from_start,  # open rows too: formats tell what predates
            owners=owners,
            owners_count=count,
            **(place._asdict() if place is not None else {}),
        )
        fills = []
        hashes = owner.hashes if owner is not None else None
        if hashes is not None:
            fills.append(Fill(hashes, _with_hashes, MAX_HASH_WAIT))
        if self._resolver is not None and conn.raddr is not None:
            name = self._resolver.name_of(conn.raddr)
            if name is not None:
                fills.append(Fill(name, _with_name, MAX_NAME_WAIT))
        rows.opened = PendingRow(row, tuple(fills), now)
        return rows.opened

    def _later_row(self, story: Story, conn: Connection, event: str, seen: datetime.datetime,
                   **more) -> PendingRow:  # fmt: skip
        """A row after the open row: its facts, the socket's state and attribution now."""
        rows: StoryRows = story.rows
        opened = rows.opened
        assert opened is not None
        row = opened.row
        fills = opened.fills
        owner = rows.owner
        if row.pid is None and owner is not None:  # an owner found since the open row
            found = self._owner_facts(owner, rows)
            if found is not None and found.facts is not None:
                facts = found.facts
                if found.hashes is None:
                    found = found._replace(hashes=self._processes.hashes(found.pid, facts))
                rows.owner = found
                refs, count = self._owner_refs(found)
                row = row._replace(
                    pid=found.pid, **fact_fields(facts), owners=refs, owners_count=count
                )
                if found.hashes is not None:
                    fills = (*fills, Fill(found.hashes, _with_hashes, MAX_HASH_WAIT))
        attribution = None
        if row.pid is not None:
            attribution = self._attribution(conn, rows)
        row = row._replace(
            event=event, status=conn.status, timestamp=seen, attribution=attribution, **more
        )
        # The open row's waits, already spent: a later row never waits again.
        return PendingRow(row, fills, opened.queued)

    def _close_row(self, story: Story, seen: datetime.datetime):
        rows: StoryRows = story.rows
        if rows is None or rows.skipped or rows.opened is None:
            return None
        sent, received = payload_bytes(story, story.end_counters, rows.direction == "out")
        pending = self._later_row(
            story,
            story.last_conn,
            "close",
            _wall_time(story.end_wall) if story.end_wall is not None else seen,
            duration=None if story.duration is None else round(story.duration, 6),
            duration_from_start=story.from_start,
            bytes_sent=sent,
            bytes_received=received,
        )
        return pending

    def _update_rows(self, seen: datetime.datetime, now: float) -> list[PendingRow]:
        """A row of bytes so far for each live TCP connection shown."""
        found = []
        for story in sorted(self._tracker.live(), key=lambda s: sort_key(s.conn)):
            rows: StoryRows | None = story.rows
            if story.ended or rows is None or rows.opened is None:
                continue
            conn = story.conn
            if not conn.proto.startswith("tcp") or conn.raddr is None:
                continue
            sent, received = payload_bytes(story, conn.counters, rows.direction == "out")
            found.append(
                self._later_row(
                    story,
                    conn,
                    "update",
                    seen,
                    duration=round(max(0.0, now - story.first_seen), 6),
                    duration_from_start=story.from_start,
                    bytes_sent=sent,
                    bytes_received=received,
                )  # fmt: skip
            )
        return found

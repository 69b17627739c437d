"""The connection tracker: one story per socket, merged from snapshots and end events."""

from __future__ import annotations

import gc
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, NamedTuple

from histstat.records import MAX_OWNERS, Connection, TcpCounters, sort_key
from histstat.sources.base import NO_ENDS, End, Ends

# A socket's identity without its cookie: (proto, laddr, lport, raddr, rport, netns), plus
# the owner's pid for a socket with no remote end (see identity_key).
Identity = tuple[Any, ...]

# How long an ended story is remembered once the table no longer holds it: longer than
# the kernel keeps any remainder of a closed socket (TIME_WAIT and FIN_WAIT2 are 60 s on
# Linux; LAST_ACK and CLOSING end after retransmissions), and than an end event may lag.
ENDED_MEMORY = 180.0
MAX_ENDED = 65536

# States only a remainder (the kernel's timewait socket) or a closing socket is in: what
# the table shows of a connection after its end, absorbed by the ended story.
REMAINDER_STATES = frozenset(
    ("FIN_WAIT1", "FIN_WAIT2", "CLOSING", "LAST_ACK", "TIME_WAIT", "CLOSE")
)
# States whose sight means the full socket is gone (the kernel's timewait socket, or a
# socket closed): without end events, the poll that sees one is the end.
END_STATES = frozenset(("TIME_WAIT", "CLOSE"))
# States that follow the peer's FIN: a socket seen in one has received it.
AFTER_PEER_FIN = frozenset(("CLOSE_WAIT", "LAST_ACK", "CLOSING", "TIME_WAIT"))
# States that follow our own FIN.
AFTER_OUR_FIN = frozenset(("FIN_WAIT1", "FIN_WAIT2", "CLOSING", "LAST_ACK", "TIME_WAIT"))


def identity_key(conn: Connection | End) -> Identity:
    """What identifies a socket when no cookie does: (proto, laddr, lport, raddr, rport,
    netns). A connected socket's 5-tuple is unique in its network namespace only, so the
    namespace is part of it (None from a source that does not know it); sockets with no
    remote end (listeners, unbound UDP) can share one (SO_REUSEPORT), so for them the
    owner's pid follows, as far as a source lists a shared socket once per holder."""
    key = (conn.proto, conn.laddr, conn.lport, conn.raddr, conn.rport, conn.netns)
    if conn.raddr is None and isinstance(conn, Connection):
        return (*key, conn.pid)
    return key


def _holders_of(conn: Connection) -> tuple[int, ...] | set[int]:
    """The pids a record names that live_pids keeps: its holder, and every holder a row
    lists (MAX_OWNERS) when the socket is shared."""
    if len(conn.owners) > 1:
        pids = set(conn.owners[:MAX_OWNERS])
        if conn.pid is not None:
            pids.add(conn.pid)
        return pids
    return () if conn.pid is None else (conn.pid,)


def _address_key(key: Identity) -> Identity:
    """An identity without its owner's pid: the address, port and namespace."""
    return key[:6]


def _other_namespace(known: int | None, told: int | None) -> bool:
    """Whether two records are of different namespaces, as far as both know theirs: a
    cookie is unique only within one namespace before Linux 5.12."""
    return known is not None and told is not None and known != told


def _another_socket(story: Story, end: End) -> bool:
    """Whether an end event found by its 5-tuple is of a later socket than the story it
    found: a full socket ends once, so a second end with another cookie is another
    connection on the same 5-tuple (loopback and tcp_tw_reuse hand out a port still in
    TIME_WAIT at once). A remainder's cookie is not the full socket's, so only the cookie
    of the end that ended the story tells."""
    return (
        story.exact_end
        and story.end_cookie is not None
        and bool(end.cookie)
        and end.cookie != story.end_cookie
    )


def connect_identity(connect: Any) -> Identity:
    """The identity of a connect's socket (histstat.connects.Connect.key, identity_key's
    shape, its namespace None when the connecting process was gone before it was read);
    a key of five parts, from a stand-in that knows no namespaces, is of an unknown one."""
    key = tuple(connect.key)
    return key if len(key) > 5 else (*key, None)


def _accepted(story: Story, conn: Connection) -> bool:
    """A listener's request socket (SYN_RECV, its own cookie) that the handshake replaced
    by the full socket, which has another cookie: the same connection."""
    return story.conn.status == "SYN_RECV" and conn.status != "SYN_RECV"


def _cookie(conn: Connection | End) -> int | None:
    """The socket's cookie where it identifies it (an accepted socket starts at 0)."""
    return conn.cookie or None


class Story:
    """One socket's story: from its first sight to its end (and the remainder the kernel
    keeps after). Mutable, owned by the tracker; the poller hangs its rows on it."""

    __slots__ = (
        "key", "cookie", "conn", "first_seen", "from_start", "peer_fin_seen", "our_fin_seen",
        "ended", "end_time", "end_wall", "exact_end", "end_counters", "last_conn",
        "pending_end", "rows", "held", "freed_whole", "life_unseen", "connect", "end_cookie",
        "order",
    )  # fmt: skip

    def __init__(self, conn: Connection, now: float, from_start: bool) -> None:
        self.key = identity_key(conn)
        self.order: tuple[Any, ...] | None = None  # its place among a poll's (_order)
        self.cookie = _cookie(conn)
        self.conn = conn  # the latest record the table gave (or the end event's)
        self.first_seen = now  # monotonic
        self.from_start = from_start  # there at histstat's first poll
        self.peer_fin_seen = False  # seen in a state that follows the peer's FIN
        self.our_fin_seen = False  # seen in a state that follows our FIN
        self.saw(conn.status)
        self.ended = False
        self.end_time: float | None = None  # monotonic
        self.end_wall: float | None = None  # wall clock, where an end event gave it
        self.exact_end = False  # the kernel said when (an end event)
        self.end_counters: TcpCounters | None = None  # the end event's
        self.last_conn = conn  # the last record seen before the end
        self.pending_end: float | None = None  # seen in an end state, its event awaited
        self.end_cookie: int | None = None  # the cookie of the socket whose end event ended it
        self.rows: Any = None  # the poller's: what it showed of the story
        self.held = 0  # records of the latest snapshot that are this socket
        # Its end event came before the poll's dump, which held nothing of it: no
        # FIN_WAIT2/TIME_WAIT remainder, so the end was the passive side's last ACK,
        # after the peer's FIN (or a reset: see docs/story.md's Bytes).
        self.freed_whole = False
        # No poll saw it alive (first seen as what its end leaves, or known only by its
        # end event): how long it lived is unknown.
        self.life_unseen = conn.status in END_STATES
        self.connect: Any = None  # the failed connect (histstat.connects) it tells

    @property
    def last_status(self) -> str | None:
        """The last state seen before the end."""
        return self.last_conn.status

    @property
    def duration(self) -> float | None:
        """Seconds from the first sight to the end; None when no poll saw it alive."""
        assert self.end_time is not None
        if self.life_unseen:
            return None
        return max(0.0, self.end_time - self.first_seen)

    def saw(self, status: str | None) -> None:
        """A state seen: what it says of the FINs (for payload_bytes)."""
        if status in AFTER_PEER_FIN:
            self.peer_fin_seen = True
        if status in AFTER_OUR_FIN:
            self.our_fin_seen = True


class Change(NamedTuple):
    """Something a poll learnt of a story: ``open`` (first sight), ``state`` (a new
    state; after its end, the remainder's), ``owner`` (the socket's holders changed),
    ``close`` (its end)."""

    kind: str
    story: Story
    conn: Connection


def _payload(value: int, less: int) -> int:
    return max(0, value - less)


def payload_bytes(
    story: Story, counters: TcpCounters | None, opened_here: bool
) -> tuple[int | None, int | None]:
    """(sent, received) payload bytes from a TCP socket's counters, by the definition in
    docs/story.md: the kernel counts the peer's FIN in bytes_received, and our SYN (when
    this end connected: ``opened_here``) and FIN in bytes_acked; bytes_sent counts
    retransmissions, which bytes_retrans gives. Never negative; None where unknown."""
    if counters is None or not story.conn.proto.startswith("tcp"):
        return None, None
    if counters.bytes_acked == 0 and counters.bytes_received == 0 and not counters.bytes_sent:
        # The kernel clears them on an abort (tcp_disconnect): unknown, not zero.
        return None, None
    if counters.bytes_sent is not None:
        sent = _payload(counters.bytes_sent, counters.bytes_retrans or 0)
    else:  # before Linux 4.19: what the peer acknowledged, less our SYN and FIN
        sent = _payload(counters.bytes_acked, int(opened_here) + int(story.our_fin_seen))
    received = _payload(counters.bytes_received, int(story.peer_fin_seen or story.freed_whole))
    return sent, received


def _order(change: Change) -> tuple[Any, ...]:
    """Where a change goes among those of one poll: by socket (its identity, unknown
    parts as "" and -1), so a story's own changes keep their order (a stable sort).
    Made once per story (and again when its key changes), not once per change."""
    story = change.story
    order = story.order
    if order is None:
        key = story.key
        proto, laddr, lport, raddr = key[:4]
        order = story.order = (
            "" if proto is None else proto,
            "" if laddr is None else laddr,
            "" if lport is None else lport,
            "" if raddr is None else raddr,
            *[-1 if part is None else part for part in key[4:]],
        )
    return order


def _by_end(change: Change) -> tuple[Any, ...]:
    end = change.story.end_time
    return (-math.inf if end is None else end, *_order(change))


class Poll(NamedTuple):
    """What one poll changed, in order, and how many ends it inferred after the kernel
    said it had dropped end events (None: it said nothing of the kind)."""

    changes: list[Change]
    inferred_after_loss: int | None = None


class ConnectionTracker:
    """Merges snapshots and end events into one story per socket, in linear time.

    A snapshot's connection joins a live story by its cookie, else by its identity
    (``identity_key``); else, in a closing state, the remainder of a story that ended
    lately (ENDED_MEMORY, at most MAX_ENDED of them, by cookie and identity: a
    remainder may carry another cookie than the end event); else it starts a story.
    A story ends at its end event (``watches_ends``) or, without one, at the poll that
    sees it in TIME_WAIT or CLOSE or no longer in the table; never twice, and never
    because its owner went missing: the owner is not its identity.
    """

    def __init__(self, ended_memory: float = ENDED_MEMORY, max_ended: int = MAX_ENDED) -> None:
        self._live: dict[Identity, Story] = {}  # stories the latest snapshot holds
        self._live_cookies: dict[int, Story] = {}
        self._records: dict[Connection, Story] = {}  # the latest snapshot's, to its story
        self._awaiting: dict[Story, None] = {}  # seen as TIME_WAIT, their end event due
        self._ended: OrderedDict[Identity, tuple[float, Story]] = OrderedDict()  # gone too
        self._ended_cookies: dict[int, Story] = {}
        self._ended_memory = ended_memory
        # The namespaces of the stories held or remembered (rebuilt as it doubles): where
        # an end event that names none may belong.
        self._namespaces: dict[int | None, None] = {}
        self._namespaces_kept = 0
        self._max_ended = max_ended
        self._first_poll: float | None = None
        self._current: frozenset[Connection] = frozenset()
        # pid → how many of the latest snapshot's records name it (live_pids), kept as the
        # records come and go, not counted again over the whole table at each poll.
        self._holders: dict[int, int] = {}

    def update(
        self,
        snapshot: frozenset[Connection],
        now: float,
        ends: Ends = NO_ENDS,
        watches_ends: bool = False,
        wall: float | None = None,
        failed: Sequence[Any] = (),
    ) -> Poll:
        """The changes since the previous poll. ``now`` is the poll's monotonic time,
        ``wall`` its wall-clock time (to place end events, which carry it); ``ends``
        what the source reported since the previous poll, taken after the snapshot;
        ``failed`` the connects (histstat.connects.Connect) that failed since, each a
        story that opened in SYN_SENT and ended, unless a poll saw it.

        Only the records that differ from the previous snapshot's cost Python work: the
        set differences run in C, as the table's unchanged majority needs no look."""
        # The first poll makes a story per socket: tens of thousands of objects, none in
        # a cycle, over which the cyclic collector would run again and again.
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._update(snapshot, now, ends, watches_ends, wall, failed)
        finally:
            if collecting:
                gc.enable()

    def _update(
        self,
        snapshot: frozenset[Connection],
        now: float,
        ends: Ends,
        watches_ends: bool,
        wall: float | None,
        failed: Sequence[Any] = (),
    ) -> Poll:
        if self._first_poll is None:
            self._first_poll = now
        from_start = now == self._first_poll
        changes: list[Change] = []
        closes: list[Change] = []
        after: list[Change] = []  # what the table shows after an end: after any close
        records = self._records
        left: dict[Story, None] = {}  # stories that lost a record: gone, unless matched
        holders = self._holders
        current = self._current
        # One pass over the table (the records of both snapshots compared once), then the
        # few that changed are sorted out: what left, what came.
        changed = snapshot ^ current
        for record in [record for record in changed if record in current]:
            for pid in _holders_of(record):
                if holders[pid] == 1:
                    del holders[pid]
                else:
                    holders[pid] -= 1
            went = records.pop(record)
            went.held -= 1
            left[went] = None
        # Stories of sockets with no remote end that lost a record, by address and port.
        unconnected_left: dict[Identity, list[Story]] = {}
        for story in left:
            if story.conn.raddr is None:
                unconnected_left.setdefault(_address_key(story.key), []).append(story)
        came = [record for record in changed if record not in current]
        for record in came:
            for pid in _holders_of(record):
                holders[pid] = holders.get(pid, 0) + 1
        for group in self._merged(came):
            conn = group[0]
            found = self._story_of(conn) or self._new_holder_of(conn, unconnected_left)
            if found is None:
                story = Story(conn, now, from_start)
                changes.append(Change("open", story, conn))
                self._hold(story)
                if conn.status in END_STATES:  # first seen as what its end leaves
                    if watches_ends:
                        self._wait_for_end(story, now)
                    else:
                        self._end(story, now, closes)
            else:
                story = found
                if story.held == 0 and story not in left:  # a remainder of an ended one
                    self._forget_ended(story)
                    self._hold(story)
                self._follow(story, conn, now, watches_ends, changes, closes, after)
            for record in group[1:]:
                records[record] = story
            story.held += len(group) - 1
        if wall is None:
            wall = now
        # Stories the table no longer holds join the ended ones (their end events may
        # be in this batch), and end now where none was.
        gone = [story for story in left if story.held == 0]
        for story in gone:
            self._let_go(story)
            self._remember_ended(story, now)
        for connect in failed:  # before the ends: a destroy event joins its story
            self._connect_failed(connect, now, wall, changes, closes)
        for end in ends.ends:
            self._apply_end(end, now, wall, changes, closes)
        for story in gone:
            if not story.ended:
                self._end(story, now, closes)
        # A story seen in an end state whose end event never came: the event was lost
        # (the kernel drops one silently when an allocation fails).
        for story in list(self._awaiting):
            if story.ended:
                del self._awaiting[story]
            elif ends.lost or (story.pending_end is not None and story.pending_end < now):
                del self._awaiting[story]
                assert story.pending_end is not None
                self._end(story, story.pending_end, closes)
        inferred = None
        if ends.lost:
            inferred = sum(
                1 for change in closes if change.kind == "close" and not change.story.exact_end
            )
        self._forget_expired(now)
        self._current = snapshot
        # A stable order, whatever the snapshot's; a story's own changes keep theirs.
        changes.sort(key=_order)
        closes.sort(key=_by_end)  # as the ends came, each story's changes together
        after.sort(key=_order)
        return Poll(changes + closes + after, inferred)

    def _hold(self, story: Story) -> None:
        """A story the table holds: findable by identity and cookie."""
        self._namespaces[story.key[5]] = None
        self._live[story.key] = story
        if story.cookie is not None:
            self._live_cookies[story.cookie] = story

    def _let_go(self, story: Story) -> None:
        if self._live.get(story.key) is story:
            del self._live[story.key]
        if story.cookie is not None and self._live_cookies.get(story.cookie) is story:
            del self._live_cookies[story.cookie]
        self._awaiting.pop(story, None)

    def _wait_for_end(self, story: Story, now: float) -> None:
        story.pending_end = now
        self._awaiting[story] = None

    @staticmethod
    def _merged(records: list[Connection]) -> list[list[Connection]]:
        """The records grouped by socket, the group's record first: a source that lists
        a shared connected socket once per holder gives one record, of the lowest pid,
        with every holder in ``owners``."""
        merged: dict[Identity, list[Connection]] = {}
        for conn in records:
            merged.setdefault(identity_key(conn), []).append(conn)
        groups = []
        for group in merged.values():
            if len(group) > 1:
                group.sort(key=sort_key)
                pids = sorted({conn.pid for conn in group if conn.pid is not None})
                first = next((conn for conn in group if conn.pid is not None), group[0])
                owners = tuple(dict.fromkeys((*first.owners, *pids)))
                group = [first._replace(owners=owners) if len(owners) > 1 else first, *group]
            else:
                group = [group[0], group[0]]
            groups.append(group)
        return groups

    def _story_of(self, conn: Connection) -> Story | None:
        """The story this record belongs to, live or ended lately; None: a new socket."""
        cookie = _cookie(conn)
        if cookie is not None:
            story = self._live_cookies.get(cookie) or self._ended_cookies.get(cookie)
            if story is not None and not _other_namespace(story.conn.netns, conn.netns):
                return story
        key = identity_key(conn)
        story = self._live.get(key)
        if story is not None:
            if cookie is not None and story.cookie is not None and story.cookie != cookie:
                # Another socket on the same 5-tuple: the known one's remainder turns
                # into a new connection only by a new SYN, which starts a new story.
                if conn.status not in REMAINDER_STATES and not _accepted(story, conn):
                    return None
            return story
        entry = self._ended.get(key)
        if entry is not None and conn.status in REMAINDER_STATES:
            return entry[1]
        return None

    def _new_holder_of(
        self, conn: Connection, unconnected_left: dict[Identity, list[Story]]
    ) -> Story | None:
        """A socket with no remote end and no cookie whose record changed only by its
        pid (part of its identity): the same listener named by another holder (psutil
        names one of them, and a fork or an exit changes which), when a record of the
        same address, port, namespace and state left the table this poll."""
        if conn.raddr is not None or _cookie(conn) is not None:
            return None
        for story in unconnected_left.get(_address_key(identity_key(conn)), ()):
            if story.held == 0 and not story.ended and story.conn.status == conn.status:
                self._let_go(story)
                story.key = identity_key(conn)
                story.order = None
                self._hold(story)
                return story
        return None

    def _follow(
        self,
        story: Story,
        conn: Connection,
        now: float,
        watches_ends: bool,
        changes: list[Change],
        closes: list[Change],
        after: list[Change],
    ) -> None:
        """A known story seen again: its state and owner changes, and its end where the
        state says so. A TIME_WAIT or CLOSE is what the end leaves (``after``): its row
        follows the close row, even one its end event brings later in the same poll."""
        previous = story.conn
        if not story.ended and conn.status not in END_STATES:
            story.last_conn = conn
        cookie = _cookie(conn)
        if cookie is not None and (story.cookie is None or _accepted(story, conn)):
            if self._live_cookies.get(story.cookie or 0) is story:
                del self._live_cookies[story.cookie or 0]
            story.cookie = cookie  # the full socket's, which its end event will carry
            self._live_cookies[cookie] = story
        story.conn = conn
        if conn.status != previous.status:
            story.saw(conn.status)
            if not story.ended and conn.status in END_STATES:
                if watches_ends:
                    self._wait_for_end(story, now)  # its event is due; the last state stays
                else:
                    self._end(story, now, closes)
            state = Change("state", story, conn)
            if conn.status in END_STATES:
                after.append(state)
            else:
                (closes if story.ended else changes).append(state)
        elif conn.pid != previous.pid or conn.owners != previous.owners:
            (closes if story.ended else changes).append(Change("owner", story, conn))

    def _end(self, story: Story, when: float, closes: list[Change]) -> None:
        story.ended = True
        story.end_time = when
        closes.append(Change("close", story, story.last_conn))

    def _apply_end(
        self, end: End, now: float, wall: float, changes: list[Change], closes: list[Change]
    ) -> None:
        story = None
        if end.cookie:
            story = self._live_cookies.get(end.cookie) or self._ended_cookies.get(end.cookie)
            if story is not None and _other_namespace(story.conn.netns, end.netns):
                story = None
        complete = end.laddr is not None and end.rport not in (None, 0)
        if story is None and complete:
            key = identity_key(end)
            story = self._known(key)
            if story is None and end.netns is None:
                found = self._in_any_namespace(key)
                if len(found) > 1:
                    return  # the 5-tuple in several namespaces: the polls end each one
                story = found[0] if found else None
            if story is not None and _another_socket(story, end):
                story = None  # the 5-tuple used again: a connection of its own
        when = now - max(0.0, wall - end.time)
        if story is None:
            if not complete or end.laddr is None or end.lport is None:
                return  # an abort no poll saw: only a cookie is left, nothing to show
            conn = Connection(end.proto, end.laddr, end.lport, end.raddr, end.rport,
                              "CLOSE", None, end.cookie or None, netns=end.netns)  # fmt: skip
            story = Story(conn, when, False)
            changes.append(Change("open", story, conn))
            self._remember_ended(story, now)
        if story.ended:
            return  # a close is never reported twice
        story.freed_whole = story.held == 0 and end.time <= wall
        story.exact_end = True
        story.end_cookie = end.cookie or None
        story.end_wall = end.time
        story.end_counters = end.counters
        self._end(story, when, closes)

    def _known(self, key: Identity) -> Story | None:
        """The story of a socket the table holds, or held lately."""
        story = self._live.get(key)
        if story is None:
            entry = self._ended.get(key)
            story = entry[1] if entry is not None else None
        return story

    def _in_any_namespace(self, key: Identity) -> list[Story]:
        """The stories of a 5-tuple in every namespace seen, for an end event from a
        source that names no namespace for its ends while its snapshots do."""
        found = []
        for netns in self._namespaces:
            if netns is not None:
                story = self._known((*key[:5], netns))
                if story is not None:
                    found.append(story)
        return found

    def _connect_failed(
        self, connect: Any, now: float, wall: float, changes: list[Change], closes: list[Change]
    ) -> None:
        """A connect that failed (SYN_SENT→CLOSE): a story of its own, unless a poll
        saw the socket (its end comes as any other's)."""
        key = connect_identity(connect)
        started = now - max(0.0, wall - connect.time)
        # A connect whose namespace could not be read (key[5] None; its process was gone)
        # while the polls name theirs: a poll's story of the 5-tuple in any namespace is
        # then the same socket.
        keys = [key]
        if key[5] is None:
            keys += [(*key[:5], netns) for netns in self._namespaces if netns is not None]
        for known in keys:
            if known in self._live:
                return
            entry = self._ended.get(known)
            if entry is not None and entry[1].first_seen >= started - 1.0:
                return  # seen by a poll while it tried: the same socket
        conn = Connection(
            connect.proto, connect.laddr, connect.lport, connect.raddr, connect.rport,
            "SYN_SENT", None, netns=key[5],
        )  # fmt: skip
        story = Story(conn, started, False)
        story.connect = connect
        changes.append(Change("open", story, conn))
        self._remember_ended(story, now)
        story.exact_end = True
        story.end_wall = connect.end_time
        self._end(story, now - max(0.0, wall - connect.end_time), closes)

    def _remember_ended(self, story: Story, now: float) -> None:
        self._namespaces[story.key[5]] = None
        self._ended[story.key] = (now, story)
        self._ended.move_to_end(story.key)
        if story.cookie is not None:
            self._ended_cookies[story.cookie] = story
        while len(self._ended) > self._max_ended:
            _, (_, old) = self._ended.popitem(last=False)
            self._drop_cookie(old)

    def _forget_ended(self, story: Story) -> None:
        self._ended.pop(story.key, None)
        self._drop_cookie(story)

    def _drop_cookie(self, story: Story) -> None:
        if story.cookie is not None and self._ended_cookies.get(story.cookie) is story:
            del self._ended_cookies[story.cookie]

    def _forget_expired(self, now: float) -> None:
        if len(self._namespaces) > 2 * self._namespaces_kept + 16:
            # Containers come and go: keep the namespaces of the stories still known.
            self._namespaces = dict.fromkeys(
                story.key[5]
                for story in (*self._live.values(), *(entry[1] for entry in self._ended.values()))
            )
            self._namespaces_kept = len(self._namespaces)
        while self._ended:
            since, story = next(iter(self._ended.values()))
            if now - since <= self._ended_memory:
                return
            self._ended.popitem(last=False)
            self._drop_cookie(story)

    def live(self) -> list[Story]:
        """The stories of the latest snapshot, ended remainders included."""
        return list(self._live.values())

    def live_pids(self) -> set[int]:
        """Pids that hold a socket in the latest snapshot: the likeliest openers and the
        other holders a row lists (so their facts stay cached, not read again per row)."""
        return set(self._holders)

    def shares_address(self, story: Story) -> bool:
        """Whether another story held or remembered has ``story``'s 5-tuple in another
        network namespace: a connect whose namespace is unknown may be that one's."""
        if len(self._namespaces) < 2:
            return False
        return any(found is not story for found in self._in_any_namespace(story.key))

    def remembered(self) -> int:
        """Ended stories kept in memory (bounded by MAX_ENDED)."""
        return len(self._ended)

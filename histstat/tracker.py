"""The connection tracker: what is new and what went away since the previous poll."""

from __future__ import annotations

from histstat.records import Connection, sort_key


class ConnectionTracker:
    """Compares each snapshot with the previous one by set difference (linear time).

    A connection's identity is its whole record (proto, laddr, lport, raddr, rport,
    status, pid), so a status change is a new connection, as in the original tool. It
    remembers the poll that first saw each live connection, for durations; the last poll
    that saw a connection now gone is simply the previous poll.
    """

    def __init__(self) -> None:
        self._previous: frozenset[Connection] = frozenset()
        self._first_seen: dict[Connection, float] = {}
        self._first_poll: float | None = None
        self._previous_poll: float | None = None
        self._lifetimes: dict[Connection, tuple[float, bool]] = {}

    def changes(
        self, snapshot: frozenset[Connection], now: float
    ) -> tuple[list[Connection], list[Connection]]:
        """(new, gone) since the previous snapshot, each in a stable order; ``now`` is
        the poll's monotonic time."""
        new = sorted(snapshot - self._previous, key=sort_key)
        gone = sorted(self._previous - snapshot, key=sort_key)
        if self._first_poll is None:
            self._first_poll = now
        self._lifetimes = {conn: self._lifetime(conn) for conn in gone}
        for conn in gone:
            del self._first_seen[conn]
        for conn in new:
            self._first_seen[conn] = now
        self._previous = snapshot
        self._previous_poll = now
        return new, gone

    def new_since(self, snapshot: frozenset[Connection], now: float = 0.0) -> list[Connection]:
        """Connections in ``snapshot`` absent from the previous one, in a stable order."""
        return self.changes(snapshot, now)[0]

    def _lifetime(self, conn: Connection) -> tuple[float, bool]:
        first = self._first_seen[conn]
        assert self._previous_poll is not None  # a connection gone was seen by a poll
        return self._previous_poll - first, first == self._first_poll

    def lifetime(self, gone: Connection) -> tuple[float, bool]:
        """(seconds from the first to the last poll that saw it, whether it was already
        there at the first poll: then the seconds are only a lower bound)."""
        return self._lifetimes[gone]

    @property
    def current(self) -> frozenset[Connection]:
        """The latest snapshot."""
        return self._previous

    def live_pids(self) -> set[int]:
        """Pids that own a socket in the latest snapshot."""
        return {conn.pid for conn in self._previous if conn.pid is not None}

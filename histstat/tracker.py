"""The connection tracker: what is new in a snapshot since the previous one."""

from __future__ import annotations

from histstat.records import sort_key


class ConnectionTracker:
    """Remembers the previous snapshot and reports what appeared since, by set difference.

    A connection's identity is its whole record (proto, laddr, lport, raddr, rport,
    status, pid), so a status change is a new connection, as in the original tool.
    """

    def __init__(self) -> None:
        self._previous: frozenset = frozenset()

    def new_since(self, snapshot: frozenset) -> list:
        """Connections in ``snapshot`` absent from the previous one, in a stable order."""
        new = snapshot - self._previous
        self._previous = snapshot
        return sorted(new, key=sort_key)

    @property
    def current(self) -> frozenset:
        """The latest snapshot."""
        return self._previous

    def live_pids(self) -> set:
        """Pids that own a socket in the latest snapshot."""
        return {conn.pid for conn in self._previous if conn.pid is not None}

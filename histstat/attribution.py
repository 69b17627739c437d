"""The poller's memories: listeners (for direction) and endpoint owners (for orphans)."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Optional

from histstat.records import Connection

ListenerKey = tuple[str, str, int]  # tcp or udp, address, port
Endpoint = tuple[str, str, int, Optional[str], Optional[int]]  # proto, laddr, lport, raddr, rport

# How long a closed listener still makes its port's connections "in": a connection
# accepted just before the listener closed is noticed a poll or more later.
LISTENER_MEMORY = 300.0
# The longest the kernel keeps a socket whose process let go (TIME_WAIT and FIN_WAIT2
# are 60 s on Linux; LAST_ACK and CLOSING end after retransmissions), plus a margin.
ORPHAN_MEMORY = 180.0
MAX_ENDPOINTS = 65536
MAX_LISTENERS = 65536
_WILDCARDS = ("0.0.0.0", "::")


def _plain_address(address: str) -> str:
    """An IPv4-mapped IPv6 address as IPv4: a dual-stack listener reports either."""
    return address[7:] if address.startswith("::ffff:") and "." in address else address


class ListenerMemory:
    """Listening (protocol, address, port)s, open now or closed within LISTENER_MEMORY,
    to tell connections accepted here ("in") from those this host opened ("out").

    Several sockets may listen on one key (SO_REUSEPORT workers, a server reloading):
    the key counts as closed only when the last of them is gone.
    """

    def __init__(self, memory: float = LISTENER_MEMORY, limit: int = MAX_LISTENERS) -> None:
        self._open: dict[ListenerKey, int] = {}  # key -> number of listening sockets now
        # key -> monotonic expiry, once all closed
        self._until: OrderedDict[ListenerKey, float] = OrderedDict()
        self._memory = memory
        self._limit = limit

    @staticmethod
    def _key(conn: Connection) -> ListenerKey:
        return (conn.proto.rstrip("6"), _plain_address(conn.laddr), conn.lport)

    def opened(self, listener: Connection) -> None:
        key = self._key(listener)
        self._open[key] = self._open.get(key, 0) + 1
        self._until.pop(key, None)

    def closed(self, listener: Connection, now: float) -> None:
        key = self._key(listener)
        left = self._open.get(key, 0) - 1
        if left > 0:
            self._open[key] = left
            return
        self._open.pop(key, None)
        self._until[key] = now + self._memory
        self._until.move_to_end(key)
        while len(self._until) > self._limit:
            self._until.popitem(last=False)

    def forget_expired(self, now: float) -> None:
        while self._until:
            key, until = next(iter(self._until.items()))
            if until >= now:
                return
            del self._until[key]

    def _listening(self, key: ListenerKey, now: float) -> bool:
        return key in self._open or self._until.get(key, -math.inf) >= now

    def direction(self, conn: Connection, now: float) -> str | None:
        """listen, in or out (a heuristic: see docs/story.md); None for UDP."""
        if conn.status == "LISTEN":
            return "listen"
        if not conn.proto.startswith("tcp"):
            return None
        if conn.raddr is None:
            return None
        kind, address, port = self._key(conn)
        for listening in (address, *_WILDCARDS):
            if self._listening((kind, listening, port), now):
                return "in"
        return "out"

    def __len__(self) -> int:
        return len(self._open) + len(self._until)


class EndpointMemory:
    """Who owns or owned each (proto, laddr, lport, raddr, rport), to attribute the
    sockets the kernel keeps without a process (TIME_WAIT, FIN_WAIT2, LAST_ACK).

    Endpoints of live connections are kept as long as they live (bounded by the socket
    table itself); once gone, for ORPHAN_MEMORY seconds and at most ``limit`` of them.
    """

    def __init__(self, memory: float = ORPHAN_MEMORY, limit: int = MAX_ENDPOINTS) -> None:
        self._live: dict[Endpoint, Any] = {}  # endpoint -> owner, while a connection holds it
        # endpoint -> (last seen owned, owner)
        self._gone: OrderedDict[Endpoint, tuple[float, Any]] = OrderedDict()
        self._memory = memory
        self._limit = limit

    @staticmethod
    def endpoint(conn: Connection) -> Endpoint:
        return conn[:5]

    def remember(self, conn: Connection, owner, now: float) -> None:
        key = self.endpoint(conn)
        self._gone.pop(key, None)
        self._live[key] = owner

    def touch(self, conn: Connection, now: float, orphaned: bool = True) -> None:
        """Its owned connection is gone (seen owned until ``now``). When the kernel
        kept it as an orphan (``orphaned``), the owner is remembered for ORPHAN_MEMORY
        seconds; a connection gone entirely (reset, or closed on both ends) is
        forgotten at once, which keeps fast churn from filling the memory."""
        key = self.endpoint(conn)
        owner = self._live.pop(key, None)
        if owner is None or not orphaned:
            return
        self._gone[key] = (now, owner)
        self._gone.move_to_end(key)
        while len(self._gone) > self._limit:
            self._gone.popitem(last=False)

    def forget(self, conn: Connection) -> None:
        """The orphan's story is over: a later connection on the same endpoint is
        someone else's."""
        self._gone.pop(self.endpoint(conn), None)

    def forget_expired(self, now: float) -> None:
        while self._gone:
            seen, _ = next(iter(self._gone.values()))
            if now - seen <= self._memory:
                return
            self._gone.popitem(last=False)

    def owner_of(self, conn: Connection):
        key = self.endpoint(conn)
        owner = self._live.get(key)
        if owner is not None:
            return owner
        entry = self._gone.get(key)
        return None if entry is None else entry[1]

    def __len__(self) -> int:
        return len(self._live) + len(self._gone)

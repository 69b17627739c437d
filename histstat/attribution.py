"""The poller's memory of listeners, which tells a connection's direction."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional

from histstat.records import Connection

# tcp or udp, address, port, network namespace (None where the source does not know it):
# a listener makes only the connections of its own namespace "in".
ListenerKey = tuple[str, str, int, Optional[int]]

# How long a closed listener still makes its port's connections "in": a connection
# accepted just before the listener closed is noticed a poll or more later.
LISTENER_MEMORY = 300.0
MAX_LISTENERS = 65536
_WILDCARDS = ("0.0.0.0", "::")


def _plain_address(address: str) -> str:
    """An IPv4-mapped IPv6 address as IPv4: a dual-stack listener reports either."""
    return address[7:] if address.startswith("::ffff:") and "." in address else address


class ListenerMemory:
    """Listening (protocol, address, port, namespace)s, open now or closed within
    LISTENER_MEMORY, to tell connections accepted here ("in") from those this host
    opened ("out").

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
        return (conn.proto.rstrip("6"), _plain_address(conn.laddr), conn.lport, conn.netns)

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

    def listener_of(self, conn: Connection) -> ListenerKey | None:
        """The key of the open listener a TCP connection arrived on (its own address
        first, then the wildcards), None when no listener is open on its port."""
        if not conn.proto.startswith("tcp") or conn.raddr is None or conn.status == "LISTEN":
            return None
        kind, address, port, netns = self._key(conn)
        for listening in (address, *_WILDCARDS):
            if (kind, listening, port, netns) in self._open:
                return (kind, listening, port, netns)
        return None

    @classmethod
    def key_of(cls, listener: Connection) -> ListenerKey:
        """The key a listening socket is known by."""
        return cls._key(listener)

    def direction(self, conn: Connection, now: float) -> str | None:
        """listen, in or out (a heuristic: see docs/story.md); None for UDP."""
        if conn.status == "LISTEN":
            return "listen"
        if not conn.proto.startswith("tcp"):
            return None
        if conn.raddr is None:
            return None
        kind, address, port, netns = self._key(conn)
        for listening in (address, *_WILDCARDS):
            if self._listening((kind, listening, port, netns), now):
                return "in"
        return "out"

    def __len__(self) -> int:
        return len(self._open) + len(self._until)

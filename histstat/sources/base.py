"""What every source of socket snapshots offers: the ``Source`` protocol and its errors."""

from __future__ import annotations

from typing import Protocol

from histstat.records import Connection


class SourceAccessDenied(Exception):
    """The platform refuses to list connections without more privilege (macOS)."""


class Source(Protocol):
    """A source of snapshots of the socket table, one per poll."""

    name: str

    def snapshot(self) -> frozenset[Connection]:
        """Every TCP and UDP socket of the protocols asked for, as it is now."""
        ...

    def uid_of(self, conn: Connection) -> int | None:
        """The uid the kernel names as the owner of a socket of the latest snapshot,
        where the source knows it (it does even when the process is hidden)."""
        ...

    def close(self) -> None:
        """Let go of what the source holds open (netlink sockets)."""
        ...

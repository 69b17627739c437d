"""What every source of socket snapshots offers: the ``Source`` protocol and its errors."""

from __future__ import annotations

from typing import NamedTuple, Protocol

from histstat.records import Connection, TcpCounters


class SourceAccessDenied(Exception):
    """The platform refuses to list connections without more privilege (macOS)."""


class End(NamedTuple):
    """A socket the kernel freed, as a sock_diag destroy broadcast tells it. An abort or
    a failed connect clears the local address and the remote port (None here; the
    local port and the remote address stay): then only the cookie joins it to what a
    poll saw."""

    proto: str
    laddr: str | None
    lport: int | None
    raddr: str | None
    rport: int | None
    cookie: int
    time: float  # wall-clock seconds (time.time()) when histstat received it
    counters: TcpCounters | None  # TCP only; None after an abort (the kernel cleared them)
    netns: int | None = None  # the namespace whose broadcast told it (Linux)


class Ends(NamedTuple):
    """The ends received since the previous call; ``lost`` when the kernel dropped some
    (ENOBUFS): the caller then infers the missing ones from the next snapshot."""

    ends: list[End]
    lost: bool = False


NO_ENDS = Ends([])


class Source(Protocol):
    """A source of snapshots of the socket table, one per poll."""

    name: str

    def snapshot(self, counters: bool = False) -> frozenset[Connection]:
        """Every TCP and UDP socket of the protocols asked for, as it is now; with
        ``counters``, TCP sockets carry their byte counters where the source has them."""
        ...

    def watches_ends(self) -> bool:
        """Whether ``ends`` reports every end (the kernel's destroy broadcasts); if not,
        ends are inferred from snapshots alone."""
        ...

    def ends(self) -> Ends:
        """The ends the kernel reported since the previous call, oldest first."""
        ...

    def uid_of(self, conn: Connection) -> int | None:
        """The uid the kernel names as the owner of a socket of the latest snapshot,
        where the source knows it (it does even when the process is hidden)."""
        ...

    def close(self) -> None:
        """Let go of what the source holds open (netlink sockets)."""
        ...

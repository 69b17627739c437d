"""Immutable records that flow through the pipeline: connections and enriched rows."""

from __future__ import annotations

import datetime
from typing import NamedTuple


class TcpCounters(NamedTuple):
    """A TCP socket's byte counters as the kernel's tcp_info gives them (INET_DIAG_INFO),
    raw: turning them into payload bytes is the story's job (it knows the FINs)."""

    bytes_acked: int  # tcpi_bytes_acked: counts the SYN and our FIN once acked
    bytes_received: int  # tcpi_bytes_received: counts the peer's FIN
    bytes_sent: int | None = None  # tcpi_bytes_sent (Linux 4.19+): payload, retransmissions too
    bytes_retrans: int | None = None  # tcpi_bytes_retrans (Linux 4.19+)


class Connection(NamedTuple):
    """One socket as a source saw it at one poll."""

    proto: str  # tcp, tcp6, udp or udp6
    laddr: str
    lport: int
    raddr: str | None  # None: no remote end
    rport: int | None
    status: str | None  # None: stateless (UDP)
    pid: int | None  # None: no owning process known
    # What a source may know beside (the Linux source): none of it is the socket's
    # identity by itself, and the psutil source leaves it at the defaults.
    cookie: int | None = None  # sock_diag's socket cookie
    owners: tuple[int, ...] = ()  # every pid holding it, the likeliest opener first
    counters: TcpCounters | None = None  # only when the snapshot was asked for them
    # The inode of the socket's network namespace (Linux; None where unknown): the same
    # 5-tuple in two namespaces is two sockets.
    netns: int | None = None


class ProcessFacts(NamedTuple):
    """What histstat knows of a process; None marks an unknown value."""

    name: str | None = None
    user: str | None = None
    command: str | None = None  # cut at --command-limit, ending with the marker
    exe: str | None = None
    command_length: int | None = None  # characters of the whole command line
    ppid: int | None = None  # the parent process when histstat first read this one
    parent: str | None = None  # the parent's name
    args: tuple[str, ...] | None = None  # the arguments: " ".join(args) == command
    started: datetime.datetime | None = None  # local time, with its UTC offset
    args_count: int | None = None  # the arguments, however many ``args`` kept
    container: str | None = None  # the container id from its cgroup path (Linux)


UNKNOWN_PROCESS = ProcessFacts()


class ProcessRef(NamedTuple):
    """One process holding a socket, as a row lists it."""

    pid: int
    name: str | None


MAX_OWNERS = 16  # holders a row lists; owners_count says how many there were


class Row(NamedTuple):
    """One output row: a new connection, its process facts and when it was seen."""

    proto: str
    laddr: str
    lport: int
    raddr: str | None
    rport: int | None
    status: str | None
    pid: int | None
    pname: str | None
    user: str | None
    command: str | None
    exe: str | None
    md5: str | None
    sha256: str | None
    timestamp: datetime.datetime
    event: str = "open"  # open, or close (--closed)
    duration: float | None = None  # close rows: seconds from first to last poll that saw it
    duration_from_start: bool | None = None  # it was there when histstat started
    direction: str | None = None  # listen, in, out; None for UDP
    attribution: str | None = None  # socket, earlier; None when the process is unknown
    rhost: str | None = None  # -r: the remote address's PTR name
    country: str | None = None  # --geoip
    asn: int | None = None
    as_org: str | None = None
    command_length: int | None = None  # characters of the whole command line
    bytes_sent: int | None = None  # TCP close and update rows: payload bytes
    bytes_received: int | None = None
    owners: tuple[ProcessRef, ...] | None = None  # every holder, at most MAX_OWNERS
    owners_count: int | None = None  # how many processes held it
    ppid: int | None = None  # the parent process
    parent: str | None = None  # the parent's name
    args: tuple[str, ...] | None = None  # argv, so quoting survives
    started: datetime.datetime | None = None  # the process's start time
    args_count: int | None = None  # argc: the arguments, however many ``args`` kept
    netns: int | None = None  # the network namespace's inode (Linux)
    container: str | None = None  # the owner's container id, from its cgroup path


def sort_key(conn: Connection) -> tuple[str, str, int, str, int, str, int]:
    """Order connections deterministically although some fields may be None."""
    return (
        conn.proto,
        conn.laddr,
        conn.lport,
        conn.raddr or "",
        -1 if conn.rport is None else conn.rport,
        conn.status or "",
        -1 if conn.pid is None else conn.pid,
    )

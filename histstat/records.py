"""Immutable records that flow through the pipeline: connections and enriched rows."""

from __future__ import annotations

import datetime
from typing import NamedTuple


class Connection(NamedTuple):
    """One socket as a source saw it; its identity is the whole tuple."""

    proto: str  # tcp, tcp6, udp or udp6
    laddr: str
    lport: int
    raddr: str | None  # None: no remote end
    rport: int | None
    status: str | None  # None: stateless (UDP)
    pid: int | None  # None: no owning process known


class ProcessFacts(NamedTuple):
    """What histstat knows of a process; None marks an unknown value."""

    name: str | None = None
    user: str | None = None
    command: str | None = None  # cut at --command-limit, ending with the marker
    exe: str | None = None
    command_length: int | None = None  # characters of the whole command line


UNKNOWN_PROCESS = ProcessFacts()


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
    duration_from_start: bool | None = None  # close rows: it was there when histstat started
    direction: str | None = None  # listen, in, out; None for UDP
    attribution: str | None = None  # socket, earlier; None when the process is unknown
    rhost: str | None = None  # -r: the remote address's PTR name
    country: str | None = None  # --geoip
    asn: int | None = None
    as_org: str | None = None
    command_length: int | None = None  # characters of the whole command line


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

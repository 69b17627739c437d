"""The run's configuration: one immutable record that cli builds and the rest reads."""

from __future__ import annotations

from dataclasses import dataclass

from histstat.enrich import COMMAND_LIMIT
from histstat.filters import RowFilter

# --kernel-events: what the Linux source adds to polling (see docs/kernel-events.md)
KERNEL_EVENTS = ("auto", "on", "off")


@dataclass(frozen=True)
class Config:
    interval: float
    log: str | None
    output: str  # a name of histstat.output.FORMATS: plain, pretty, json, csv or ecs
    quiet: bool
    hashes: bool
    fields: tuple[str, ...] = ()
    row_filter: RowFilter = RowFilter()
    sqlite: str | None = None
    arguments: tuple[str, ...] = ()  # the command line, for the database's runs table
    once: bool = False
    count: int | None = None
    duration: float | None = None
    color: str = "auto"
    closed: bool = False
    transitions: bool = False  # a row per change of state
    update: float | None = None  # seconds between update rows of live TCP connections
    skip_existing: bool = False  # no rows for what the first poll finds
    resolve: bool = False
    geoip: tuple[str, ...] = ()  # paths of MaxMind databases
    source: str = "psutil"  # psutil or linux
    kernel_events: str = "auto"  # a name of KERNEL_EVENTS
    command_limit: int = COMMAND_LIMIT  # characters; 0: command lines are never cut
    syslog: str | None = None  # the path of the local syslog socket to send rows to
    syslog_facility: str = "user"  # a name of histstat.output.syslog.FACILITIES
    syslog_size: int = 8096  # bytes: the longest record sent

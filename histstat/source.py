"""Sources of connection snapshots: the kernel's socket table as immutable records."""

from __future__ import annotations

import socket
from collections.abc import Iterable

import psutil

from histstat.records import Connection

_PROTO_NAMES = {
    (socket.AF_INET, socket.SOCK_STREAM): "tcp",
    (socket.AF_INET6, socket.SOCK_STREAM): "tcp6",
    (socket.AF_INET, socket.SOCK_DGRAM): "udp",
    (socket.AF_INET6, socket.SOCK_DGRAM): "udp6",
}


class SourceAccessDenied(Exception):
    """The platform refuses to list connections without more privilege (macOS)."""


def connections_from_psutil(entries: Iterable) -> frozenset:
    """Turn psutil ``sconn`` entries into one Connection per socket.

    A socket held by several processes (a pre-fork server's listener) appears once per
    owner in psutil's list; it becomes one record, owned by its lowest pid, so the choice
    is the same every poll and the row does not flap between owners.
    """
    owners: dict = {}
    for entry in entries:
        proto = _PROTO_NAMES.get((entry.family, entry.type))
        if proto is None or not entry.laddr:
            continue
        raddr = entry.raddr or None
        status = entry.status
        key = (
            proto,
            entry.laddr.ip,
            entry.laddr.port,
            raddr.ip if raddr else None,
            raddr.port if raddr else None,
            None if status in (psutil.CONN_NONE, "", None) else status,
        )
        pid = entry.pid
        known = owners.get(key, _ABSENT)
        if known is _ABSENT or (pid is not None and (known is None or pid < known)):
            owners[key] = pid
    return frozenset(Connection(*key, pid) for key, pid in owners.items())


_ABSENT = object()


class PsutilSource:
    """The portable source: ``psutil.net_connections(kind="inet")``."""

    name = "psutil"

    def snapshot(self) -> frozenset:
        try:
            entries = psutil.net_connections(kind="inet")
        except psutil.AccessDenied as exc:
            raise SourceAccessDenied(str(exc)) from exc
        return connections_from_psutil(entries)

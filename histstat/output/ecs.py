"""ECS documents: a row as the Elastic Common Schema names its facts, one NDJSON line."""

from __future__ import annotations

import datetime
import functools
import socket
from collections.abc import Sequence
from typing import Any, Callable, NamedTuple

from histstat import __version__
from histstat.addresses import parse_ip, unmapped
from histstat.enrich import user_id
from histstat.output.community_id import community_id
from histstat.output.format import compact_json_value, iso_time
from histstat.records import Row

# The ECS release whose field names and types the documents follow (the fields histstat
# writes are the same in ECS 8.x); tests/ecs_fields.csv holds their definitions.
ECS_VERSION = "9.0.0"
AGENT_TYPE = "histstat"

# histstat's direction as ECS names it for host-based events, from the host's side.
NETWORK_DIRECTIONS = {"out": "egress", "in": "ingress"}
UNKNOWN_DIRECTION = "unknown"

# event.type: what a row says of the connection, by its event.
_PHASES = {"open": "start", "close": "end"}
INFO = "info"  # rows already there at start, state and update rows


class HostFacts(NamedTuple):
    """What every document says of this machine and this histstat."""

    name: str
    agent_version: str
    uid_of: Callable[[str], int | None]  # a login name's uid


@functools.cache
def this_host() -> HostFacts:
    """This machine's facts, read once."""
    return HostFacts(socket.gethostname(), __version__, user_id)


@functools.lru_cache(maxsize=4096)
def _address(text: str | None) -> tuple[str | None, int | None]:
    """(the address as ECS's ip type takes it, its IP version): no zone, a dual-stack
    socket's IPv4 peer as the IPv4 address it is. Rows of one host repeat few addresses."""
    ip = parse_ip(text)
    if ip is None:
        return None, None
    ip = unmapped(ip)
    return str(ip), ip.version


# A flow keeps its Community ID through every state of its two ends' rows.
_flow_id = functools.lru_cache(maxsize=4096)(community_id)


def _compact(value: Any) -> Any:
    """``value`` without its unknown (None) values, nor the objects and lists left empty;
    an empty text ("") stays: it is known."""
    if isinstance(value, dict):
        kept = {key: _compact(item) for key, item in value.items()}
        return {key: item for key, item in kept.items() if item is not None} or None
    if isinstance(value, list):
        return [item for item in map(_compact, value) if item is not None] or None
    return value


def _event(row: Row, listener: bool) -> dict[str, Any]:
    phase = INFO if row.duration_from_start and row.event == "open" else _PHASES.get(row.event)
    phase = phase or INFO
    event: dict[str, Any] = {
        "kind": "event",
        "category": ["network"],
        "type": [phase] if listener else ["connection", phase],
        "action": (
            "listen"
            if listener and row.event == "open"
            else f"{'listen' if listener else 'connection'}-{row.event}"
        ),
    }
    if row.event == "close" and row.duration is not None:
        # Whole microseconds, the rows' precision: duration is exactly end minus start.
        micros = round(row.duration * 1_000_000)
        event["duration"] = micros * 1000
        event["start"] = iso_time(row.timestamp - datetime.timedelta(microseconds=micros))
        event["end"] = iso_time(row.timestamp)
    return event


def _remote(row: Row, ip: str | None) -> dict[str, Any]:
    return {
        "ip": ip,
        "port": row.rport,
        "bytes": row.bytes_received,  # what the remote end sent
        "domain": row.rhost,
        "geo": {"country_iso_code": row.country},
        "as": {"number": row.asn, "organization": {"name": row.as_org}},
    }


def _process(row: Row) -> dict[str, Any]:
    return {
        "pid": row.pid,
        "name": row.pname,
        "executable": row.exe,
        "command_line": row.command,
        "args": None if row.args is None else list(row.args),
        # argc, however many arguments --command-limit (or --syslog-size) kept
        "args_count": row.args_count,
        "start": iso_time(row.started),
        "parent": {"pid": row.ppid, "name": row.parent},
        "hash": {"md5": row.md5, "sha256": row.sha256},
    }


def _own_facts(row: Row) -> dict[str, Any]:
    """histstat's facts beside ECS's, under ``histstat``."""
    owners = row.owners
    return {
        "event": row.event,
        "proto": row.proto,
        "status": row.status,
        "direction": row.direction,
        "attribution": row.attribution,
        "duration_from_start": row.duration_from_start,
        "command_length": row.command_length,
        "owners": None if owners is None else [{"pid": o.pid, "name": o.name} for o in owners],
        "owners_count": row.owners_count,
        "netns": row.netns,  # ECS has no field for a network namespace
    }


def _document(row: Row, host: HostFacts) -> dict[str, Any]:
    """The document with None for every unknown value."""
    transport = row.proto.rstrip("6")
    local_ip, version = _address(row.laddr)
    remote_ip, _ = _address(row.raddr)
    listener = row.direction == "listen" or row.status == "LISTEN"
    network: dict[str, Any] = {"transport": transport}
    network["type"] = None if version is None else f"ipv{version}"
    document: dict[str, Any] = {
        "@timestamp": iso_time(row.timestamp),
        "ecs": {"version": ECS_VERSION},
        "event": _event(row, listener),
        "network": network,
    }
    if listener:
        document["server"] = {"ip": local_ip, "port": row.lport}
    else:
        network["direction"] = NETWORK_DIRECTIONS.get(row.direction or "", UNKNOWN_DIRECTION)
        local = {"ip": local_ip, "port": row.lport, "bytes": row.bytes_sent}
        remote = _remote(row, remote_ip) if row.raddr is not None else None
        incoming = row.direction == "in" and remote is not None
        document["source"], document["destination"] = (
            (remote, local) if incoming else (local, remote)
        )
        if row.bytes_sent is not None and row.bytes_received is not None:
            network["bytes"] = row.bytes_sent + row.bytes_received
        network["community_id"] = _flow_id(transport, row.laddr, row.lport, row.raddr, row.rport)
    uid = None if row.user is None else host.uid_of(row.user)
    document.update(
        process=_process(row),
        user={"name": row.user, "id": None if uid is None else str(uid)},
        host={"name": host.name, "hostname": host.name},
        container={"id": row.container},
        agent={"type": AGENT_TYPE, "version": host.agent_version},
        related={
            "ip": list(dict.fromkeys(ip for ip in (local_ip, remote_ip) if ip is not None)),
            "user": [row.user],
            "hosts": list(dict.fromkeys(name for name in (host.name, row.rhost) if name)),
        },
        histstat=_own_facts(row),
    )
    return document


def ecs_document(row: Row, host: HostFacts | None = None) -> dict[str, Any]:
    """The row as an ECS document (nested objects, unknown values left out).

    ``source`` is the end that opened the connection and ``destination`` the other,
    whichever end's socket the row is (ECS's rule); where the direction is unknown (UDP,
    a connection older than histstat) the local end is the source. A listener has only
    ``server``."""
    return _compact(_document(row, host or this_host()))


def format_ecs_row(row: Row, fields: Sequence[str] = (), host: HostFacts | None = None) -> str:
    """``ecs_document`` on one line, escaped as JSON rows are. ``fields`` is not used:
    ECS documents have one shape (-f is refused with --ecs)."""
    line = compact_json_value(_document(row, host or this_host()))
    assert line is not None  # every document has @timestamp, ecs and event
    return line


def ecs_fields(*flags: bool) -> tuple[str, ...]:
    """No fields to choose: the documents' shape is ECS's."""
    return ()

"""The ECS field definitions histstat's documents must follow, and a check of a document."""

from __future__ import annotations

import csv
import datetime
import ipaddress
from pathlib import Path
from typing import Any, NamedTuple

DEFINITIONS = Path(__file__).resolve().parent.parent / "data" / "ecs_fields.csv"


class FieldDefinition(NamedTuple):
    type: str  # ECS's type: keyword, wildcard, long, date, ip, boolean, object
    array: bool  # ECS's normalization says "array"
    allowed: frozenset[str]  # empty: any value


def _definitions() -> tuple[str, dict[str, FieldDefinition]]:
    with open(DEFINITIONS, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(line for line in handle if not line.startswith("#")))
    versions = {row["ECS_Version"] for row in rows}
    assert len(versions) == 1, versions
    return versions.pop(), {
        row["Field"]: FieldDefinition(
            row["Type"], row["Normalization"] == "array", frozenset(row["Allowed"].split())
        )
        for row in rows
    }


ECS_VERSION, ECS_FIELDS = _definitions()

# histstat's own facts, under the custom field set ``histstat`` (ECS leaves names outside
# its field sets to their producers); typed the same way.
HISTSTAT_FIELDS = {
    "histstat.event": FieldDefinition("keyword", False, frozenset(
        ("open", "close", "state", "update"))),
    "histstat.proto": FieldDefinition("keyword", False, frozenset(("tcp", "tcp6", "udp", "udp6"))),
    "histstat.status": FieldDefinition("keyword", False, frozenset()),
    "histstat.direction": FieldDefinition("keyword", False, frozenset(("listen", "in", "out"))),
    "histstat.attribution": FieldDefinition("keyword", False, frozenset(("socket", "earlier"))),
    "histstat.duration_from_start": FieldDefinition("boolean", False, frozenset()),
    "histstat.command_length": FieldDefinition("long", False, frozenset()),
    "histstat.owners": FieldDefinition("object", True, frozenset()),
    "histstat.owners_count": FieldDefinition("long", False, frozenset()),
    "histstat.netns": FieldDefinition("long", False, frozenset()),
}  # fmt: skip


def leaves(document: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted name, value) of every field of a document of nested objects."""
    found = []
    for key, value in document.items():
        name = prefix + key
        if isinstance(value, dict):
            found += leaves(value, name + ".")
        else:
            found.append((name, value))
    return found


def _is_date(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        return datetime.datetime.fromisoformat(value).utcoffset() is not None
    except ValueError:
        return False


def _is_ip(value: Any) -> bool:
    try:
        return isinstance(value, str) and bool(ipaddress.ip_address(value))
    except ValueError:
        return False


_TYPE_CHECKS = {
    "keyword": lambda value: isinstance(value, str),
    "wildcard": lambda value: isinstance(value, str),
    "long": lambda value: isinstance(value, int) and not isinstance(value, bool),
    "boolean": lambda value: isinstance(value, bool),
    "date": _is_date,
    "ip": _is_ip,
    "object": lambda value: isinstance(value, dict),
}


def problems(document: dict) -> list[str]:
    """What keeps ``document`` from following the definitions: an unknown field, a value
    of another type, a scalar where ECS wants an array or the reverse, a value ECS does
    not allow. Empty when it follows them."""
    found = []
    for name, value in leaves(document):
        definition = ECS_FIELDS.get(name) or HISTSTAT_FIELDS.get(name)
        if definition is None:
            found.append(f"{name}: not a field of ECS {ECS_VERSION} nor of histstat")
            continue
        if definition.array != isinstance(value, list):
            found.append(f"{name}: {'an array' if definition.array else 'one value'} expected")
            continue
        for item in value if definition.array else [value]:
            if not _TYPE_CHECKS[definition.type](item):
                found.append(f"{name}: {item!r} is not of type {definition.type}")
            elif definition.allowed and item not in definition.allowed:
                found.append(f"{name}: {item!r} is not among {sorted(definition.allowed)}")
    return found

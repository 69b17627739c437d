"""Formatters: pure functions that turn one row into one line of text, no I/O."""

from __future__ import annotations

import csv
import datetime
import io
import json
import re
import shlex
import sys
from collections.abc import Sequence
from typing import Callable

from histstat.records import ProcessRef, Row

TEXT_FIELDS = (
    "proto", "laddr", "lport", "raddr", "rport", "status",
    "pid", "pname", "time", "date", "user", "command",
)  # fmt: skip
HASH_FIELDS = ("md5", "sha256")
JSON_HASH_FIELDS = ("exe", "md5", "sha256")
GEO_FIELDS = ("country", "asn", "as_org")
# Every field a row can show, for -f/--fields.
ALL_FIELDS = (
    "event", "proto", "laddr", "lport", "raddr", "rport", "rhost", *GEO_FIELDS, "netns",
    "status", "duration", "duration_from_start", "bytes_sent", "bytes_received",
    "direction", "attribution", "pid", "pname", "owners", "owners_count", "ppid", "parent",
    "container", "started", "time", "date", "user", "exe", "md5", "sha256", "command",
    "command_length", "args", "timestamp",
)  # fmt: skip
# The parent process's fields, after pname (and the owners) among JSON's keys, and the
# process's container after them.
PARENT_FIELDS = ("ppid", "parent")
BYTE_FIELDS = ("bytes_sent", "bytes_received")
OWNER_FIELDS = ("owners", "owners_count")


UNKNOWN = "-"
NO_REMOTE = "*"
EMPTY = '""'  # an empty text (a process may name itself ""), never shown like unknown

# ANSI colours of the status column (--color): the states an analyst looks for first.
_STATUS_COLORS = {
    "ESTABLISHED": "32", "LISTEN": "34", "SYN_SENT": "33", "SYN_RECV": "33",
    "FIN_WAIT1": "35", "FIN_WAIT2": "35", "TIME_WAIT": "35", "CLOSE_WAIT": "35",
    "LAST_ACK": "35", "CLOSING": "35", "CLOSE": "31",
}  # fmt: skip
_RESET = "\x1b[0m"

# A spreadsheet runs a cell that starts with one of these as a formula (OWASP).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")

# What is never written raw: controls (Cc), format characters (Cf: bidi overrides,
# zero-width), surrogates (Cs: undecodable bytes), the line and paragraph separators
# (Zl, Zp), and the Default_Ignorable_Code_Point characters, which are invisible although
# most are not Cf (U+034F, the Hangul fillers U+115F, U+1160, U+3164, U+FFA0, the variation
# selectors): a name holding them looks like another. As (first, last) code points, from
# Unicode 17.0's DerivedGeneralCategory.txt (Cc, Cf, Cs, Zl, Zp) and
# DerivedCoreProperties.txt (Default_Ignorable_Code_Point, 4,174 code points, unchanged
# since Unicode 14.0). Embedded because unicodedata has no Default_Ignorable property, and
# scanning every code point at start-up costs 0.2 s; a test checks the table against the
# running Python's unicodedata.
HIDDEN_RANGES = (
    (0x0000, 0x001F), (0x007F, 0x009F), (0x00AD, 0x00AD), (0x034F, 0x034F),
    (0x0600, 0x0605), (0x061C, 0x061C), (0x06DD, 0x06DD), (0x070F, 0x070F),
    (0x0890, 0x0891), (0x08E2, 0x08E2), (0x115F, 0x1160), (0x17B4, 0x17B5),
    (0x180B, 0x180F), (0x200B, 0x200F), (0x2028, 0x202E), (0x2060, 0x206F),
    (0x3164, 0x3164), (0xD800, 0xDFFF), (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0), (0xFFF0, 0xFFFB), (0x110BD, 0x110BD), (0x110CD, 0x110CD),
    (0x13430, 0x1343F), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF),
)  # fmt: skip
_HIDDEN_RUN = re.compile(
    "[" + "".join(f"\\U{first:08x}-\\U{last:08x}" for first, last in HIDDEN_RANGES) + "]+"
)
_NAMED_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}
_SURROGATE_ESCAPES = range(0xDC80, 0xDD00)  # how Python carries bytes that are not UTF-8
_UNDECODABLE_RUN = re.compile("[\\udc80-\\udcff]+")


def _remote(fields: list[str], resolve: bool, geoip: bool) -> list[str]:
    """rhost (-r) and the GeoIP fields go right after rport."""
    at = fields.index("rport") + 1
    return (
        fields[:at]
        + (["rhost"] if resolve else [])
        + (list(GEO_FIELDS) if geoip else [])
        + fields[at:]
    )


def text_fields(
    with_hashes: bool,
    closed: bool = False,
    resolve: bool = False,
    geoip: bool = False,
    with_bytes: bool = False,
) -> tuple[str, ...]:
    """The text columns in order. The original's by default; hashes go just before the
    command; with rows beside open rows (``closed``: --closed, --transitions, --update),
    event comes first and duration follows status. Bytes and owners only through -f."""
    fields = _remote(list(TEXT_FIELDS), resolve, geoip)
    if with_hashes:
        fields[-1:-1] = HASH_FIELDS
    if closed:
        fields.insert(fields.index("status") + 1, "duration")
        fields.insert(0, "event")
    return tuple(fields)


def json_fields(
    with_hashes: bool,
    closed: bool = False,
    resolve: bool = False,
    geoip: bool = False,
    with_bytes: bool = False,
) -> tuple[str, ...]:
    """The JSON keys in order: event, the text columns with the network namespace
    (netns) before status and direction and attribution after it (duration and
    duration_from_start before them with rows beside open rows, then bytes_sent and
    bytes_received with close or update rows), owners, owners_count, the parent and the
    container after pname, exe and hashes with --hash, command_length after the command,
    and the timestamp."""
    fields = _remote(list(TEXT_FIELDS), resolve, geoip)
    fields.insert(fields.index("status"), "netns")
    after_status = fields.index("status") + 1
    lifecycle = ["duration", "duration_from_start"] if closed else []
    lifecycle += list(BYTE_FIELDS) if with_bytes else []
    fields[after_status:after_status] = [*lifecycle, "direction", "attribution"]
    after_pname = fields.index("pname") + 1
    fields[after_pname:after_pname] = [*OWNER_FIELDS, *PARENT_FIELDS, "container"]
    if with_hashes:
        fields[-1:-1] = JSON_HASH_FIELDS
    return ("event", *fields, "command_length", "timestamp")


def _text_escape(code: int) -> str:
    char = chr(code)
    if char in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[char]
    if code < 0x100:
        return f"\\x{code:02x}"
    if code in _SURROGATE_ESCAPES:
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _json_escape(code: int) -> str:
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


class _Escapes(dict[int, str]):
    """A str.translate table that makes each character's escape the first time it is
    asked for: only hidden characters reach it, so it holds a few thousand at most."""

    def __init__(self, escape: Callable[[int], str]) -> None:
        super().__init__()
        self._escape = escape

    def __missing__(self, code: int) -> str:
        escaped = self[code] = self._escape(code)
        return escaped


_TEXT_ESCAPES = _Escapes(_text_escape)
_JSON_ESCAPES = _Escapes(_json_escape)
_BYTE_ESCAPES = _Escapes(lambda code: f"\\x{code - 0xDC00:02x}")


def _in_text(run: re.Match[str]) -> str:
    return run.group().translate(_TEXT_ESCAPES)


def _in_json(run: re.Match[str]) -> str:
    return run.group().translate(_JSON_ESCAPES)


def _as_bytes(run: re.Match[str]) -> str:
    return run.group().translate(_BYTE_ESCAPES)


class _Memo:
    """The last results of a costly function of a string, kept while they fit a budget
    of bytes: rows of one process repeat the same name and command (the same string
    object, whose hash Python keeps), so each is escaped once, not once per row."""

    def __init__(self, function: Callable[[str], str], budget: int) -> None:
        self._function = function
        self._budget = budget
        self._used = 0
        self._results: dict[str, str] = {}

    def __call__(self, value: str) -> str:
        result = self._results.get(value)
        if result is None:
            result = self._function(value)
            cost = sys.getsizeof(value) + sys.getsizeof(result)
            if cost <= self._budget:
                while self._used + cost > self._budget:  # oldest first
                    old = next(iter(self._results))
                    self._used -= sys.getsizeof(old) + sys.getsizeof(self._results.pop(old))
                self._results[value] = result
                self._used += cost
        return result


# Bytes each memo may hold: a hundred processes' commands at the default --command-limit,
# each escaped to four times its length.
_MEMO_BUDGET = 32 << 20


def _escape_text(value: str) -> str:
    return _HIDDEN_RUN.sub(_in_text, value)


_escape_text_memo = _Memo(_escape_text, _MEMO_BUDGET)


def escape_text(value: str) -> str:
    """Show every control, format, invisible and undecodable character as a visible
    escape."""
    if value.isascii() and value.isprintable():
        return value
    return _escape_text_memo(value)


def json_text(value: str) -> str:
    """The true text for JSON, except undecodable bytes, which become ``\\xNN`` text."""
    if value.isascii():
        return value
    return _UNDECODABLE_RUN.sub(_as_bytes, value)


def _escape_json_line(line: str) -> str:
    """Escape, in JSON's own syntax, what json.dumps leaves raw: DEL, C1, Cf, Cs, Zl, Zp
    and the invisible (default ignorable) characters."""
    if line.isascii() and "\x7f" not in line:
        return line
    return _HIDDEN_RUN.sub(_in_json, line)


def _json_string(value: str) -> str:
    return _escape_json_line(json.dumps(json_text(value), ensure_ascii=False))


_json_string_memo = _Memo(_json_string, _MEMO_BUDGET)


_VALUE_OF: dict[str, Callable[[Row], str | None]] = {
    "time": lambda row: row.timestamp.strftime("%H:%M:%S"),
    "date": lambda row: row.timestamp.strftime("%y-%m-%d"),
    "timestamp": lambda row: row.timestamp.isoformat(timespec="microseconds"),
    "started": lambda row: iso_time(row.started),
}


def iso_time(when: datetime.datetime | None) -> str | None:
    """ISO 8601 with microseconds and the UTC offset, as every time histstat writes."""
    return None if when is None else when.isoformat(timespec="microseconds")


def field_value(row: Row, field: str):
    """The typed value of one field; None when unknown or absent."""
    read = _VALUE_OF.get(field)
    return read(row) if read is not None else getattr(row, field)


def owners_text(owners: tuple[ProcessRef, ...]) -> str:
    """``pid/name`` items joined by ``,``; a comma in a name is escaped (``\\x2c``), so
    that the items split apart again, and an unknown name is ``-``."""
    return ",".join(
        f"{ref.pid}/"
        + (UNKNOWN if ref.name is None else (escape_text(ref.name) or EMPTY).replace(",", "\\x2c"))
        for ref in owners
    )


def owners_json(owners: tuple[ProcessRef, ...]) -> list[dict[str, object]]:
    """The holders as JSON takes them (names as true text, bad bytes as \\xNN)."""
    return [
        {"pid": ref.pid, "name": None if ref.name is None else json_text(ref.name)}
        for ref in owners
    ]


def _text_of(value, field: str, row: Row) -> str:
    if field == "owners":
        return owners_text(value)
    if field == "duration":
        # Seconds; ">" marks a lower bound: the connection predates histstat's start.
        return (">" if row.duration_from_start else "") + f"{value:.3f}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str):
        return escape_text(value) if value else EMPTY
    if isinstance(value, tuple):  # args: quoted as a shell would need them, then escaped
        return escape_text(shlex.join(value))
    return str(value)


def text_value(row: Row, field: str) -> str:
    """One field as safe text: ``*`` for no remote end, ``-`` for unknown, ``""`` for
    empty."""
    value = field_value(row, field)
    if value is None:
        return NO_REMOTE if field in ("raddr", "rport") else UNKNOWN
    return _text_of(value, field, row)


def color_cell(cell: str, field: str, status: str | None) -> str:
    """The status cell (padding included) in its colour; other cells unchanged."""
    code = _STATUS_COLORS.get(status or "") if field == "status" else None
    if code is None:
        return cell
    text = cell.rstrip(" ")
    return f"\x1b[{code}m{text}{_RESET}{cell[len(text) :]}"


def plain_header(fields: Sequence[str]) -> str:
    return "\t".join(fields)


def format_plain_row(row: Row, fields: Sequence[str], color: bool = False) -> str:
    """Tab-separated; tabs inside values are escaped, so columns never shift."""
    cells = (text_value(row, field) for field in fields)
    if color:
        cells = (color_cell(cell, field, row.status) for cell, field in zip(cells, fields))
    return "\t".join(cells)


def _csv_cell(row: Row, field: str) -> str:
    """Escaped text, an empty cell when unknown (``""`` when empty), and never a
    spreadsheet formula."""
    value = field_value(row, field)
    if value is None:
        return ""
    text = _text_of(value, field, row)
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def _csv_line(cells: Sequence[str]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow(cells)
    return buffer.getvalue()


def csv_header(fields: Sequence[str]) -> str:
    return _csv_line(fields)


def format_csv_row(row: Row, fields: Sequence[str]) -> str:
    """One RFC 4180 record (the line ending is the sink's)."""
    return _csv_line([_csv_cell(row, field) for field in fields])


def json_value(value: object) -> str:
    """One value in JSON, as json.dumps writes it (floats through their repr), with the
    hidden characters of every string in it escaped: lists, tuples and objects too. An
    owner (ProcessRef) is an object: {"pid": ..., "name": ...}."""
    if isinstance(value, ProcessRef):
        return '{"pid": ' + json_value(value.pid) + ', "name": ' + json_value(value.name) + "}"
    if isinstance(value, str):
        return _json_string_memo(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(json_value, value)) + "]"
    if isinstance(value, dict):
        return (
            "{"
            + ", ".join(_json_key(str(key)) + json_value(item) for key, item in value.items())
            + "}"
        )
    return json.dumps(value)


def compact_json_value(value: object) -> str | None:
    """Like ``json_value``, but leaving out the None values of objects and lists, and the
    objects and lists left empty; None when nothing is left."""
    if isinstance(value, dict):
        parts = []
        for key, item in value.items():
            text = None if item is None else compact_json_value(item)
            if text is not None:
                parts.append(_json_key(key) + text)
        return "{" + ", ".join(parts) + "}" if parts else None
    if isinstance(value, ProcessRef):
        return compact_json_value(value._asdict())
    if isinstance(value, (list, tuple)):
        items = [text for text in map(compact_json_value, value) if text is not None]
        return "[" + ", ".join(items) + "]" if items else None
    return None if value is None else json_value(value)


_JSON_KEYS: dict[str, str] = {}


def _json_key(field: str) -> str:
    """A key and its colon; keys are histstat's own names, never a process's text."""
    key = _JSON_KEYS.get(field)
    if key is None:
        key = _JSON_KEYS[field] = json.dumps(field) + ": "
    return key


# The latest timestamp written in ISO 8601, with its text: a row's time, date and
# timestamp are cut from one isoformat (what the strftime of _VALUE_OF gives), and the
# rows of one poll share their timestamp.
_last_iso: tuple[datetime.datetime | None, str] = (None, "")


def _iso_timestamp(row: Row) -> str:
    global _last_iso
    when, text = _last_iso  # one tuple: another thread's update is seen whole
    if when is not row.timestamp:
        when = row.timestamp
        text = when.isoformat(timespec="microseconds")
        _last_iso = (when, text)
    return text


_JSON_VALUE_OF: dict[str, Callable[[Row], str | None]] = {
    **_VALUE_OF,
    "timestamp": _iso_timestamp,
    "time": lambda row: _iso_timestamp(row)[11:19],  # %H:%M:%S
    "date": lambda row: _iso_timestamp(row)[2:10],  # %y-%m-%d
}
# The fields whose text is made of ASCII digits and punctuation alone (times): quoted
# as they are, with no escaping to do and nothing worth remembering.
_PLAIN_JSON_FIELDS = frozenset(_JSON_VALUE_OF)
_ROW_INDEX = {field: index for index, field in enumerate(Row._fields)}

# A JSON key and its colon, where the value is (the row's index, or the function that
# makes it), and whether its text is plain: per list of fields, made once.
_JsonPlan = tuple[tuple[str, int, Callable[[Row], object] | None, bool], ...]
_JSON_PLANS: dict[tuple[str, ...], _JsonPlan] = {}


def _json_plan(fields: Sequence[str]) -> _JsonPlan:
    key = fields if type(fields) is tuple else tuple(fields)
    plan = _JSON_PLANS.get(key)
    if plan is None:
        plan = _JSON_PLANS[key] = tuple(
            (_json_key(field), _ROW_INDEX.get(field, -1),
             _JSON_VALUE_OF.get(field) or (None if field in _ROW_INDEX else _attribute(field)),
             field in _PLAIN_JSON_FIELDS)
            for field in key
        )  # fmt: skip
    return plan


def _attribute(field: str) -> Callable[[Row], object]:
    return lambda row: getattr(row, field)  # as field_value: an unknown field raises


def format_json_row(row: Row, fields: Sequence[str]) -> str:
    """One NDJSON object: real types, null for unknown, no raw control character.

    Built value by value, so that a process's name and command, repeated on each of its
    rows, are encoded once (``_json_string_memo``); the line is what json.dumps would
    write, with hidden characters escaped."""
    parts = []
    for key, index, read, plain in _json_plan(fields):
        value = row[index] if read is None else read(row)
        if value is None:
            parts.append(key + "null")
        elif type(value) is str:
            parts.append(key + ('"' + value + '"' if plain else _json_string_memo(value)))
        elif type(value) is int:
            parts.append(key + int.__repr__(value))
        else:
            parts.append(key + json_value(value))
    return "{" + ", ".join(parts) + "}"

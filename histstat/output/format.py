"""Formatters: pure functions that turn one row into one line of text, no I/O."""

from __future__ import annotations

import csv
import io
import json
import unicodedata
from collections.abc import Sequence
from typing import Callable

from histstat.records import Row

TEXT_FIELDS = (
    "proto", "laddr", "lport", "raddr", "rport", "status",
    "pid", "pname", "time", "date", "user", "command",
)  # fmt: skip
HASH_FIELDS = ("md5", "sha256")
JSON_HASH_FIELDS = ("exe", "md5", "sha256")
GEO_FIELDS = ("country", "asn", "as_org")
# Every field a row can show, for -f/--fields.
ALL_FIELDS = (
    "event", "proto", "laddr", "lport", "raddr", "rport", "rhost", *GEO_FIELDS, "status",
    "duration", "duration_from_start", "direction", "attribution", "pid", "pname", "time",
    "date", "user", "exe", "md5", "sha256", "command", "timestamp",
)  # fmt: skip


UNKNOWN = "-"
NO_REMOTE = "*"

# ANSI colours of the status column (--color): the states an analyst looks for first.
_STATUS_COLORS = {
    "ESTABLISHED": "32", "LISTEN": "34", "SYN_SENT": "33", "SYN_RECV": "33",
    "FIN_WAIT1": "35", "FIN_WAIT2": "35", "TIME_WAIT": "35", "CLOSE_WAIT": "35",
    "LAST_ACK": "35", "CLOSING": "35", "CLOSE": "31",
}  # fmt: skip
_RESET = "\x1b[0m"

# A spreadsheet runs a cell that starts with one of these as a formula (OWASP).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")

# Unicode categories never written raw: controls, format characters (bidi overrides,
# zero-width), surrogates (undecodable bytes) and the line/paragraph separators.
_HIDDEN_CATEGORIES = frozenset(("Cc", "Cf", "Cs", "Zl", "Zp"))
_NAMED_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}
_SURROGATE_ESCAPES = range(0xDC80, 0xDD00)  # how Python carries bytes that are not UTF-8


def _remote(fields: list, resolve: bool, geoip: bool) -> list:
    """rhost (-r) and the GeoIP fields go right after rport."""
    at = fields.index("rport") + 1
    return (
        fields[:at]
        + (["rhost"] if resolve else [])
        + (list(GEO_FIELDS) if geoip else [])
        + fields[at:]
    )


def text_fields(
    with_hashes: bool, closed: bool = False, resolve: bool = False, geoip: bool = False
) -> tuple:
    """The text columns in order. The original's by default; hashes go just before the
    command; with --closed, event comes first and duration follows status."""
    fields = _remote(list(TEXT_FIELDS), resolve, geoip)
    if with_hashes:
        fields[-1:-1] = HASH_FIELDS
    if closed:
        fields.insert(fields.index("status") + 1, "duration")
        fields.insert(0, "event")
    return tuple(fields)


def json_fields(
    with_hashes: bool, closed: bool = False, resolve: bool = False, geoip: bool = False
) -> tuple:
    """The JSON keys in order: event, the text columns with direction and attribution
    after status (duration and duration_from_start too, with --closed), exe and hashes
    with --hash, and the timestamp."""
    fields = _remote(list(TEXT_FIELDS), resolve, geoip)
    after_status = fields.index("status") + 1
    lifecycle = ["duration", "duration_from_start"] if closed else []
    fields[after_status:after_status] = [*lifecycle, "direction", "attribution"]
    if with_hashes:
        fields[-1:-1] = JSON_HASH_FIELDS
    return ("event", *fields, "timestamp")


def _hidden(char: str) -> bool:
    return unicodedata.category(char) in _HIDDEN_CATEGORIES


def _escape_char(char: str) -> str:
    code = ord(char)
    if char in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[char]
    if code < 0x100:
        return f"\\x{code:02x}"
    if code in _SURROGATE_ESCAPES:
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escape_text(value: str) -> str:
    """Show every control, format and undecodable character as a visible escape."""
    if value.isascii() and value.isprintable():
        return value
    return "".join(_escape_char(c) if _hidden(c) else c for c in value)


def json_text(value: str) -> str:
    """The true text for JSON, except undecodable bytes, which become ``\\xNN`` text."""
    if value.isascii() or not any(ord(c) in _SURROGATE_ESCAPES for c in value):
        return value
    return "".join(
        f"\\x{ord(c) - 0xDC00:02x}" if ord(c) in _SURROGATE_ESCAPES else c for c in value
    )


def _json_escape_char(char: str) -> str:
    code = ord(char)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def _escape_json_line(line: str) -> str:
    """Escape, in JSON's own syntax, what json.dumps leaves raw: DEL, C1, Cf, Zl, Zp."""
    if line.isascii() and "\x7f" not in line:
        return line
    return "".join(_json_escape_char(c) if _hidden(c) else c for c in line)


_VALUE_OF: dict = {
    "time": lambda row: row.timestamp.strftime("%H:%M:%S"),
    "date": lambda row: row.timestamp.strftime("%y-%m-%d"),
    "timestamp": lambda row: row.timestamp.isoformat(timespec="microseconds"),
}


def field_value(row: Row, field: str):
    """The typed value of one field; None when unknown or absent."""
    read: Callable | None = _VALUE_OF.get(field)
    return read(row) if read is not None else getattr(row, field)


def _text_of(value, field: str, row: Row) -> str:
    if field == "duration":
        # Seconds; ">" marks a lower bound: the connection predates histstat's start.
        return (">" if row.duration_from_start else "") + f"{value:.3f}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return escape_text(value) if isinstance(value, str) else str(value)


def text_value(row: Row, field: str) -> str:
    """One field as safe text: ``*`` for no remote end, ``-`` for unknown."""
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
    """Escaped text, empty when unknown, and never a spreadsheet formula."""
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


def format_json_row(row: Row, fields: Sequence[str]) -> str:
    """One NDJSON object: real types, null for unknown, no raw control character."""
    obj = {}
    for field in fields:
        value = field_value(row, field)
        obj[field] = json_text(value) if isinstance(value, str) else value
    return _escape_json_line(json.dumps(obj, ensure_ascii=False))

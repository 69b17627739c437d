"""Formatters: pure functions that turn one row into one line of text, no I/O."""

from __future__ import annotations

import csv
import io
import json
import unicodedata
from collections.abc import Sequence
from typing import Callable, NamedTuple

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

# Minimum widths of the pretty view; a longer value widens its own line only, because
# a stream cannot know the widest value ahead. Only a terminal's view is ever cut.
PRETTY_WIDTHS = {
    "proto": 5, "laddr": 15, "lport": 5, "raddr": 15, "rport": 5, "status": 11,
    "pid": 7, "pname": 15, "time": 8, "date": 8, "user": 10, "exe": 20,
    "md5": 32, "sha256": 64, "event": 5, "duration": 9, "direction": 6, "attribution": 7,
    "rhost": 20, "country": 2, "asn": 6, "as_org": 15,
}  # fmt: skip
PRETTY_GAP = "  "
ELLIPSIS = "\u2026"

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


def _colored(cell: str, field: str, status: str | None) -> str:
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
        cells = (_colored(cell, field, row.status) for cell, field in zip(cells, fields))
    return "\t".join(cells)


class Screen(NamedTuple):
    """What a terminal shows: its width in columns and the encoding it reads."""

    width: int
    encoding: str = "utf-8"


def display_width(text: str) -> int:
    """Columns ``text`` takes on a terminal: wide (East Asian) characters take two,
    combining marks none."""
    if text.isascii():
        return len(text)
    return sum(_char_width(char) for char in text)


def _char_width(char: str) -> int:
    if unicodedata.combining(char):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def _prefix_within(text: str, columns: int) -> str:
    """The longest start of ``text`` that fits ``columns``."""
    if text.isascii():
        return text[: max(columns, 0)]
    used = 0
    for end, char in enumerate(text):
        used += _char_width(char)
        if used > columns:
            return text[:end]
    return text


def _as_shown(cell: str, encoding: str) -> str:
    """The cell as the stdout writer will send it: what the terminal's encoding cannot
    carry becomes an escape, which takes more columns."""
    if cell.isascii():
        return cell
    return cell.encode(encoding, "backslashreplace").decode(encoding)


def _ellipsis(encoding: str) -> str:
    try:
        ELLIPSIS.encode(encoding)
    except (UnicodeError, LookupError):
        return "..."
    return ELLIPSIS


def _cut_line(cells: list, width: int, ellipsis: str) -> list:
    """The cells that fit ``width`` once joined, the last one ending in ``ellipsis``."""
    fitted: list = []
    used = 0
    mark = display_width(ellipsis)
    for cell in cells:
        gap = len(PRETTY_GAP) if fitted else 0
        cell_width = display_width(cell)
        if used + gap + cell_width <= width:
            fitted.append(cell)
            used += gap + cell_width
            continue
        room = width - used - gap
        if room >= mark:
            fitted.append(_prefix_within(cell, room - mark) + ellipsis)
        elif fitted:  # the mark goes at the end of the previous cell instead
            last = fitted[-1]
            fitted[-1] = _prefix_within(last, display_width(last) + gap + room - mark) + ellipsis
        break
    return fitted


def _fit_screen(cells: list, fields: Sequence[str], screen: Screen) -> list:
    """Fit a terminal: shorten the command column first; when the other columns alone
    are too wide, cut the line at the terminal's edge."""
    cells = [_as_shown(cell, screen.encoding) for cell in cells]
    ellipsis = _ellipsis(screen.encoding)
    excess = display_width(PRETTY_GAP.join(cells)) - screen.width
    if excess > 0 and "command" in fields:
        at = list(fields).index("command")
        command = cells[at]
        keep = display_width(command) - excess - display_width(ellipsis)
        cells[at] = _prefix_within(command, max(keep, 0)) + ellipsis
    fitted = _cut_line(cells, screen.width, ellipsis)
    if display_width(PRETTY_GAP.join(fitted)) > screen.width:  # narrower than any mark
        return [_prefix_within(PRETTY_GAP.join(fitted), screen.width)]
    return fitted


def _pretty_cells(cells: Sequence[str], fields: Sequence[str], screen: Screen | None) -> list:
    """Cells padded to their columns (the last never padded), fitted to ``screen`` (a
    terminal) when one is given."""
    padded = [cell.ljust(PRETTY_WIDTHS.get(field, 0)) for cell, field in zip(cells, fields)]
    padded[-1] = cells[-1]
    return padded if screen is None else _fit_screen(padded, fields, screen)


def pretty_header(fields: Sequence[str], screen: Screen | None = None) -> str:
    return PRETTY_GAP.join(_pretty_cells(list(fields), fields, screen))


def format_pretty_row(
    row: Row, fields: Sequence[str], screen: Screen | None = None, color: bool = False
) -> str:
    """Space-aligned columns. Every character is kept unless ``screen`` is given, which
    only a terminal's view does; logs and pipes always get the whole row."""
    cells = _pretty_cells([text_value(row, field) for field in fields], fields, screen)
    if color:
        cells = [_colored(cell, field, row.status) for cell, field in zip(cells, fields)]
    return PRETTY_GAP.join(cells)


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

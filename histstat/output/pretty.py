"""The pretty view (-p): aligned columns whose widths follow the values seen so far."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import NamedTuple

from histstat.output.format import (
    GEO_FIELDS,
    HASH_FIELDS,
    NO_REMOTE,
    TEXT_FIELDS,
    color_cell,
    escape_text,
    text_value,
)
from histstat.records import Row

GAP = " "  # one space, as ps does: a 100-column terminal has none to spare
ELLIPSIS = "\u2026"
# On a terminal a column grows only while this many columns stay free for the command,
# the reason to read histstat rather than ss.
COMMAND_ROOM = 16


class Width(NamedTuple):
    """How wide a column starts (the header's width) and how wide it may grow."""

    initial: int
    cap: int


# Initial widths are the header's, so they hold the usual values (pid: any Linux pid,
# up to 4194304; local: 127.0.0.1:45678). Numbers and times never need cutting: their
# caps hold any value they can take. Text columns grow up to a cap that keeps one odd
# value from widening the whole view.
WIDTHS = {
    "time": Width(8, 8), "date": Width(8, 8), "timestamp": Width(32, 32),
    "event": Width(5, 6), "proto": Width(5, 5),
    "local": Width(15, 30), "remote": Width(15, 30),
    "laddr": Width(15, 26), "raddr": Width(15, 26), "lport": Width(5, 5), "rport": Width(5, 5),
    "rhost": Width(20, 40), "country": Width(7, 7), "asn": Width(6, 10), "as_org": Width(15, 30),
    "status": Width(11, 11), "duration": Width(9, 14), "duration_from_start": Width(19, 19),
    "direction": Width(9, 9), "attribution": Width(11, 11),
    "pid": Width(7, 10), "pname": Width(8, 15), "user": Width(8, 12), "exe": Width(20, 40),
    "ppid": Width(7, 10), "parent": Width(8, 15), "started": Width(32, 32),
    "md5": Width(32, 32), "sha256": Width(64, 64),
    "command": Width(7, 40),  # only where it is not the last column
    "args": Width(7, 40),
    "command_length": Width(14, 14),
    "bytes_sent": Width(10, 20), "bytes_received": Width(14, 20),
    "owners": Width(12, 40), "owners_count": Width(12, 12),
    "netns": Width(10, 10), "container": Width(12, 20),
}  # fmt: skip

# Endpoints are shown as ss shows them, address and port in one column.
_ENDPOINTS = {"laddr": "local", "lport": "local", "raddr": "remote", "rport": "remote"}
_ENDPOINT_FIELDS = {"local": ("laddr", "lport"), "remote": ("raddr", "rport")}
_ADDRESS_COLUMNS = frozenset(("local", "remote", "laddr", "raddr"))
FLEXIBLE = "command"  # the column a terminal shortens first, wherever it stands


def pretty_fields(
    with_hashes: bool,
    closed: bool = False,
    resolve: bool = False,
    geoip: bool = False,
    with_bytes: bool = False,
) -> tuple[str, ...]:
    """The default fields of -p: the time first, the event with --closed (--transitions,
    --update), the
    connection, its process, hashes with --hash, and the command last. The date and a
    close row's duration are left to -f, plain, CSV and JSON: they would leave a
    100-column terminal no room for the user and the command."""
    fields = ["time", *(["event"] if closed else []), *TEXT_FIELDS[:5]]
    fields += [*(["rhost"] if resolve else []), *(GEO_FIELDS if geoip else [])]
    fields += ["status", "pid", "pname", "user", *(HASH_FIELDS if with_hashes else [])]
    return (*fields, "command")


class Column(NamedTuple):
    """One column of the view: its header, the fields it shows, its widths."""

    label: str
    fields: tuple[str, ...]
    width: Width


def pretty_columns(fields: Sequence[str]) -> tuple[Column, ...]:
    """The columns of ``fields``: laddr with lport (raddr with rport) become one
    ``local`` (``remote``) column where the first of the two stands, when both are
    asked for."""
    columns: list[Column] = []
    for field in fields:
        joined = _ENDPOINTS.get(field)
        if joined is not None and all(part in fields for part in _ENDPOINT_FIELDS[joined]):
            if not any(column.label == joined for column in columns):
                columns.append(_column(joined, _ENDPOINT_FIELDS[joined]))
            continue
        columns.append(_column(field, (field,)))
    return tuple(columns)


def _column(label: str, fields: tuple[str, ...]) -> Column:
    known = WIDTHS.get(label, Width(0, 0))
    initial = max(display_width(label), known.initial)
    return Column(label, fields, Width(initial, max(initial, known.cap)))


def endpoint_text(address: str | None, port: int | None) -> str:
    """``address:port`` as ss writes it: IPv6 in brackets (``[::1]:22``), ``*`` for a
    part that is absent (``*:*``: no remote end)."""
    host = NO_REMOTE if address is None else escape_text(address)
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{NO_REMOTE if port is None else port}"


# A runtime's container id (64 hex digits) is shown as its first 12, as docker ps does;
# a machine's name (systemd-nspawn) whole, as far as its column allows.
SHORT_ID = 12
_RUNTIME_ID = re.compile(r"[0-9a-f]{64}")


def _container_text(row: Row) -> str:
    if row.container is not None and _RUNTIME_ID.fullmatch(row.container):
        return row.container[:SHORT_ID]
    return text_value(row, "container")


def _cell_text(row: Row, column: Column) -> str:
    if column.label in _ENDPOINT_FIELDS:
        address, port = column.fields
        return endpoint_text(getattr(row, address), getattr(row, port))
    if column.label == "container":
        return _container_text(row)
    return text_value(row, column.fields[0])


def display_width(text: str) -> int:
    """Columns ``text`` takes on a terminal: wide (East Asian) characters take two,
    combining marks none. Padding and cutting both measure with it."""
    if text.isascii():
        return len(text)
    return sum(_char_width(char) for char in text)


# Characters measured per column at most: a cell is measured only as far as a column can
# show it, since a command may be 64K characters long and measuring is per character
# (44 ms a row for 64K wide characters). Beyond four a column, a text is mostly
# combining marks, which take no column: a hostile one, shown cut on a terminal.
_MEASURED_PER_COLUMN = 4


def _width_up_to(text: str, limit: int) -> int:
    """``display_width(text)``, or ``limit`` when it is at least that."""
    if text.isascii():
        return min(len(text), limit)
    used = 0
    for char in text[: _MEASURED_PER_COLUMN * limit]:
        used += _char_width(char)
        if used >= limit:
            return limit
    return used


def _at_most(text: str, columns: int, mark: str) -> str:
    """``text`` cut, with ``mark``, where it holds more characters than ``columns``
    can show, so that fitting it measures no more."""
    longest = _MEASURED_PER_COLUMN * columns
    return text if len(text) <= longest else text[:longest] + mark


def _char_width(char: str) -> int:
    if unicodedata.category(char) in ("Mn", "Me"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def _prefix_within(text: str, columns: int) -> str:
    """The longest start of ``text`` that fits ``columns``; combining marks stay with
    the character they follow."""
    if text.isascii():
        return text[: max(columns, 0)]
    used = 0
    for end, char in enumerate(text):
        used += _char_width(char)
        if used > columns:
            return text[:end]
    return text


def _suffix_within(text: str, columns: int) -> str:
    """The longest end of ``text`` that fits ``columns``, starting on a base character."""
    if text.isascii():
        return text[len(text) - max(columns, 0) :]
    used = 0
    start = len(text)
    for at in range(len(text) - 1, -1, -1):
        used += _char_width(text[at])
        if used > columns:
            break
        if _char_width(text[at]):
            start = at
    return text[start:]


def _padded(text: str, columns: int) -> str:
    return text + " " * (columns - _width_up_to(text, columns))


def _cut(text: str, columns: int, mark: str, middle: bool = False) -> str:
    """``text`` in at most ``columns``, ending in ``mark`` where it was cut; ``middle``
    keeps both ends (an address's port) and cuts in between."""
    if display_width(text) <= columns:
        return text
    room = columns - display_width(mark)
    if room < 0:
        return _prefix_within(mark, columns)
    if not middle:
        return _prefix_within(text, room) + mark
    tail = _suffix_within(text, room // 2)
    return _prefix_within(text, room - display_width(tail)) + mark + tail


def _as_shown(text: str, encoding: str) -> str:
    """The text as the stdout writer will send it: what the encoding cannot carry
    becomes an escape, which takes more columns."""
    if text.isascii():
        return text
    return text.encode(encoding, "backslashreplace").decode(encoding)


def _ellipsis(encoding: str) -> str:
    try:
        ELLIPSIS.encode(encoding)
    except (UnicodeError, LookupError):
        return "..."
    return ELLIPSIS


def _cut_line(cells: list[str], width: int, mark: str) -> list[str]:
    """The cells that fit ``width`` once joined, the last one ending in ``mark``."""
    fitted: list[str] = []
    used = 0
    for cell in cells:
        gap = len(GAP) if fitted else 0
        cell_width = display_width(cell)
        if used + gap + cell_width <= width:
            fitted.append(cell)
            used += gap + cell_width
            continue
        room = width - used - gap
        mark_width = display_width(mark)
        if room >= mark_width:
            fitted.append(_prefix_within(cell, room - mark_width) + mark)
        elif fitted:  # the mark goes at the end of the previous cell instead
            last = fitted[-1]
            fitted[-1] = _prefix_within(last, display_width(last) + gap + room - mark_width) + mark
        break
    return fitted


class PrettyView:
    """Aligned columns for one stream of rows (a terminal, a pipe or a log).

    A column starts at its initial width, which the header shows, and grows when a
    wider value arrives, up to its cap; it never shrinks, so the rows that follow stay
    aligned with each other. Without a terminal width every character is kept: a value
    wider than its cap widens its own line only. Given a terminal's width, every column
    but the command keeps its width exactly (a longer value is cut with an ellipsis, an
    address in the middle so that its port stays), columns grow only while
    ``COMMAND_ROOM`` columns stay free, the command takes the rest and is cut first,
    and when even that is too wide the line is cut at the edge. No I/O: the caller
    asks the terminal its width and writes the lines.
    """

    def __init__(self, fields: Sequence[str], encoding: str = "utf-8") -> None:
        self.columns = pretty_columns(fields)
        self.widths = [column.width.initial for column in self.columns]
        self._encoding = encoding
        self._mark = _ellipsis(encoding)
        # The column that takes what the others leave on a terminal: the command,
        # else the last one, which is never padded.
        labels = [column.label for column in self.columns]
        self._flexible = labels.index(FLEXIBLE) if FLEXIBLE in labels else len(labels) - 1
        self._reserve = COMMAND_ROOM if FLEXIBLE in labels else 0

    def header(self, terminal_width: int | None = None) -> str:
        """The column names at the view's widths: the initial ones, since the header
        is written before any row."""
        return GAP.join(self._cells([column.label for column in self.columns], terminal_width))

    def format_row(self, row: Row, terminal_width: int | None = None, color: bool = False) -> str:
        """One row; fitted to ``terminal_width`` columns when given, whole otherwise."""
        texts = [_cell_text(row, column) for column in self.columns]
        if terminal_width is not None:  # it shows at most a line: measure no further
            texts = [_at_most(text, terminal_width, self._mark) for text in texts]
        texts = [_as_shown(text, self._encoding) for text in texts]
        self._grow(texts, terminal_width)
        cells = self._cells(texts, terminal_width)
        if color:
            cells = [
                color_cell(cell, column.label, row.status)
                for cell, column in zip(cells, self.columns)
            ]
        return GAP.join(cells)

    def _fixed_width(self) -> int:
        """Columns taken by every column but the command, gaps included."""
        widths = (width for at, width in enumerate(self.widths) if at != self._flexible)
        return sum(widths) + len(GAP) * (len(self.widths) - 1)

    def _grow(self, texts: list[str], terminal_width: int | None) -> None:
        for at, (text, column) in enumerate(zip(texts, self.columns)):
            wanted = _width_up_to(text, column.width.cap)
            if wanted <= self.widths[at]:
                continue
            if terminal_width is not None and at != self._flexible:
                room = terminal_width - self._fixed_width() - self._reserve
                wanted = min(wanted, self.widths[at] + max(room, 0))
            self.widths[at] = max(wanted, self.widths[at])

    def _cells(self, texts: list[str], terminal_width: int | None) -> list[str]:
        last = len(texts) - 1
        if terminal_width is None:
            return [
                text if at == last else _padded(text, self.widths[at])
                for at, text in enumerate(texts)
            ]
        cells = []
        for at, (text, column) in enumerate(zip(texts, self.columns)):
            width = self.widths[at]
            if at == self._flexible:
                # What the other columns leave; at least the mark, so that a command
                # with no room left still shows where the line was cut.
                room = terminal_width - self._fixed_width()
                width = max(room if at == last else min(width, room), display_width(self._mark))
            cell = _cut(text, width, self._mark, middle=column.label in _ADDRESS_COLUMNS)
            cells.append(cell if at == last else _padded(cell, width))
        if display_width(GAP.join(cells)) <= terminal_width:
            return cells
        fitted = _cut_line(cells, terminal_width, self._mark)
        if display_width(GAP.join(fitted)) > terminal_width:  # narrower than any mark
            return [_prefix_within(GAP.join(fitted), terminal_width)]
        return fitted


def pretty_header(fields: Sequence[str], terminal_width: int | None = None) -> str:
    """The header of a new view of ``fields``."""
    return PrettyView(fields).header(terminal_width)


def format_pretty_row(
    row: Row,
    fields: Sequence[str],
    terminal_width: int | None = None,
    color: bool = False,
    encoding: str = "utf-8",
) -> str:
    """One row as a new view of ``fields`` shows it: at the widths the header shows,
    unless the row's own values are wider."""
    return PrettyView(fields, encoding).format_row(row, terminal_width, color)

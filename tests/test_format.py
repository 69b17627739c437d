"""Formatters: one row in, exactly one safe line out, in each format."""

import csv
import datetime
import json
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from histstat.output.format import (
    ALL_FIELDS,
    csv_header,
    escape_text,
    format_csv_row,
    format_json_row,
    format_plain_row,
    json_fields,
    json_text,
    plain_header,
    text_fields,
)
from histstat.output.pretty import format_pretty_row, pretty_fields
from histstat.records import Row

SEEN = datetime.datetime(2026, 11, 26, 3, 4, 5, 678, tzinfo=datetime.timezone.utc)


def make_row(**changes) -> Row:
    row = Row(
        proto="tcp",
        laddr="127.0.0.1",
        lport=8000,
        raddr="127.0.0.1",
        rport=50000,
        status="ESTABLISHED",
        pid=4242,
        pname="python3",
        user="alice",
        command="python3 -m http.server 8000",
        exe="/usr/bin/python3.11",
        md5=None,
        sha256=None,
        timestamp=SEEN,
    )
    return row._replace(**changes)


FORMATTERS = [
    pytest.param(format_plain_row, text_fields, id="plain"),
    pytest.param(format_pretty_row, pretty_fields, id="pretty"),
    pytest.param(format_json_row, json_fields, id="json"),
]

HIDDEN = {"Cc", "Cf", "Cs", "Zl", "Zp"}


def hidden_chars(line: str) -> list:
    return [c for c in line if unicodedata.category(c) in HIDDEN]


def test_plain_row_is_tab_separated_in_the_original_column_order():
    fields = text_fields(False)
    assert plain_header(fields).split("\t") == [
        "proto", "laddr", "lport", "raddr", "rport", "status",
        "pid", "pname", "time", "date", "user", "command",
    ]  # fmt: skip
    assert format_plain_row(make_row(), fields).split("\t") == [
        "tcp", "127.0.0.1", "8000", "127.0.0.1", "50000", "ESTABLISHED",
        "4242", "python3", "03:04:05", "26-11-26", "alice", "python3 -m http.server 8000",
    ]  # fmt: skip


def test_unknown_is_dash_and_no_remote_end_is_star():
    row = make_row(raddr=None, rport=None, status=None, pid=None, pname=None, user=None,
                   command=None)  # fmt: skip
    cells = format_plain_row(row, text_fields(False)).split("\t")
    assert cells[3:8] == ["*", "*", "-", "-", "-"]
    assert cells[10:] == ["-", "-"]


def test_hash_columns_come_just_before_command():
    fields = text_fields(True)
    assert fields[-3:] == ("md5", "sha256", "command")
    cells = format_plain_row(make_row(md5="a" * 32, sha256="b" * 64), fields).split("\t")
    assert cells[-3:] == ["a" * 32, "b" * 64, "python3 -m http.server 8000"]


def test_json_has_real_types_and_null_for_unknown():
    row = make_row(raddr=None, rport=None, status=None, user=None)
    obj = json.loads(format_json_row(row, json_fields(False)))
    assert list(obj) == [
        "event", "proto", "laddr", "lport", "raddr", "rport", "status", "direction",
        "attribution", "pid", "pname", "time", "date", "user", "command", "timestamp",
    ]  # fmt: skip
    assert obj["event"] == "open"
    assert obj["lport"] == 8000 and obj["pid"] == 4242
    assert obj["raddr"] is None and obj["rport"] is None
    assert obj["status"] is None and obj["user"] is None
    assert obj["timestamp"] == "2026-11-26T03:04:05.000678+00:00"
    assert (obj["time"], obj["date"]) == ("03:04:05", "26-11-26")


def test_json_with_hashes_carries_exe_md5_sha256():
    row = make_row(md5="a" * 32, sha256="b" * 64)
    obj = json.loads(format_json_row(row, json_fields(True)))
    assert (obj["exe"], obj["md5"], obj["sha256"]) == (
        "/usr/bin/python3.11",
        "a" * 32,
        "b" * 64,
    )


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("a\nb", "a\\nb"),
        ("a\tb", "a\\tb"),
        ("a\rb", "a\\rb"),
        ("\x1b[31mred", "\\x1b[31mred"),
        ("del\x7f", "del\\x7f"),
        ("csi\x9b", "csi\\x9b"),
        ("nel\x85", "nel\\x85"),
        ("evil\u202etxt.exe", "evil\\u202etxt.exe"),
        ("zero\u200bwidth", "zero\\u200bwidth"),
        ("line\u2028sep", "line\\u2028sep"),
        ("bad\udcffbyte", "bad\\xffbyte"),
        ("tag\U000e0001", "tag\\U000e0001"),
        ("café 日本", "café 日本"),
    ],
)
def test_escape_text_shows_hidden_characters(raw, shown):
    assert escape_text(raw) == shown


def test_newline_in_command_stays_one_row_in_every_text_format():
    row = make_row(command="sh -c 'x'\nfake\trow\x1b]0;title\x07")
    for formatter in (format_plain_row, format_pretty_row):
        line = formatter(row, text_fields(False))
        assert "\n" not in line and "\x1b" not in line and "\x07" not in line
        assert line.endswith("sh -c 'x'\\nfake\\trow\\x1b]0;title\\x07")
    assert len(format_plain_row(row, text_fields(False)).split("\t")) == 12


def test_json_keeps_true_text_but_no_raw_hidden_character():
    command = "a\nb\x1b\x7f\x9b\u202e\u200b\u2028 ok é"
    line = format_json_row(make_row(command=command), json_fields(False))
    assert hidden_chars(line) == []
    assert json.loads(line)["command"] == command


def test_json_shows_undecodable_bytes_as_hex_text():
    line = format_json_row(make_row(command="x\udcff\udc80y"), json_fields(False))
    assert json.loads(line)["command"] == "x\\xff\\x80y"
    line.encode("utf-8")  # never a lone surrogate in the bytes written


# Any text, including what psutil hands over for bytes that are not UTF-8 (surrogate
# escapes), C0/C1 controls, format characters and line separators.
hostile_text = st.text(
    alphabet=st.one_of(
        st.characters(codec=None),
        st.sampled_from("\n\r\t\x1b\x7f\x85\x9b\u2028\u2029\u202e\u200b\ufeff"),
        st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF),
    ),
    max_size=40,
)
maybe_text = st.none() | hostile_text
maybe_port = st.none() | st.integers(0, 65535)


@st.composite
def rows(draw):
    return make_row(
        proto=draw(st.sampled_from(["tcp", "tcp6", "udp", "udp6"])),
        laddr=draw(hostile_text),
        raddr=draw(maybe_text),
        rport=draw(maybe_port),
        status=draw(maybe_text),
        pid=draw(st.none() | st.integers(0, 2**31)),
        pname=draw(maybe_text),
        user=draw(maybe_text),
        command=draw(maybe_text),
        exe=draw(maybe_text),
        md5=draw(maybe_text),
        sha256=draw(maybe_text),
    )


@pytest.mark.parametrize(("formatter", "fields_of"), FORMATTERS)
@given(row=rows())
def test_every_formatter_yields_one_safe_line(formatter, fields_of, row):
    fields = fields_of(True)
    line = formatter(row, fields)
    # Plain output's own column separator is the only tab allowed, one per gap.
    cells = line.split("\t") if formatter is format_plain_row else [line]
    if formatter is format_plain_row:
        assert len(cells) == len(fields)
    for cell in cells:
        assert hidden_chars(cell) == []
    assert len(line.splitlines()) <= 1
    line.encode("utf-8")  # writable whatever the text held


@given(row=rows())
def test_json_round_trips_to_the_true_value(row):
    fields = json_fields(True)
    obj = json.loads(format_json_row(row, fields))
    for field in ("laddr", "raddr", "status", "pname", "user", "command", "exe", "md5"):
        value = getattr(row, field)
        assert obj[field] == (None if value is None else json_text(value))
    assert (obj["lport"], obj["rport"], obj["pid"]) == (row.lport, row.rport, row.pid)


@given(text=hostile_text)
def test_json_text_changes_only_undecodable_bytes(text):
    if not any(0xDC80 <= ord(c) <= 0xDCFF for c in text):
        assert json_text(text) == text
    else:
        assert "\\x" in json_text(text)


def test_plain_output_survives_a_csv_style_reader():
    # A tab-separated row read back by the csv module gives back every escaped cell.
    row = make_row(command='say "hi", then\tleave')
    line = format_plain_row(row, text_fields(False))
    (cells,) = csv.reader([line], delimiter="\t", quoting=csv.QUOTE_NONE)
    assert cells[-1] == 'say "hi", then\\tleave'


def test_csv_round_trips_commas_quotes_and_escapes():
    row = make_row(command='say "hi", then\tleave\x1b', user=None, raddr=None, rport=None)
    fields = text_fields(False)
    (header,) = csv.reader([csv_header(fields)])
    (cells,) = csv.reader([format_csv_row(row, fields)])
    record = dict(zip(header, cells))
    assert record["command"] == 'say "hi", then\\tleave\\x1b'
    assert (record["user"], record["raddr"], record["rport"]) == ("", "", "")
    assert record["lport"] == "8000"


@pytest.mark.parametrize("start", ["=", "+", "-", "@"])
def test_csv_cells_never_start_a_formula(start):
    row = make_row(pname=f"{start}HYPERLINK(1)", command=f"{start}cmd|' /C calc'!A0")
    (cells,) = csv.reader([format_csv_row(row, ("pname", "command"))])
    assert cells == [f"'{start}HYPERLINK(1)", f"'{start}cmd|' /C calc'!A0"]


@given(row=rows())
def test_csv_is_one_safe_record(row):
    fields = json_fields(True)
    line = format_csv_row(row, fields)
    assert hidden_chars(line) == []
    (cells,) = csv.reader([line])
    assert len(cells) == len(fields)
    assert not any(cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in cells)


def test_color_marks_only_the_status_cell_of_plain_rows():
    fields = text_fields(False)
    plain = format_plain_row(make_row(status="LISTEN"), fields, color=True)
    assert plain.split("\t")[5] == "\x1b[34mLISTEN\x1b[0m"
    assert "\x1b" not in format_plain_row(make_row(status=None), fields, color=True)


def test_every_known_field_has_a_value():
    row = make_row(md5="a" * 32, sha256="b" * 64, event="close", duration=1.5,
                   duration_from_start=False, direction="in", attribution="socket",
                   rhost="localhost", country="DE", asn=64496, as_org="Example")  # fmt: skip
    obj = json.loads(format_json_row(row, ALL_FIELDS))
    assert list(obj) == list(ALL_FIELDS)
    assert None not in obj.values()


def test_layouts_of_the_connection_story():
    assert text_fields(False) == TEXT_FIELDS_OF_THE_ORIGINAL
    closed = text_fields(False, closed=True)
    assert closed[0] == "event" and closed[closed.index("status") + 1] == "duration"
    remote = text_fields(False, resolve=True, geoip=True)
    assert remote[remote.index("rport") + 1 : remote.index("status")] == (
        "rhost", "country", "asn", "as_org",
    )  # fmt: skip
    keys = json_fields(True, closed=True)
    assert keys[0] == "event" and keys[-1] == "timestamp"
    assert keys[keys.index("status") + 1 :][:4] == (
        "duration", "duration_from_start", "direction", "attribution",
    )  # fmt: skip


TEXT_FIELDS_OF_THE_ORIGINAL = (
    "proto", "laddr", "lport", "raddr", "rport", "status",
    "pid", "pname", "time", "date", "user", "command",
)  # fmt: skip


def test_duration_shows_a_lower_bound_with_a_mark():
    fields = ("event", "duration")
    since_start = make_row(event="close", duration=12.3456, duration_from_start=True)
    seen_open = make_row(event="close", duration=0.25, duration_from_start=False)
    assert format_plain_row(since_start, fields) == "close\t>12.346"
    assert format_plain_row(seen_open, fields) == "close\t0.250"
    (cells,) = csv.reader([format_csv_row(since_start, fields)])
    assert cells == ["close", ">12.346"]
    obj = json.loads(format_json_row(since_start, ("duration", "duration_from_start")))
    assert obj == {"duration": 12.3456, "duration_from_start": True}

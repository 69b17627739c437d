"""Formatters: one row in, exactly one safe line out, in each format."""

import csv
import datetime
import json
import sys
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from histstat.output.ecs import ecs_fields, format_ecs_row
from histstat.output.format import (
    ALL_FIELDS,
    HIDDEN_RANGES,
    _Memo,
    csv_header,
    escape_text,
    field_value,
    format_csv_row,
    format_json_row,
    format_plain_row,
    json_fields,
    json_text,
    plain_header,
    text_fields,
)
from histstat.output.pretty import format_pretty_row, pretty_fields
from histstat.records import ProcessRef, Row
from support.rows import SEEN, sample_row


def make_row(**changes) -> Row:
    return sample_row(**changes)


FORMATTERS = [
    pytest.param(format_plain_row, text_fields, id="plain"),
    pytest.param(format_pretty_row, pretty_fields, id="pretty"),
    pytest.param(format_json_row, json_fields, id="json"),
    pytest.param(format_ecs_row, ecs_fields, id="ecs"),
]

HIDDEN = {"Cc", "Cf", "Cs", "Zl", "Zp"}
# Default_Ignorable_Code_Point, as listed in Unicode's DerivedCoreProperties.txt (14.0 to
# 17.0: 4,174 code points): invisible characters, most of them outside Cf.
DEFAULT_IGNORABLE = (
    (0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160),
    (0x17B4, 0x17B5), (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E),
    (0x2060, 0x206F), (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF),
)  # fmt: skip
IGNORABLE = frozenset(code for first, last in DEFAULT_IGNORABLE for code in range(first, last + 1))


def hidden_chars(line: str) -> list:
    return [c for c in line if unicodedata.category(c) in HIDDEN or ord(c) in IGNORABLE]


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
        "event", "proto", "laddr", "lport", "raddr", "rport", "netns", "status", "direction",
        "attribution", "pid", "pname", "owners", "owners_count", "ppid", "parent",
        "container", "time", "date", "user", "command", "command_length", "timestamp",
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
    assert list(obj)[-6:] == ["exe", "md5", "sha256", "command", "command_length", "timestamp"]
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
        # Invisible, but not Cf: a name holding them looks like another.
        ("ss\u034fhd", "ss\\u034fhd"),
        ("s\u3164shd", "s\\u3164shd"),
        ("\u115f\u1160\uffa0", "\\u115f\\u1160\\uffa0"),
        ("vs\ufe0f\U000e0100", "vs\\ufe0f\\U000e0100"),
        ("mongol\u180b\u180f", "mongol\\u180b\\u180f"),
        ("\u2065\u17b4", "\\u2065\\u17b4"),
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
        st.sampled_from("\u034f\u3164\u115f\u1160\uffa0\u180b\ufe0f\U000e0100\u2065"),
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
        parent=draw(maybe_text),
        args=draw(st.none() | st.lists(hostile_text, min_size=1, max_size=4).map(tuple)),
        rhost=draw(maybe_text),
        direction=draw(st.sampled_from([None, "in", "out", "listen"])),
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
                   rhost="localhost", country="DE", asn=64496, as_org="Example",
                   command_length=27, bytes_sent=5000, bytes_received=7000,
                   owners=(ProcessRef(4242, "python3"),), owners_count=1, ppid=1,
                   parent="systemd", args=("python3", "-m", "http.server", "8000"),
                   started=SEEN - datetime.timedelta(seconds=90), netns=4026531840,
                   container="c" * 64)  # fmt: skip
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
    assert keys[0] == "event" and keys[-3:] == ("command", "command_length", "timestamp")
    assert keys[keys.index("status") + 1 :][:4] == (
        "duration", "duration_from_start", "direction", "attribution",
    )  # fmt: skip


def test_bytes_follow_the_lifecycle_keys_where_close_or_update_rows_come():
    keys = json_fields(False, closed=True, with_bytes=True)
    assert keys[keys.index("status") + 1 :][:6] == (
        "duration", "duration_from_start", "bytes_sent", "bytes_received", "direction",
        "attribution",
    )  # fmt: skip
    assert "bytes_sent" not in json_fields(False, closed=True)  # --transitions alone
    assert "bytes_sent" not in text_fields(False, closed=True, with_bytes=True)  # -f only


HOLDERS = (ProcessRef(100, "bash"), ProcessRef(101, "a,102/forged\n"), ProcessRef(103, None))


def test_owners_in_json_are_a_list_of_pid_and_name():
    row = make_row(owners=HOLDERS, owners_count=20)
    obj = json.loads(format_json_row(row, ("owners", "owners_count")))
    assert obj == {
        "owners": [
            {"pid": 100, "name": "bash"},
            {"pid": 101, "name": "a,102/forged\n"},
            {"pid": 103, "name": None},
        ],
        "owners_count": 20,
    }
    assert json.loads(format_json_row(make_row(), ("owners",))) == {"owners": None}


def test_owners_in_text_and_csv_are_pid_slash_name_items_that_split_apart_again():
    row = make_row(owners=HOLDERS, owners_count=3)
    cell = format_plain_row(row, ("owners",))
    assert cell == "100/bash,101/a\\x2c102/forged\\n,103/-"
    assert [item.split("/", 1)[0] for item in cell.split(",")] == ["100", "101", "103"]
    assert format_csv_row(row, ("owners_count", "owners")) == '3,"' + cell + '"'
    assert format_plain_row(make_row(), ("owners", "owners_count")) == "-\t-"


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


def test_hidden_table_holds_every_control_format_and_invisible_character():
    """The embedded table against this Python's unicodedata and Unicode's list of default
    ignorable code points: all of them escaped, and nothing visible besides."""
    table = {code for first, last in HIDDEN_RANGES for code in range(first, last + 1)}
    by_category = {code for code in range(0x110000) if unicodedata.category(chr(code)) in HIDDEN}
    assert len(IGNORABLE) == 4174  # "Total code points" in DerivedCoreProperties.txt
    assert by_category <= table
    assert IGNORABLE <= table
    # Beyond those, only what this Python's Unicode has not assigned yet (Cf added later).
    extra = table - by_category - IGNORABLE
    assert all(unicodedata.category(chr(code)) == "Cn" for code in extra), sorted(extra)
    assert escape_text("".join(chr(code) for code in sorted(table))).isascii()


def json_reference(row: Row, fields) -> str:
    """format_json_row's line, made the slow way: json.dumps of the whole object, then
    every hidden character escaped in JSON's syntax, one by one."""
    obj = {}
    for field in fields:
        value = field_value(row, field)
        if field == "owners" and value is not None:  # objects, where json.dumps makes lists
            value = [ref._asdict() for ref in value]
            for ref in value:
                ref["name"] = None if ref["name"] is None else json_text(ref["name"])
        obj[field] = json_text(value) if isinstance(value, str) else value
    line = json.dumps(obj, ensure_ascii=False)

    def escaped(char: str) -> str:
        code = ord(char)
        if code <= 0xFFFF:
            return f"\\u{code:04x}"
        code -= 0x10000
        return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"

    return "".join(escaped(c) if hidden_chars(c) else c for c in line)


@given(row=rows())
def test_json_row_is_what_json_dumps_writes_with_hidden_characters_escaped(row):
    row = row._replace(duration=1.25, duration_from_start=False, asn=64496)
    assert format_json_row(row, ALL_FIELDS) == json_reference(row, ALL_FIELDS)


def test_a_process_text_is_escaped_once_for_all_its_rows():
    calls = []

    def escape(value: str) -> str:
        calls.append(value)
        return value.upper()

    def size(text: str) -> int:
        return 2 * sys.getsizeof(text)  # the text and its result, as the memo counts

    memo = _Memo(escape, budget=5 * size("x" * 20))
    command = "x" * 20
    assert [memo(command) for _ in range(5)] == ["X" * 20] * 5
    assert calls == [command]
    big = "y" * 1000  # more than the whole budget with its result: never kept
    assert memo(big) == memo(big) == "Y" * 1000 and calls.count(big) == 2
    for n in range(10):  # the oldest give way: five of this size fit at a time
        memo(str(n % 10) * 20)
    assert len(calls) == 13
    assert memo("9" * 20) == "9" * 20 and len(calls) == 13  # among the last five
    assert memo(command) == "X" * 20 and len(calls) == 14  # given way


def test_escaped_text_comes_from_the_memo_unchanged():
    command = "evil\x01\u202e\u034f" * 1000
    first = escape_text(command)
    assert escape_text(command) is first
    equal = "".join(list(command))  # another string with the same text
    assert equal is not command
    assert escape_text(equal) == first == "evil\\x01\\u202e\\u034f" * 1000
    row = make_row(command=command)
    assert format_json_row(row, json_fields(False)) == json_reference(row, json_fields(False))


def test_empty_text_is_shown_apart_from_unknown():
    empty, unknown = make_row(pname="", command=""), make_row(pname=None, command=None)
    fields = ("pid", "pname", "command")
    assert format_plain_row(empty, fields) == '4242\t""\t""'
    assert format_plain_row(unknown, fields) == "4242\t-\t-"
    assert format_pretty_row(empty, fields).split() == ["4242", '""', '""']
    (cells,) = csv.reader([format_csv_row(empty, fields)])
    assert cells == ["4242", '""', '""']
    (cells,) = csv.reader([format_csv_row(unknown, fields)])
    assert cells == ["4242", "", ""]
    assert json.loads(format_json_row(empty, fields)) == {"pid": 4242, "pname": "", "command": ""}
    assert json.loads(format_json_row(unknown, fields))["pname"] is None


def test_command_length_is_a_field_of_every_format():
    row = make_row(command="ab...[+3 chars]", command_length=5)
    fields = ("command", "command_length")
    assert format_plain_row(row, fields) == "ab...[+3 chars]\t5"
    (cells,) = csv.reader([format_csv_row(row, fields)])
    assert cells == ["ab...[+3 chars]", "5"]
    assert json.loads(format_json_row(row, fields)) == {
        "command": "ab...[+3 chars]",
        "command_length": 5,
    }
    unknown = make_row(command=None, command_length=None)
    assert format_plain_row(unknown, fields) == "-\t-"
    assert json.loads(format_json_row(unknown, fields))["command_length"] is None


def test_parent_args_and_start_in_every_format():
    started = datetime.datetime(
        2026, 11, 26, 4, 0, 1, 250000, tzinfo=datetime.timezone(datetime.timedelta(hours=1))
    )
    row = make_row(ppid=1, parent="systemd", args=("sh", "-c", "echo 'hi'  there"),
                   started=started)  # fmt: skip
    fields = ("ppid", "parent", "args", "started")
    obj = json.loads(format_json_row(row, fields))
    assert obj == {
        "ppid": 1,
        "parent": "systemd",
        "args": ["sh", "-c", "echo 'hi'  there"],
        "started": "2026-11-26T04:00:01.250000+01:00",
    }
    readable = """sh -c 'echo '"'"'hi'"'"'  there'"""
    assert format_plain_row(row, fields).split("\t") == [
        "1", "systemd", readable, "2026-11-26T04:00:01.250000+01:00",
    ]  # fmt: skip
    (cells,) = csv.reader([format_csv_row(row, fields)])
    assert cells == ["1", "systemd", readable, "2026-11-26T04:00:01.250000+01:00"]
    unknown = make_row()
    assert json.loads(format_json_row(unknown, fields)) == dict.fromkeys(fields)
    assert format_plain_row(unknown, fields) == "-\t-\t-\t-"


HOSTILE_ARGUMENT = "x\nforged\trow\x1b[31m\u202e\udcff\x85"


@pytest.mark.parametrize("formatter", [format_plain_row, format_csv_row, format_json_row])
def test_hostile_arguments_and_parent_name_stay_one_safe_line(formatter):
    row = make_row(parent=HOSTILE_ARGUMENT, args=("evil", HOSTILE_ARGUMENT, "\x00"))
    line = formatter(row, ("parent", "args"))
    assert "\n" not in line and "\r" not in line
    cells = line.split("\t") if formatter is format_plain_row else [line]
    assert len(cells) == (2 if formatter is format_plain_row else 1)
    assert [hidden_chars(cell) for cell in cells] == [[]] * len(cells)
    if formatter is format_json_row:
        assert json.loads(line) == {
            "parent": "x\nforged\trow\x1b[31m\u202e\\xff\x85",
            "args": ["evil", "x\nforged\trow\x1b[31m\u202e\\xff\x85", "\x00"],
        }
    else:
        assert "\\x1b" in line and "\\u202e" in line and "\\xff" in line


offsets = st.timedeltas(
    min_value=-datetime.timedelta(hours=23, minutes=59), max_value=datetime.timedelta(hours=23)
).map(datetime.timezone)
moments = st.datetimes(min_value=datetime.datetime(1, 1, 1), timezones=offsets)


@given(
    timestamp=moments,
    started=st.none() | moments,
    owners=st.none() | st.lists(
        st.builds(ProcessRef, st.integers(0, 2**22), st.none() | hostile_text), max_size=3
    ).map(tuple),
)  # fmt: skip
def test_json_times_and_owners_are_what_json_dumps_writes(timestamp, started, owners):
    """A row's time and date are cut from its timestamp's ISO text: the same as strftime
    gives, whatever the year or the UTC offset; the rows of a poll share one timestamp."""
    row = make_row(timestamp=timestamp, started=started, owners=owners)
    assert format_json_row(row, ALL_FIELDS) == json_reference(row, ALL_FIELDS)
    later = row._replace(timestamp=timestamp + datetime.timedelta(microseconds=1))
    for shown in (later, row, row):
        assert format_json_row(shown, ALL_FIELDS) == json_reference(shown, ALL_FIELDS)

"""The pretty view: joined endpoints, widths that grow, a terminal's line that fits."""

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from histstat.output.format import ALL_FIELDS, escape_text
from histstat.output.pretty import (
    COMMAND_ROOM,
    ELLIPSIS,
    WIDTHS,
    PrettyView,
    display_width,
    endpoint_text,
    format_pretty_row,
    pretty_columns,
    pretty_fields,
    pretty_header,
)
from histstat.records import Row
from support.rows import sample_row

COMMAND = "python3 -m http.server 8000 --bind 127.0.0.1 --directory /srv/www/public/reports"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def make_row(**changes) -> Row:
    return sample_row(**{"command": COMMAND, **changes})


def start_of(line: str, value: str) -> int:
    """The terminal column where ``value`` starts in ``line``."""
    return display_width(line[: line.index(value)])


DEFAULT = pretty_fields(False)
CLOSED = pretty_fields(False, closed=True)


# --------------------------------------------------------------------------- layout


def test_default_layout_puts_the_time_first_and_the_command_last():
    assert DEFAULT == (
        "time", "proto", "laddr", "lport", "raddr", "rport", "status", "pid", "pname",
        "user", "command",
    )  # fmt: skip
    assert CLOSED[:2] == ("time", "event") and CLOSED[2:] == DEFAULT[1:]
    assert pretty_fields(True)[-3:] == ("md5", "sha256", "command")
    remote = pretty_fields(False, resolve=True, geoip=True)
    assert remote[remote.index("rport") + 1 : remote.index("status")] == (
        "rhost", "country", "asn", "as_org",
    )  # fmt: skip
    header = pretty_header(CLOSED)
    assert header.split() == [
        "time", "event", "proto", "local", "remote", "status", "pid", "pname", "user",
        "command",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "address, port, shown",
    [
        ("127.0.0.1", 8000, "127.0.0.1:8000"),
        ("::1", 22, "[::1]:22"),
        ("::", 0, "[::]:0"),
        ("::ffff:10.0.0.5", 443, "[::ffff:10.0.0.5]:443"),
        ("fe80::1%eth0", 123, "[fe80::1%eth0]:123"),
        (None, None, "*:*"),
    ],
    ids=["v4", "v6", "v6-any", "v4-mapped", "v6-scoped", "none"],
)
def test_endpoints_are_joined_as_ss_writes_them(address, port, shown):
    assert endpoint_text(address, port) == shown


def test_rows_show_joined_endpoints_v4_v6_and_none():
    view = PrettyView(DEFAULT)
    v4 = view.format_row(make_row())
    v6 = view.format_row(make_row(proto="tcp6", laddr="::1", lport=22, raddr="::1", rport=5))
    listener = view.format_row(make_row(raddr=None, rport=None, status="LISTEN"))
    assert v4.split()[2:4] == ["127.0.0.1:8000", "127.0.0.1:50000"]
    assert v6.split()[2:4] == ["[::1]:22", "[::1]:5"]
    assert listener.split()[2:4] == ["127.0.0.1:8000", "*:*"]


def test_fields_that_name_address_and_port_are_joined_too():
    labels = [column.label for column in pretty_columns(("pid", "laddr", "lport", "rport"))]
    assert labels == ["pid", "local", "rport"]  # rport without raddr stays alone
    # Joined where the first of the two stands, address first whatever the order.
    fields = ("rport", "pid", "lport", "raddr", "laddr")
    assert [column.label for column in pretty_columns(fields)] == ["remote", "pid", "local"]
    line = format_pretty_row(make_row(laddr="::1", raddr=None, rport=None), fields)
    assert line.split() == ["*:*", "4242", "[::1]:8000"]
    # An address alone is shown bare.
    assert format_pretty_row(make_row(laddr="::1"), ("laddr", "pid")).split() == ["::1", "4242"]


def test_every_field_has_a_width_that_holds_its_name():
    for field in (*ALL_FIELDS, "local", "remote"):
        assert field in WIDTHS, field
        assert len(field) <= WIDTHS[field].initial <= WIDTHS[field].cap, field


# --------------------------------------------------------------------------- widths


def full_row() -> Row:
    """A row whose every field holds a value of the usual width."""
    return make_row(
        proto="tcp6", laddr="::1", raddr="::1", event="close", duration=12.5,
        duration_from_start=True, direction="out", attribution="earlier", pid=4194304,
        rhost="localhost", country="ZZ", asn=64512, as_org="Loopback Net", md5="a" * 32,
        sha256="b" * 64,
    )  # fmt: skip


# The command is the one field of no usual width: it takes the rest of a terminal's line.
@pytest.mark.parametrize("field", [field for field in ALL_FIELDS if field != "command"])
def test_header_and_value_agree_in_width_for_every_field(field):
    fields = (field, "pid") if field != "pid" else ("pid", "user")
    last, value = ("user", "alice") if field == "pid" else ("pid", "4194304")
    header = pretty_header(fields)
    line = format_pretty_row(full_row(), fields)
    assert header.endswith(" " + last) and line.endswith(" " + value)
    assert display_width(header) - len(last) == display_width(line) - len(value), (header, line)


def test_timestamp_header_is_as_wide_as_its_values():
    header = pretty_header(("timestamp", "pid"))
    line = format_pretty_row(make_row(), ("timestamp", "pid"))
    assert line == "2026-11-26T03:04:05.000678+00:00 4242"
    assert header == "timestamp" + " " * 23 + " pid"


def test_usual_rows_line_up_with_the_header():
    view = PrettyView(CLOSED)
    header = view.header()
    rows = [
        make_row(event="close"),
        make_row(proto="udp6", laddr="::1", raddr=None, rport=None, status=None, pid=4194304),
        make_row(raddr=None, rport=None, status="LISTEN", pname="sshd", user="root"),
    ]
    for row in rows:
        line = view.format_row(row)
        for label, value in (("user", row.user), ("pid", str(row.pid)), ("command", "python3 -m")):
            assert start_of(line, value) == start_of(header, label), (label, line)


def test_a_column_grows_with_a_wider_value_and_never_shrinks():
    view = PrettyView(DEFAULT)
    first = view.format_row(make_row(pname="python3"))
    wide = view.format_row(make_row(pname="a-longer-name"))
    after = view.format_row(make_row(pname="sh"))
    assert start_of(wide, "alice") == start_of(first, "alice") + len("a-longer-name") - 8
    assert start_of(after, "alice") == start_of(wide, "alice")
    assert "a-longer-name alice" in wide  # its own column, one space after it


def test_a_column_stops_growing_at_its_cap_and_a_pipe_keeps_every_character():
    view = PrettyView(DEFAULT)
    name = "n" * 40
    long_line = view.format_row(make_row(pname=name))
    assert f" {name} alice " in long_line  # whole: it widens its own line only
    capped = view.format_row(make_row(pname="sh"))
    assert start_of(capped, "alice") == start_of(capped, "sh") + WIDTHS["pname"].cap + 1
    address = "2001:db8:85a3:1234:5678:8a2e:370:7334"
    line = view.format_row(make_row(proto="tcp6", raddr=address, rport=443, command="x" * 500))
    assert f"[{address}]:443" in line and line.endswith("x" * 500)


# --------------------------------------------------------------------------- characters

WIDE_AND_COMBINING = [
    ("\u6f22\u5b57", "kanji: two columns each"),
    ("e\u0301e\u0301", "combining acute: no column"),
    ("\U0001f600x", "emoji: two columns"),
    ("plain", "ascii"),
]


@pytest.mark.parametrize("terminal_width", [None, 120], ids=["pipe", "terminal"])
def test_wide_and_combining_characters_stay_aligned(terminal_width):
    view = PrettyView(DEFAULT)
    lines = [
        view.format_row(make_row(pname=name, user="u" + str(at)), terminal_width)
        for at, (name, _) in enumerate(WIDE_AND_COMBINING)
    ]
    starts = {start_of(line, "u" + str(at)) for at, line in enumerate(lines)}
    assert len(starts) == 1, lines


def test_wide_characters_are_cut_as_they_are_padded():
    view = PrettyView(DEFAULT)
    wide = "\u6f22\u5b57" * 10  # 40 columns: more than the column can take
    lines = [view.format_row(make_row(pname=name), 100) for name in ("sh", wide, "sh")]
    cut = lines[1].split()[6]
    assert cut.endswith("\u2026") and cut.startswith("\u6f22\u5b57")
    assert len({start_of(line, "alice") for line in lines}) == 1, lines
    assert all(display_width(line) == 100 for line in lines), lines


def test_wide_characters_count_two_columns_in_the_command():
    row = make_row(command="\u6f22\u5b57" * 40)  # 80 wide characters, 160 columns
    line = format_pretty_row(row, ("pid", "command"), 60)
    assert display_width(line) == 60 or display_width(line) == 59  # a wide char won't split
    assert line.endswith("\u2026") and "\u6f22" in line


# --------------------------------------------------------------------------- terminal


def visible(line: str) -> str:
    return ANSI.sub("", line)


@pytest.mark.parametrize("fields", [DEFAULT, CLOSED], ids=["default", "closed"])
def test_100_columns_show_pid_user_and_the_start_of_the_command(fields):
    view = PrettyView(fields)
    header = view.header(100)
    assert header.endswith(" user     command")
    for row in (make_row(event="close"), make_row(proto="tcp6", laddr="::1", raddr="::1")):
        line = view.format_row(row, 100)
        assert display_width(line) == 100
        cells = line.split(None, len(view.columns) - 1)
        assert (cells[-4], cells[-2]) == ("4242", "alice")
        command = cells[-1]
        assert command.endswith("\u2026") and COMMAND.startswith(command[:-1])
        assert len(command) >= 9
        assert start_of(line, "alice") == start_of(header, "user")


def test_the_command_is_cut_first_then_the_line():
    fields = DEFAULT
    whole = format_pretty_row(make_row(), fields)
    before_command = whole[: whole.index(COMMAND)]
    for width in range(len(whole) - 1, len(before_command), -1):
        line = format_pretty_row(make_row(), fields, width)
        assert line.startswith(before_command), width  # only the command was cut
        assert line.endswith("\u2026") and len(line) == width
    narrower = format_pretty_row(make_row(), fields, len(before_command) - 10)
    assert narrower.endswith("\u2026") and len(narrower) == len(before_command) - 10
    assert before_command.startswith(narrower[:-1])


def test_a_short_row_is_not_cut():
    line = format_pretty_row(make_row(command="ls"), DEFAULT, 100)
    assert line == format_pretty_row(make_row(command="ls"), DEFAULT)
    assert "\u2026" not in line


def test_on_a_terminal_columns_grow_only_while_the_command_keeps_its_room():
    view = PrettyView(DEFAULT)
    view.format_row(make_row(), 110)
    line = view.format_row(make_row(pname="systemd-resolve", user="systemd-network"), 110)
    assert display_width(line) == 110
    command = line.split(None, len(view.columns) - 1)[-1]
    assert len(command) == COMMAND_ROOM  # the columns took the rest, then stopped
    assert "systemd-resolve" in line and "systemd-n\u2026" in line.split()
    # A wider terminal lets the columns grow further, to their caps.
    line = view.format_row(make_row(pname="systemd-resolve", user="systemd-network"), 200)
    assert "systemd-resolve systemd-net\u2026 " in line  # user's cap: 12


def test_an_address_is_cut_in_the_middle_and_keeps_its_port():
    address = "2001:db8:85a3:1234:5678:8a2e:370:7334"
    line = format_pretty_row(make_row(proto="tcp6", raddr=address, rport=443), DEFAULT, 200)
    remote = line.split()[3]
    assert display_width(remote) == WIDTHS["remote"].cap
    assert remote.startswith("[2001:db8:") and remote.endswith(":7334]:443") and "\u2026" in remote


@pytest.mark.parametrize("width", [1, 2, 40, 83, 84, 85, 86, 100])
def test_a_narrow_terminal_cuts_the_line_not_the_screen(width):
    full = format_pretty_row(make_row(), DEFAULT)
    for color in (False, True):
        line = visible(format_pretty_row(make_row(), DEFAULT, width, color=color))
        assert len(line) <= width
        assert line.endswith("\u2026")
        assert full.startswith(line[:-1].rstrip(" "))
    header = pretty_header(DEFAULT, width)
    assert len(header) <= width


def test_a_terminal_that_cannot_show_the_ellipsis_gets_dots_and_escapes():
    row = make_row(command="caf\u00e9 \u6f22\u5b57 " + "x" * 200)
    line = format_pretty_row(row, ("pid", "command"), 40, encoding="latin-1")
    shown = line.encode("latin-1", "backslashreplace").decode("latin-1")
    assert len(shown) <= 40 and line.endswith("...")
    assert "\\u6f22" in line  # measured as the escape the writer will send


def test_the_command_is_cut_first_wherever_it_stands():
    row = make_row(command="x" * 100)
    line = format_pretty_row(row, ("command", "pid"), 30)
    assert len(line) <= 30
    assert line.endswith(" 4242") and "\u2026" in line
    # Where there is room, a command that is not last stops at its column's cap.
    line = format_pretty_row(row, ("command", "pid"), 100)
    assert line == "x" * (WIDTHS["command"].cap - 1) + "\u2026 4242"


def test_color_marks_only_the_status_cell_and_keeps_alignment():
    for width in (None, 100):
        colored = format_pretty_row(make_row(), DEFAULT, width, color=True)
        assert "\x1b[32mESTABLISHED\x1b[0m" in colored
        assert visible(colored) == format_pretty_row(make_row(), DEFAULT, width)
    listen = format_pretty_row(make_row(status="LISTEN"), DEFAULT, 100, color=True)
    assert "\x1b[34mLISTEN\x1b[0m      " in listen  # the padding stays outside the colour
    assert "\x1b" not in format_pretty_row(make_row(status=None), DEFAULT, 100, color=True)


# Text a process may choose: wide, combining, controls, undecodable bytes.
any_text = st.text(
    alphabet=st.one_of(
        st.characters(codec=None),
        st.sampled_from("\u6f22\u5b57\u0301\u20dd\U0001f600\n\x1b\u202e"),
        st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF),
    ),
    max_size=30,
)


@given(
    names=st.lists(st.tuples(any_text, any_text, st.none() | any_text), min_size=1, max_size=4),
    width=st.integers(1, 220),
)
def test_a_terminal_line_never_exceeds_the_terminal(names, width):
    view = PrettyView(CLOSED)
    assert display_width(view.header(width)) <= width
    for pname, user, command in names:
        line = view.format_row(make_row(pname=pname, user=user, command=command), width)
        assert display_width(line) <= width, line
        assert "\n" not in line and "\x1b" not in line


# A command line may be 64K characters long (--command-limit): a view measures a cell
# only as far as it can show it.
HUGE = [
    pytest.param("\u6f22" * 65536, id="wide"),
    pytest.param("x" * 65536, id="ascii"),
    pytest.param("\x01" * 65536, id="escaped"),
    pytest.param("a\u0301" * 32768, id="combining"),
]


@pytest.mark.parametrize("command", HUGE)
def test_a_huge_command_on_a_terminal_shows_as_its_start_would(command):
    fields = pretty_fields(False)
    huge, start = make_row(command=command), make_row(command=command[:2000])
    for width in (60, 100, 200):
        assert format_pretty_row(huge, fields, width) == format_pretty_row(start, fields, width)


@pytest.mark.parametrize("command", HUGE)
def test_a_huge_command_in_a_pipe_keeps_every_character_and_the_alignment(command):
    view = PrettyView(("pid", "command", "user"))
    shown = escape_text(command)
    line = view.format_row(make_row(command=command))
    assert line == f"4242    {shown} alice"
    assert view.widths == [7, 40, 8]  # the command column grew to its cap, no further
    assert view.format_row(make_row(command="ls")).split() == ["4242", "ls", "alice"]


def test_combining_marks_beyond_what_a_terminal_can_show_are_cut():
    row = make_row(command="a" + "\u0301" * 65536)
    line = format_pretty_row(row, ("pid", "command"), 100)
    assert line.endswith(ELLIPSIS) and display_width(line) <= 100
    assert len(line) <= len("4242    ") + 4 * 100 + 1  # measured no further
    few = make_row(command="a\u0301" * 5)
    assert format_pretty_row(few, ("pid", "command"), 100) == "4242    " + "a\u0301" * 5


def test_a_runtimes_container_id_shows_as_its_short_id_and_a_machine_by_its_name():
    view = PrettyView(("pid", "netns", "container"))
    assert view.header() == "pid     netns      container"
    runtime = "4f1e2b3c" * 8
    line = view.format_row(make_row(netns=4026531840, container=runtime))
    assert line == "4242    4026531840 4f1e2b3c4f1e"
    assert view.format_row(make_row(container="my-box")).endswith(" my-box")
    assert view.format_row(make_row()).split()[1:] == ["-", "-"]
    # A long machine name is a name, not an id: shown up to the column's cap, where a
    # column not the last one is cut on a terminal.
    inner = PrettyView(("container", "status"))
    line = inner.format_row(make_row(container="web-" + "x" * 60), terminal_width=200)
    assert line == "web-" + "x" * 15 + ELLIPSIS + " ESTABLISHED"

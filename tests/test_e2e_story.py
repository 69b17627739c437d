"""End-to-end: a connection's story (issue 4) with the installed histstat and real sockets.

--closed (close rows, durations, the '>' of a connection older than histstat), direction,
attribution of the sockets the kernel keeps without a process, -r/--resolve and --geoip.
Everything runs on loopback, waits by polling with a deadline and is bounded in time; the
only PTR lookups are for 127.0.0.1, which /etc/hosts answers.
"""

from __future__ import annotations

import collections
import csv
import datetime
import os
import random
import re
import socket
import subprocess
import sys

import pytest
from geoip_db import write_asn_db, write_country_db

from histstat.privileges import NOT_PRIVILEGED_NOTICE
from support.children import end_child, new_marker, new_tag, one_line_script, require_wchan
from support.contract import COLUMNS, KEY_FIELDS
from support.histstat import (
    INTERVAL,
    INTERVAL_SECONDS,
    assert_clean_end,
    connection_key,
    run_once,
    sleeping_between_polls,
)
from support.waiting import DEFAULT_TIMEOUT, END_TIMEOUT, read_line

# The csv module refuses fields over 128 KiB by default; a command line may be longer.
csv.field_size_limit(1 << 30)
# A poll may start late and take a while on a loaded machine (the psutil source's poll
# took up to 1.2 s while other test suites ran): the slack, in seconds, for everything
# the interval alone does not bound.
SLACK = 2.0
HOLD = 3.0  # seconds the child of the duration test keeps its connection at least
HOST = "127.0.0.1"
# The text columns with --closed: event first, duration right after status.
CLOSED_COLUMNS = ("event", *KEY_FIELDS, "duration", *COLUMNS[6:])
PROCESS_FACTS = ("pid", "pname", "user", "command")

# The story child: a TCP listener on 127.0.0.1, driven line by line on its stdin.
#   (start)          -> "ready LPORT"
#   connect          -> "open CPORT": a client connected to the listener, and its accepted end
#   send UP DOWN     -> "sent": the client sends UP bytes and the accepted end DOWN bytes;
#                       each end reads all the other sent
#   trickle SECONDS RATE -> "trickled": for SECONDS, the client sends RATE bytes a second
#                       in tenths, which the accepted end reads
#   close HOLD GAP [NEW] -> "closed SECONDS": once HOLD seconds have passed since connect
#                       (its own sleep), renames itself to NEW (/proc/self/comm) when
#                       given, closes the client, waits until the accepted end has read
#                       the client's FIN and GAP seconds more, then closes that too.
#                       SECONDS is the monotonic time from just before connect to just
#                       after the last close.
#   (EOF)            -> exits
STORY_SOURCE = """
import socket
import sys
import time


def say(*words):
    print(*words, flush=True)


server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
server.bind(("127.0.0.1", 0))
server.listen(4)
say("ready", server.getsockname()[1])
client = accepted = None
started = None
while True:
    line = sys.stdin.readline()
    if not line:
        break
    words = line.split()
    if words[0] == "connect":
        started = time.monotonic()
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        client.connect(server.getsockname())
        accepted, _ = server.accept()
        say("open", client.getsockname()[1])
    elif words[0] == "send":
        up, down = int(words[1]), int(words[2])
        client.sendall(b"u" * up)
        accepted.sendall(b"d" * down)
        for sock, size in ((accepted, up), (client, down)):
            while size:
                size -= len(sock.recv(size))
        say("sent")
    elif words[0] == "trickle":
        until = time.monotonic() + float(words[1])
        tenth = int(words[2]) // 10
        while time.monotonic() < until:
            client.sendall(b"t" * tenth)
            size = tenth
            while size:
                size -= len(accepted.recv(size))
            time.sleep(0.1)
        say("trickled")
    elif words[0] == "close":
        rest = started + float(words[1]) - time.monotonic()
        if rest > 0:
            time.sleep(rest)
        if len(words) > 3:
            with open("/proc/self/comm", "w") as comm:
                comm.write(words[3])
        client.close()
        accepted.settimeout(10)
        if accepted.recv(1) != b"":
            raise SystemExit("the accepted end did not read the client's FIN")
        time.sleep(float(words[2]))
        accepted.close()
        say("closed", repr(time.monotonic() - started))
"""


class StoryChild:
    """A process that opens and closes one loopback connection when told to."""

    def __init__(self, comm: str | None = None) -> None:
        """``comm`` names the process (at most 15 bytes), for a --name filter."""
        self.argv = [sys.executable, "-c", one_line_script(STORY_SOURCE, comm), new_marker()]
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.pid = self.proc.pid
        self.lport = int(self._expect("ready"))
        self.cport: int | None = None

    @property
    def command(self) -> str:
        return " ".join(self.argv)

    def _expect(self, word: str) -> str:
        try:
            line = read_line(self.proc.stdout, DEFAULT_TIMEOUT).decode()
        except (TimeoutError, EOFError) as exc:
            self.stop()
            err = self.proc.stderr.read().decode(errors="replace")
            pytest.fail(f"story child: no {word!r} line: {exc}\n{err}", pytrace=False)
        first, _, rest = line.strip().partition(" ")
        assert first == word, line
        return rest

    def _send(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def connect(self) -> int:
        self._send("connect")
        self.cport = int(self._expect("open"))
        return self.cport

    def send(self, up: int, down: int) -> None:
        """The client sends ``up`` bytes, the accepted end ``down``; each reads them."""
        self._send(f"send {up} {down}")
        self._expect("sent")

    def trickle(self, seconds: float, rate: int) -> None:
        """The client sends ``rate`` bytes a second for ``seconds``."""
        self._send(f"trickle {seconds} {rate}")
        self._expect("trickled")

    def close(self, hold: float = 0.0, rename: str | None = None, gap: float = 0.0) -> float:
        """Close both ends (the client first, the accepted end ``gap`` seconds after it
        read the client's FIN); the connection's true lifetime."""
        self._send(f"close {hold} {gap}" + (f" {rename}" if rename else ""))
        return float(self._expect("closed"))

    # The connection keys (proto, laddr, lport, raddr, rport, status) of its sockets.
    @property
    def listener(self) -> tuple:
        return ("tcp", HOST, self.lport, None, None, "LISTEN")

    def client(self, status: str = "ESTABLISHED") -> tuple:
        return ("tcp", HOST, self.cport, HOST, self.lport, status)

    def server(self, status: str = "ESTABLISHED") -> tuple:
        return ("tcp", HOST, self.lport, HOST, self.cport, status)

    def stop(self, timeout: float = END_TIMEOUT) -> None:
        end_child(self.proc, timeout)


@pytest.fixture
def spawn_story():
    children: list = []

    def spawn(comm: str | None = None) -> StoryChild:
        child = StoryChild(comm)
        children.append(child)
        return child

    yield spawn
    for child in children:
        child.stop()


# --------------------------------------------------------------------------- helpers


def csv_key(row: dict) -> tuple:
    """connection_key of a CSV row, where unknown and absent values are empty cells."""
    return connection_key({name: (value if value != "" else None) for name, value in row.items()})


def key_of(output: str):
    return csv_key if output == "csv" else connection_key


def rows_of(histstat, output: str) -> list:
    """What histstat wrote so far, as dicts; CSV is parsed as CSV."""
    if output != "csv":
        return histstat.rows()
    records = list(csv.reader(line.rstrip("\r") for line in histstat.lines()))
    return [dict(zip(records[0], record)) for record in records[1:]]


def header_of(histstat) -> list:
    """The first line of a text or CSV output, split into its fields."""
    first = histstat.until(lambda: histstat.lines()[:1], what="the header")[0]
    return first.split("\t") if "\t" in first else next(csv.reader([first.rstrip("\r")]))


def wait_for_keys(
    histstat, keys, output: str = "json", event: str | None = None, pid: int | None = None
) -> dict:
    """{key: rows} once every key has a row (with ``event`` in its event column, and of
    ``pid`` when given: a socket accepted but not yet handed to its process shows
    briefly without a pid, a row of its own)."""
    key = key_of(output)

    def found():
        rows = {wanted: [] for wanted in keys}
        for row in rows_of(histstat, output):
            if event is not None and row.get("event") != event:
                continue
            if pid is not None and str(row.get("pid")) != str(pid):
                continue
            if key(row) in rows:
                rows[key(row)].append(row)
        return rows if all(rows.values()) else None

    return histstat.until(found, what=f"{event or 'any'} rows of {sorted(keys, key=str)}")


def one(rows: list) -> dict:
    assert len(rows) == 1, rows
    return rows[0]


def stamp(row: dict) -> datetime.datetime:
    return datetime.datetime.fromisoformat(row["timestamp"])


def duration_bounds(lifetime: float, interval: float = INTERVAL_SECONDS) -> tuple:
    """What a close row may say of a connection that lived ``lifetime`` seconds.

    Its duration runs from the first poll that saw it to its end (the kernel's end event,
    or the poll that found it ended): each may miss the true moment by an interval, plus
    however late that poll ran (SLACK).
    """
    return lifetime - interval - SLACK, lifetime + interval + SLACK


def endpoints(key: tuple) -> tuple:
    """The (proto, laddr, lport, raddr, rport) of a connection key: its identity."""
    return key[:5]


def story_of(rows: list, key: tuple) -> list:
    """Every row of the connection ``key`` (whatever its state), in order."""
    return [row for row in rows if endpoints(connection_key(row)) == endpoints(key)]


def wait_for_stories(histstat, keys, event: str, count: int = 1) -> dict:
    """{endpoints: rows} once each connection of ``keys`` has ``count`` rows of ``event``."""

    def found():
        rows = histstat.rows()
        stories = {endpoints(key): story_of(rows, key) for key in keys}
        for story in stories.values():
            if sum(row["event"] == event for row in story) < count:
                return None
        return stories

    return histstat.until(found, what=f"{event} rows of {sorted(keys, key=str)}")


def events_of(story: list) -> list:
    return [(row["event"], row["status"]) for row in story]


def source_name() -> str:
    """The source the tests' histstat uses: HISTSTAT_SOURCE, or linux (auto, here)."""
    return os.environ.get("HISTSTAT_SOURCE") or "linux"


# What the Linux source needs to say when a connection ends and how many bytes it moved:
# the kernel's destroy broadcasts and tcp_info (the ``events`` work).
NEEDS_COUNTERS = (
    "the linux source gave no byte counters: close rows take them from the kernel's end "
    "events and update rows from INET_DIAG_INFO, which the source must report "
    "(watches_ends, Connection.counters)"
)


# --------------------------------------------------------------------------- 1. duration


def test_closed_reports_one_open_and_one_close_row_per_connection(spawn_story, run_histstat):
    child = spawn_story()
    js = run_histstat("-j", "--closed", *INTERVAL, "--pid", child.pid)
    plain = run_histstat("--closed", *INTERVAL, "--pid", child.pid)
    for histstat, output in ((js, "json"), (plain, "plain")):
        wait_for_keys(histstat, [child.listener], output)  # polling, and born before it
    child.connect()
    both = [child.client(), child.server()]
    wait_for_keys(js, both, event="open", pid=child.pid)
    wait_for_keys(plain, both, "plain", event="open", pid=child.pid)
    # The process renames itself before closing: the close rows keep what was seen.
    lifetime = child.close(hold=HOLD, rename="story-renamed")
    stories = wait_for_stories(js, both, "close")
    plain_closed = wait_for_keys(plain, both, "plain", event="close", pid=child.pid)
    assert_clean_end(js.stop())
    assert_clean_end(plain.stop())

    low, high = duration_bounds(lifetime)
    assert low > 0  # the bounds tell a lifetime apart from nothing
    for key in both:
        story = stories[endpoints(key)]
        # One connection, one story: its states in between are no rows of their own.
        assert [row["event"] for row in story] == ["open", "close"], story
        open_row, close_row = story
        assert open_row["status"] == "ESTABLISHED"
        assert open_row["pid"] == child.pid
        assert open_row["command"] == child.command
        assert open_row["pname"] != "story-renamed"
        # With kernel events, a poll that sees the socket before its holder's descriptor
        # is scanned leaves the connect event (the client) or the listener (the accepted
        # end) to name the same process.
        assert open_row["attribution"] in ("socket", "connect", "listener"), open_row
        assert open_row["duration"] is None and open_row["duration_from_start"] is False
        for name in (*KEY_FIELDS[:5], *PROCESS_FACTS):
            assert close_row[name] == open_row[name], name
        # The last state seen before the end; no process may hold it by then.
        assert close_row["status"] in ("ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE_WAIT",
                                       "LAST_ACK"), close_row  # fmt: skip
        assert close_row["attribution"] in ("socket", "earlier", "connect", "listener"), close_row
        assert close_row["direction"] == open_row["direction"]
        assert close_row["duration_from_start"] is False
        duration = close_row["duration"]
        assert isinstance(duration, float), close_row
        assert low <= duration <= high, (duration, lifetime)
        # The close row's time is the end, where the duration ends.
        apart = (stamp(close_row) - stamp(open_row)).total_seconds()
        assert abs(apart - duration) < 0.05, (apart, duration)
        assert list(close_row) == list(open_row)

        cell = one(plain_closed[key[:5] + (close_row["status"],)])["duration"]
        assert re.fullmatch(r"\d+\.\d{3}", cell), cell  # no '>': born while histstat ran
        assert low <= float(cell) <= high, (cell, lifetime)
    # Accepted here: in; opened from here: out.
    assert stories[endpoints(child.server())][0]["direction"] == "in"
    assert stories[endpoints(child.client())][0]["direction"] == "out"


def test_duration_is_within_one_interval_of_the_true_life(spawn_story, run_histstat):
    child = spawn_story()
    js = run_histstat("-j", "--closed", "-i", "1", "--pid", child.pid)
    wait_for_keys(js, [child.listener])
    child.connect()
    lifetime = child.close(hold=4.0)
    stories = wait_for_stories(js, [child.client(), child.server()], "close")
    assert_clean_end(js.stop())

    low, high = duration_bounds(lifetime, interval=1.0)
    assert low > 0  # the bounds tell a lifetime apart from nothing
    for story in stories.values():
        (close_row,) = [row for row in story if row["event"] == "close"]
        assert low <= close_row["duration"] <= high, (close_row, lifetime)


# --------------------------------------------------------------------------- 2. older


def test_closed_marks_a_connection_older_than_histstat(spawn_story, run_histstat):
    child = spawn_story()
    child.connect()  # before histstat starts
    outputs = {
        "json": run_histstat("-j", "--closed", *INTERVAL, "--pid", child.pid),
        "plain": run_histstat("--closed", *INTERVAL, "--pid", child.pid),
        "csv": run_histstat("--csv", "--closed", *INTERVAL, "--pid", child.pid),
    }
    both = [child.client(), child.server()]
    opened = {out: wait_for_keys(hs, both, out, event="open") for out, hs in outputs.items()}
    lifetime = child.close()
    closed = {out: wait_for_keys(hs, both, out, event="close") for out, hs in outputs.items()}
    headers = {out: header_of(hs) for out, hs in outputs.items() if out != "json"}
    for histstat in outputs.values():
        assert_clean_end(histstat.stop())

    limit = lifetime + 2 * INTERVAL_SECONDS + SLACK
    for key in both:
        open_row, close_row = one(opened["json"][key]), one(closed["json"][key])
        assert open_row["duration_from_start"] is True
        assert close_row["duration_from_start"] is True
        assert 0 <= close_row["duration"] <= limit, (close_row, lifetime)
        assert stamp(close_row) >= stamp(open_row)
        for name in PROCESS_FACTS:
            assert close_row[name] == open_row[name], name
        assert close_row["pid"] == child.pid

    for out, unknown in (("plain", "-"), ("csv", "")):
        assert headers[out] == list(CLOSED_COLUMNS), out
        for key in both:
            open_row, close_row = one(opened[out][key]), one(closed[out][key])
            assert open_row["event"] == "open" and open_row["duration"] == unknown, open_row
            assert close_row["event"] == "close"
            assert close_row["pid"] == str(child.pid)
            assert close_row["command"] == child.command
            cell = close_row["duration"]
            assert re.fullmatch(r">\d+\.\d{3}", cell), (out, cell)
            assert 0 <= float(cell[1:]) <= limit, (out, cell, lifetime)


# --------------------------------------------------------------------------- 3. TIME_WAIT


def test_fin_wait2_and_time_wait_stay_attributed_through_the_close(spawn_story, run_histstat):
    """The client closes, the server 0.5 s later: the client's FIN_WAIT2 and the TIME_WAIT
    it turns into, which no process holds, keep the client's process."""
    child = spawn_story()
    # --pid keeps what no process holds only through the story's owner.
    js = run_histstat("-j", "--closed", "--transitions", *INTERVAL, "--pid", child.pid)
    wait_for_keys(js, [child.listener])
    child.connect()
    wait_for_keys(js, [child.client(), child.server()], event="open", pid=child.pid)
    child.close(gap=0.5)
    stories = wait_for_stories(js, [child.client()], "state", count=2)
    stories.update(wait_for_stories(js, [child.server()], "close"))
    assert_clean_end(js.stop())

    client = stories[endpoints(child.client())]
    server = stories[endpoints(child.server())]
    assert events_of(client) == [
        ("open", "ESTABLISHED"),
        ("state", "FIN_WAIT2"),
        ("close", "FIN_WAIT2"),
        ("state", "TIME_WAIT"),
    ], events_of(client)
    assert events_of(server)[:2] == [("open", "ESTABLISHED"), ("state", "CLOSE_WAIT")]
    assert events_of(server)[-1][0] == "close"
    opened = client[0]
    for row in client + server:
        assert row["pid"] == child.pid, row
        for name in PROCESS_FACTS:
            assert row[name] == opened[name], (name, row)
    assert [row["attribution"] for row in client] == ["socket", "earlier", "earlier", "earlier"]
    assert {row["direction"] for row in client} == {"out"}
    assert {row["direction"] for row in server} == {"in"}


# --------------------------------------------------------------------------- 4. direction


DIRECTION_FIELDS = ("direction", *KEY_FIELDS, "pid")


def expected_directions(child) -> dict:
    found = {}
    for version, host, ports in (
        ("", HOST, (child.lport, child.cport, child.uport)),
        ("6", "::1", (child.lport6, child.cport6, child.uport6)),
    ):
        if ports[0] is None:
            continue
        lport, cport, uport = ports
        tcp = "tcp" + version
        found[(tcp, host, lport, None, None, "LISTEN")] = "listen"
        found[(tcp, host, lport, host, cport, "ESTABLISHED")] = "in"
        found[(tcp, host, cport, host, lport, "ESTABLISHED")] = "out"
        found[("udp" + version, host, uport, None, None, None)] = None
    return found


def test_direction_in_json_and_in_text(spawn_child, run_histstat):
    child = spawn_child()
    js = run_histstat("-j", *INTERVAL, "--pid", child.pid)
    text = run_histstat("-f", ",".join(DIRECTION_FIELDS), *INTERVAL, "--pid", child.pid)
    picked = run_histstat("-j", "-f", "event,direction,pid", *INTERVAL, "--pid", child.pid)
    expected = expected_directions(child)
    js.wait_for_child(child)
    text.wait_for_child(child)
    picked.wait_for_rows(lambda row: row.get("pid") == child.pid, count=len(expected))
    header = header_of(text)
    for histstat in (js, text, picked):
        assert_clean_end(histstat.stop())
    json_rows, text_rows = js.result.rows_of(child.pid), text.result.rows_of(child.pid)
    picked_rows = picked.result.rows_of(child.pid)

    assert len(json_rows) == len(text_rows) == len(expected)
    assert {connection_key(row): row["direction"] for row in json_rows} == expected
    shown = {key: "-" if direction is None else direction for key, direction in expected.items()}
    assert {connection_key(row): row["direction"] for row in text_rows} == shown
    assert header == list(DIRECTION_FIELDS)
    # -f picks the JSON keys, in its order.
    assert {tuple(row) for row in picked_rows} == {("event", "direction", "pid")}
    assert sorted(row["direction"] or "" for row in picked_rows) == sorted(
        direction or "" for direction in expected.values()
    )


# --------------------------------------------------------------------------- 5. resolve


def test_resolve_names_the_remote_address(spawn_child, run_histstat):
    # The expected name, from the system resolver, for 127.0.0.1 only (/etc/hosts).
    try:
        name = socket.gethostbyaddr(HOST)[0]
    except OSError:
        name = None
    child = spawn_child()
    # Only the child's IPv4 loopback peers are looked up: ::1 is not in every /etc/hosts,
    # and a PTR query for it would then leave this machine.
    narrow = ("-r", "--raddr", "127.0.0.0/8", "--pid", str(child.pid), *INTERVAL)
    js = run_histstat("-j", *narrow)
    text = run_histstat(*narrow)
    both = [
        ("tcp", HOST, child.cport, HOST, child.lport, "ESTABLISHED"),
        ("tcp", HOST, child.lport, HOST, child.cport, "ESTABLISHED"),
    ]
    json_rows = wait_for_keys(js, both)
    text_rows = wait_for_keys(text, both, "plain")
    header = header_of(text)
    for histstat in (js, text):
        assert_clean_end(histstat.stop())

    assert header == [*COLUMNS[:5], "rhost", *COLUMNS[5:]]
    for key in both:
        row = one(json_rows[key])
        assert row["raddr"] == HOST and row["rhost"] == name, row
        keys = list(row)
        assert keys.index("rhost") == keys.index("rport") + 1
        row = one(text_rows[key])
        assert row["raddr"] == HOST and row["rhost"] == (name or "-"), row


# --------------------------------------------------------------------------- 6. GeoIP


@pytest.fixture
def geoip_files(tmp_path) -> list:
    loopback = ("127.0.0.0/8", "::1/128")
    return [
        write_country_db(tmp_path / "country.mmdb", {net: "ZZ" for net in loopback}),
        write_asn_db(tmp_path / "asn.mmdb", {net: (64512, "Loopback Net") for net in loopback}),
    ]


def test_geoip_places_the_remote_address(spawn_child, run_histstat, geoip_files):
    child = spawn_child()
    options = [arg for path in geoip_files for arg in ("--geoip", path)]
    js = run_histstat("-j", *options, *INTERVAL, "--pid", child.pid)
    text = run_histstat(*options, *INTERVAL, "--pid", child.pid)
    rows = js.wait_for_child(child)
    header = header_of(text)
    for histstat in (js, text):
        assert_clean_end(histstat.stop())

    assert header == [*COLUMNS[:5], "country", "asn", "as_org", *COLUMNS[5:]]
    remote = [row for row in rows if row["raddr"] is not None]
    assert len(remote) == (4 if child.has_v6 else 2)
    for row in rows:
        place = (row["country"], row["asn"], row["as_org"])
        if row["raddr"] is None:
            assert place == (None, None, None), row
        else:
            assert place == ("ZZ", 64512, "Loopback Net"), row
        keys = list(row)
        assert keys[keys.index("rport") + 1 : keys.index("rport") + 4] == [
            "country", "asn", "as_org",
        ]  # fmt: skip


def _missing(tmp_path) -> str:
    return str(tmp_path / "no-such.mmdb")


def _directory(tmp_path) -> str:
    path = tmp_path / "a-directory.mmdb"
    path.mkdir()
    return str(path)


def _corrupt(tmp_path) -> str:
    path = tmp_path / "corrupt.mmdb"
    path.write_bytes(bytes(random.Random(4).getrandbits(8) for _ in range(4096)))
    return str(path)


@pytest.mark.parametrize("bad", [_missing, _directory, _corrupt], ids=lambda f: f.__name__[1:])
@pytest.mark.parametrize("good_first", [False, True], ids=["alone", "after-a-good-one"])
def test_geoip_refuses_an_unusable_database(tmp_path, geoip_files, bad, good_first):
    path = bad(tmp_path)
    options = ["--geoip", geoip_files[0]] if good_first else []
    # --duration: should it poll after all, it ends by itself (exit 0) and the test fails.
    args = ["-j", *INTERVAL, "--duration", "3", *options, "--geoip", path]
    done = run_once(args, timeout=DEFAULT_TIMEOUT)
    assert done.returncode == 1, done
    assert done.stdout == b""  # it stopped before the first poll
    lines = [line for line in done.stderr.decode().splitlines() if line != NOT_PRIVILEGED_NOTICE]
    assert len(lines) == 1, lines
    assert path in lines[0] and "Traceback" not in lines[0], lines


# --------------------------------------------------------------------------- 7. default


def test_by_default_a_connection_is_one_open_row(spawn_story, run_histstat):
    child = spawn_story()
    js = run_histstat("-j", *INTERVAL, "--pid", child.pid)
    text = run_histstat(*INTERVAL, "--pid", child.pid)
    # A witness that shows when the story is over: the client's TIME_WAIT.
    witness = run_histstat("-j", "--transitions", *INTERVAL, "--pid", child.pid)
    for histstat, output in ((js, "json"), (text, "plain"), (witness, "json")):
        wait_for_keys(histstat, [child.listener], output)
    child.connect()
    both = [child.client(), child.server()]
    for histstat, output in ((js, "json"), (text, "plain"), (witness, "json")):
        wait_for_keys(histstat, both, output, pid=child.pid)
    child.close(gap=0.3)
    wait_for_keys(witness, [child.client("TIME_WAIT")], event="state")
    header = header_of(text)
    for histstat in (js, text, witness):
        assert_clean_end(histstat.stop())

    json_rows = js.result.rows
    assert {row["event"] for row in json_rows} == {"open"}
    for row in json_rows:
        assert "duration" not in row and "duration_from_start" not in row, row
        assert "bytes_sent" not in row, row
        assert {"event", "direction", "attribution", "owners", "owners_count", *COLUMNS} <= set(
            row
        ), row
    assert header == list(COLUMNS)
    for rows in (json_rows, text.result.rows):
        for key in both:
            assert [connection_key(row) for row in story_of(rows, key)] == [key], key


def test_unusable_geoip_database_leaves_no_header_log_or_database(tmp_path):
    log, db = tmp_path / "rows.log", tmp_path / "rows.db"
    done = run_once(["--geoip", tmp_path / "missing.mmdb", "-l", log, "--sqlite", db])
    assert done.returncode == 1
    assert done.stdout == b""  # not even the header
    assert len(done.stderr.decode().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == []


# --------------------------------------------------------------------------- 8. --skip-existing


def test_skip_existing_shows_only_what_happens_after_the_start(spawn_story, run_histstat):
    """A child's listener and connection from before histstat get no rows, not even close
    rows, nor their later states (the TIME_WAIT the old connection leaves); yet they teach
    it: a connection accepted later on the old listener is "in". A child started after
    the first poll is shown whole."""
    tag = new_tag()
    before = spawn_story(comm=f"hs{tag}a")
    require_wchan(before)
    before.connect()
    old = {before.listener, before.client(), before.server()}
    js = run_histstat("-j", "--closed", "--skip-existing", *INTERVAL, "--name", f"hs{tag}*")
    js.until(lambda: sleeping_between_polls(js.proc.pid), what="the end of the first poll")

    after = spawn_story(comm=f"hs{tag}b")
    after.connect()
    new = [after.listener, after.client(), after.server()]
    opened = wait_for_keys(js, new, pid=after.pid)
    assert {row["pid"] for row in js.rows()} == {after.pid}, js.describe()

    before.close()  # the client first: its end goes TIME_WAIT, for 60 s
    before.connect()  # accepted on the listener that predates histstat
    accepted = wait_for_keys(js, [before.server(), before.client()], pid=before.pid)
    after.close()  # a connection shown gets its close rows, as ever
    wait_for_keys(js, new[1:], event="close", pid=after.pid)
    assert_clean_end(js.stop())

    old_endpoints = {key[:5] for key in old}  # TIME_WAIT included: polls saw it since
    assert [row for row in js.result.rows if connection_key(row)[:5] in old_endpoints] == []
    assert one(opened[after.listener])["direction"] == "listen"
    assert one(opened[after.server()])["direction"] == "in", js.describe(200)
    assert one(opened[after.client()])["direction"] == "out"
    assert one(accepted[before.server()])["direction"] == "in"
    assert one(accepted[before.client()])["direction"] == "out"


# --------------------------------------------------------------------------- 9. one story


def test_a_connection_no_poll_caught_gets_one_open_and_one_close_row(spawn_story, run_histstat):
    """Opened and closed between two polls: its end (the kernel's end event, or the
    TIME_WAIT the client leaves) still makes one story, and the TIME_WAIT that every
    later poll sees is that story's, never a second open row."""
    child = spawn_story()
    require_wchan(child)
    js = run_histstat("-j", "--closed", "--transitions", "-i", "1", "--port", child.lport)
    wait_for_keys(js, [child.listener])
    js.until(lambda: sleeping_between_polls(js.proc.pid), what="a sleep between polls")
    child.connect()
    child.close()  # a millisecond after the connect, well before the next poll
    first, first_server = child.client(), child.server()
    stories = wait_for_stories(js, [first], "close")
    child.connect()  # a later connection, seen by a later poll than the TIME_WAIT's
    wait_for_stories(js, [child.client()], "open")
    assert_clean_end(js.stop())

    story = story_of(js.result.rows, first)
    assert story[: len(stories[endpoints(first)])] == stories[endpoints(first)]
    assert [row["event"] for row in story if row["event"] != "state"] == ["open", "close"], story
    assert story[0]["status"] in ("TIME_WAIT", "CLOSE"), story  # its last known state
    # The accepted end leaves nothing in the table: only an end event tells of it.
    server = [row["event"] for row in story_of(js.result.rows, first_server)]
    assert server in ([], ["open", "close"]), server


CHURN_SOURCE = """
import collections
import socket
import struct
import sys
import time

server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(512)
print(server.getsockname()[1], flush=True)
sys.stdin.readline()
mode, rate, seconds, hold = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
linger = struct.pack("ii", 1, 0)
held = collections.deque()  # (opened, client, accepted), oldest first
ports = []  # each connection's client port: one a reset frees may serve again


def close(client, accepted):
    if mode == "rst":
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    client.close()
    accepted.close()


started = time.monotonic()
made = 0
while time.monotonic() < started + seconds:
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    held.append((time.monotonic(), client, accepted))
    ports.append(client.getsockname()[1])
    made += 1
    while held and held[0][0] < time.monotonic() - hold:
        close(*held.popleft()[1:])
    ahead = started + made / rate - time.monotonic()
    if ahead > 0:
        time.sleep(ahead)
while held:
    close(*held.popleft()[1:])
print(made, flush=True)
print(*ports, flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize(
    ("mode", "rate", "seconds", "hold"),
    [("rst", 1000, 3.0, 0.2), ("graceful", 1000, 2.0, 0.0)],
    ids=["1000-per-second-with-rst", "2000-closed-in-2-seconds"],
)
def test_a_burst_of_connections_closes_each_exactly_once(run_histstat, mode, rate, seconds, hold):
    """Connections that come and go fast, each (with RST) living 0.2 s: while some
    leave their process's descriptor table between the dump and the descriptor scan,
    none is closed while still in the table (closed, then opened again)."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHURN_SOURCE, mode, str(rate), str(seconds), str(hold)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        port = int(read_line(child.stdout, DEFAULT_TIMEOUT))
        js = run_histstat(
            "-j",
            "--closed",
            *INTERVAL,
            "--port",
            port,
            "-f",
            "event,laddr,lport,raddr,rport,status,timestamp",
        )
        js.until(lambda: js.rows(), what="the listener's row")
        child.stdin.write(b"go\n")
        child.stdin.flush()
        made = int(read_line(child.stdout, DEFAULT_TIMEOUT + seconds))
        used = collections.Counter(read_line(child.stdout, DEFAULT_TIMEOUT).split())

        times: dict = {}

        def counts():
            times.clear()
            found: dict = {}
            for row in js.rows():
                if row["rport"] is not None:
                    key = (row["lport"], row["rport"])
                    found.setdefault(key, []).append(row["event"])
                    times.setdefault(key, []).append((row["status"], row["timestamp"][11:]))
            return found

        def all_closed():
            found = counts()
            return all(events.count("close") for events in found.values())

        js.until(all_closed, what="a close row for every connection opened")
        assert_clean_end(js.stop())
        found = counts()
    finally:
        end_child(child)
    assert made >= rate * seconds / 4, made  # the burst took place
    assert found, "no connection of the burst was seen"
    for key, events in found.items():
        # No false close: a socket still in the table is never ended and opened again.
        # Only a client port the kernel gave out again (a reset leaves no TIME_WAIT to
        # hold it) makes a second connection on the same addresses and ports.
        client_port = key[1] if key[0] == port else key[0]
        again = max(1, used[str(client_port).encode()])
        opens = events.count("open")
        # The last may be open still: a poll in flight when the closes were counted
        # (a connection seen in SYN_SENT then) writes its rows before histstat stops.
        paired = ["open", "close"] * opens
        assert events in (paired, paired[:-1]), (key, events, times[key])
        assert opens <= again, (key, events, times[key], again)


# --------------------------------------------------------------------------- 10. bytes


def test_close_rows_carry_the_payload_bytes_of_each_end(spawn_story, run_histstat):
    """The client sends 5,000 bytes, the server 7,000: 5000/7000 and 7000/5000, the
    FIN and SYN the kernel counts left out. Only the kernel's end events say it: the
    psutil source leaves them null."""
    child = spawn_story()
    js = run_histstat("-j", "--closed", *INTERVAL, "--pid", child.pid)
    wait_for_keys(js, [child.listener])
    child.connect()
    both = [child.client(), child.server()]
    wait_for_keys(js, both, event="open", pid=child.pid)
    child.send(5000, 7000)
    child.close(gap=0.5)  # the server's CLOSE_WAIT shows: it has read the client's FIN
    stories = wait_for_stories(js, both, "close")
    assert_clean_end(js.stop())

    closed = {key: [row for row in story if row["event"] == "close"][0]
              for key, story in stories.items()}  # fmt: skip
    client, server = closed[endpoints(child.client())], closed[endpoints(child.server())]
    found = {(row["bytes_sent"], row["bytes_received"]) for row in (client, server)}
    if source_name() == "psutil":
        assert found == {(None, None)}, found
        return
    if found == {(None, None)}:
        pytest.fail(NEEDS_COUNTERS, pytrace=False)
    assert (client["bytes_sent"], client["bytes_received"]) == (5000, 7000), client
    assert (server["bytes_sent"], server["bytes_received"]) == (7000, 5000), server


def test_update_rows_show_the_bytes_of_a_long_transfer_as_it_goes(spawn_story, run_histstat):
    child = spawn_story()
    js = run_histstat("-j", "--update", "1", *INTERVAL, "--pid", child.pid)
    wait_for_keys(js, [child.listener])
    child.connect()
    wait_for_keys(js, [child.client()], event="open", pid=child.pid)
    child.trickle(3.0, 20_000)
    assert_clean_end(js.stop())

    story = story_of(js.result.rows, child.client())
    updates = [row for row in story if row["event"] == "update"]
    assert len(updates) >= 2, story  # one a second, for three seconds
    for row in updates:
        assert (row["status"], row["pid"], row["direction"]) == ("ESTABLISHED", child.pid, "out")
        assert row["duration"] >= 0
    sent = [row["bytes_sent"] for row in updates]
    if source_name() == "psutil":
        assert set(sent) == {None}, sent  # psutil has no byte counters
        return
    if set(sent) == {None}:
        pytest.fail(NEEDS_COUNTERS, pytrace=False)
    assert all(later > earlier for earlier, later in zip(sent, sent[1:])), sent
    assert 0 < sent[-1] <= 60_000, sent
    assert {row["bytes_received"] for row in updates} == {0}

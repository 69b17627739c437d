"""Network namespaces and containers through the pipeline: fake sources whose records
carry their namespace, through the real tracker, poller, filters, formatters and SQLite."""

from __future__ import annotations

import json
import sqlite3
import time
from typing import NamedTuple

from test_story import Cache, EventSource, rows_of

from histstat.filters import RowFilter
from histstat.output.format import (
    format_csv_row,
    format_json_row,
    format_plain_row,
    json_fields,
)
from histstat.output.pretty import PrettyView
from histstat.output.sqlite import SqliteSink, row_values
from histstat.output.writer import OrderedWriter
from histstat.poller import Poller
from histstat.records import Connection, ProcessFacts
from histstat.sources.base import NO_ENDS, End, Ends
from histstat.tracker import ConnectionTracker

HOST_NS, CONTAINER_NS = 4026531840, 4026532500
CONTAINER = "4f1e2b3c" * 8  # 64 hex, like every runtime's ids
OTHER = "4f1e2b3c4f1e" + "0" * 52  # shares CONTAINER's first 12 characters

# One 5-tuple in two namespaces: the host's curl and a container's curl, both talking to
# their own namespace's 127.0.0.1:8000.
HOST_CLIENT = Connection("tcp", "127.0.0.1", 50000, "127.0.0.1", 8000, "ESTABLISHED", 20,
                         netns=HOST_NS)  # fmt: skip
CONTAINED_CLIENT = HOST_CLIENT._replace(pid=30, netns=CONTAINER_NS)
HOST_LISTENER = Connection("tcp", "127.0.0.1", 8000, None, None, "LISTEN", 10, netns=HOST_NS)


class ContainerCache(Cache):
    """Process facts whose container depends on the pid: 30 and 31 run in containers."""

    containers = {30: CONTAINER, 31: OTHER, 40: "my-box"}

    def lookup(self, pid):
        facts = super().lookup(pid)
        return facts._replace(command=f"curl {pid}", container=self.containers.get(pid))


def poller_of(*snapshots, row_filter=None, cache=None, **options):
    source = EventSource(*((set(snapshot), NO_ENDS) for snapshot in snapshots), watches=False)
    cache = cache or ContainerCache()
    return Poller(source, ConnectionTracker(), cache, row_filter, **options), cache


def test_rows_carry_their_namespace_and_their_owners_container():
    poller, _ = poller_of({HOST_CLIENT, CONTAINED_CLIENT})
    rows = {row.netns: row for row in rows_of(poller)}
    assert set(rows) == {HOST_NS, CONTAINER_NS}
    assert (rows[HOST_NS].pid, rows[HOST_NS].container) == (20, None)
    assert (rows[CONTAINER_NS].pid, rows[CONTAINER_NS].container) == (30, CONTAINER)


def test_one_5_tuple_in_two_namespaces_is_two_stories_that_end_apart():
    poller, _ = poller_of(
        {HOST_CLIENT, CONTAINED_CLIENT}, {HOST_CLIENT}, {HOST_CLIENT}, closed=True
    )
    assert len(rows_of(poller)) == 2
    (closed,) = rows_of(poller)
    assert (closed.event, closed.netns, closed.pid, closed.container) == (
        "close", CONTAINER_NS, 30, CONTAINER,
    )  # fmt: skip
    assert rows_of(poller) == []


def test_an_orphaned_socket_keeps_the_container_of_the_owner_it_had():
    orphan = CONTAINED_CLIENT._replace(status="TIME_WAIT", pid=None)
    poller, _ = poller_of({CONTAINED_CLIENT}, {orphan}, transitions=True)
    rows_of(poller)
    (state,) = rows_of(poller)
    assert (state.status, state.pid, state.attribution, state.container) == (
        "TIME_WAIT", 30, "earlier", CONTAINER,
    )  # fmt: skip
    # Its first sight filtered out, the remainder's row still has the owner's container,
    # and --container keeps it.
    wanted = RowFilter(statuses=frozenset({"TIME_WAIT"}), containers=(CONTAINER,))
    poller, _ = poller_of({CONTAINED_CLIENT}, {orphan}, row_filter=wanted)
    assert rows_of(poller) == []
    (opened,) = rows_of(poller)
    assert (opened.status, opened.attribution, opened.container) == (
        "TIME_WAIT", "earlier", CONTAINER,
    )  # fmt: skip


def test_an_accepted_connection_takes_only_its_own_namespaces_listener():
    host_accepted = Connection("tcp", "127.0.0.1", 8000, "127.0.0.1", 50000, "ESTABLISHED",
                               None, netns=HOST_NS)  # fmt: skip
    contained_accepted = host_accepted._replace(netns=CONTAINER_NS)
    poller, _ = poller_of({HOST_LISTENER, host_accepted, contained_accepted})
    rows = {(row.netns, row.status): row for row in rows_of(poller)}
    host = rows[HOST_NS, "ESTABLISHED"]
    assert (host.pid, host.attribution, host.direction) == (10, "listener", "in")
    contained = rows[CONTAINER_NS, "ESTABLISHED"]
    assert (contained.pid, contained.attribution, contained.direction) == (None, None, "out")


def test_the_netns_filter_runs_before_any_process_lookup():
    poller, cache = poller_of(
        {HOST_CLIENT, CONTAINED_CLIENT, HOST_LISTENER},
        row_filter=RowFilter(namespaces=frozenset({CONTAINER_NS})),
    )
    assert [(row.netns, row.pid) for row in rows_of(poller)] == [(CONTAINER_NS, 30)]
    assert cache.looked_up == [30]


def test_the_container_filter_matches_full_ids_prefixes_and_machine_names():
    clients = {
        HOST_CLIENT,
        CONTAINED_CLIENT,
        CONTAINED_CLIENT._replace(pid=31, lport=50001),
        CONTAINED_CLIENT._replace(pid=40, lport=50002),
    }

    def pids(*values):
        wanted = RowFilter(containers=values)
        poller, cache = poller_of(clients, row_filter=wanted)
        found = sorted(row.pid for row in rows_of(poller))
        assert sorted(cache.looked_up) == [20, 30, 31, 40]  # decided after the lookup
        assert wanted.container_filter is not None
        return found, wanted.container_filter

    assert pids(CONTAINER)[0] == [30]
    assert pids("my-box")[0] == [40]
    found, chosen = pids(CONTAINER[:12])  # Docker's short id: both containers share it
    assert found == [30, 31]
    assert chosen.ambiguous() == {CONTAINER[:12]: tuple(sorted((CONTAINER, OTHER)))}
    assert pids(CONTAINER[:12], "my-boxes")[1].unmatched() == ("my-boxes",)


def test_a_prefix_naming_two_containers_is_told_once():
    notices = []
    first = CONTAINED_CLIENT
    second = CONTAINED_CLIENT._replace(pid=31, lport=50001)
    poller, _ = poller_of({first}, {first, second}, {first, second},
                          row_filter=RowFilter(containers=(CONTAINER[:12],)),
                          notice=notices.append)  # fmt: skip
    rows_of(poller)
    assert notices == []
    assert [row.pid for row in rows_of(poller)] == [31]
    told = [
        f"--container {CONTAINER[:12]} names 2 containers, and rows of each are shown: "
        f"{OTHER}, {CONTAINER}"
    ]
    assert notices == told
    rows_of(poller)
    assert notices == told


class NamespacedConnect(NamedTuple):
    """A connect event as the connect helper keys it: identity_key's shape."""

    proto: str
    laddr: str
    lport: int
    raddr: str
    rport: int
    netns: int | None
    time: float
    end_time: float
    failed: bool
    process: object

    @property
    def key(self):
        return (self.proto, self.laddr, self.lport, self.raddr, self.rport, self.netns)


class Watcher:
    def __init__(self, connects):
        self._connects = {connect.key: connect for connect in connects}

    def connect_of(self, key, alone=True):
        return self._connects.get(key)

    def catch_up(self):
        pass

    def take_failed(self):
        return []

    def lost_since_told(self):
        return 0


class Process(NamedTuple):
    pid: int
    created: float | None
    facts: ProcessFacts


def test_a_connect_event_joins_only_the_story_of_its_namespace():
    host_orphan = HOST_CLIENT._replace(pid=None, status="TIME_WAIT")
    contained_orphan = CONTAINED_CLIENT._replace(pid=None, status="TIME_WAIT")
    connect = NamespacedConnect(
        *CONTAINED_CLIENT[:5], CONTAINER_NS, 1000.0, 1000.001, False,
        Process(30, None, ProcessFacts(name="beacon", container=CONTAINER)),
    )  # fmt: skip
    poller, _ = poller_of({host_orphan, contained_orphan}, connects=Watcher([connect]))
    rows = {row.netns: row for row in rows_of(poller)}
    assert (rows[CONTAINER_NS].pid, rows[CONTAINER_NS].attribution) == (30, "connect")
    assert rows[CONTAINER_NS].container == CONTAINER
    assert (rows[HOST_NS].pid, rows[HOST_NS].attribution) == (None, None)


def test_an_end_event_closes_the_connection_of_its_namespace_only():
    ends = Ends([End(*CONTAINED_CLIENT[:5], 0, time.time(), None, CONTAINER_NS)])
    source = EventSource(
        ({HOST_CLIENT, CONTAINED_CLIENT}, NO_ENDS), ({HOST_CLIENT}, ends), ({HOST_CLIENT}, NO_ENDS)
    )
    poller = Poller(source, ConnectionTracker(), ContainerCache(), closed=True)
    rows_of(poller)
    (closed,) = rows_of(poller)
    assert (closed.event, closed.netns, closed.container) == ("close", CONTAINER_NS, CONTAINER)
    assert rows_of(poller) == []


class Lines:
    def __init__(self):
        self.lines = []

    def write(self, line):
        self.lines.append(line)

    def flush(self):
        pass


def test_both_namespaces_rows_through_json_text_csv_pretty_and_sqlite(tmp_path):
    poller, _ = poller_of({HOST_CLIENT, CONTAINED_CLIENT})
    database = tmp_path / "h.db"
    sqlite_sink = SqliteSink(str(database), ["--sqlite", "h.db"], print)
    sqlite_sink.open()
    fields = ("pid", "netns", "container")
    sinks = {name: Lines() for name in ("json", "plain", "csv", "pretty")}
    pretty = PrettyView(fields)
    writer = OrderedWriter([
        (lambda row: format_json_row(row, json_fields(False)), sinks["json"]),
        (lambda row: format_plain_row(row, fields), sinks["plain"]),
        (lambda row: format_csv_row(row, fields), sinks["csv"]),
        (pretty.format_row, sinks["pretty"]),
        (row_values, sqlite_sink),
    ])  # fmt: skip
    writer.add(poller.poll())
    writer.write_ready(time.monotonic(), final=True)
    sqlite_sink.close()
    documents = sorted((json.loads(line) for line in sinks["json"].lines), key=lambda d: d["pid"])
    assert [(d["netns"], d["container"]) for d in documents] == [
        (HOST_NS, None), (CONTAINER_NS, CONTAINER),
    ]  # fmt: skip
    keys = list(documents[0])
    assert keys[keys.index("rport") + 1] == "netns"
    assert keys[keys.index("parent") + 1] == "container"
    assert sorted(sinks["plain"].lines) == [f"20\t{HOST_NS}\t-", f"30\t{CONTAINER_NS}\t{CONTAINER}"]
    assert sorted(sinks["csv"].lines) == [f"20,{HOST_NS},", f"30,{CONTAINER_NS},{CONTAINER}"]
    assert pretty.header() == "pid     netns      container"
    assert sorted(sinks["pretty"].lines) == [
        f"20      {HOST_NS} -",
        f"30      {CONTAINER_NS} {CONTAINER[:12]}",  # Docker's short id
    ]
    db = sqlite3.connect(database)
    try:
        stored = db.execute("SELECT pid, netns, container FROM connections ORDER BY pid")
        assert stored.fetchall() == [(20, HOST_NS, None), (30, CONTAINER_NS, CONTAINER)]
    finally:
        db.close()

"""The poller's rows of one story, from fake sources that give cookies, byte counters,
owners and end events as the Linux source does (and nothing of it, as psutil does)."""

from __future__ import annotations

import time

from histstat.poller import Poller
from histstat.records import MAX_OWNERS, UNKNOWN_PROCESS, Connection, ProcessFacts, TcpCounters
from histstat.sources.base import NO_ENDS, End, Ends
from histstat.tracker import ConnectionTracker

LISTENER = Connection("tcp", "127.0.0.1", 8000, None, None, "LISTEN", 10, 1)
CLIENT = Connection("tcp", "127.0.0.1", 50000, "127.0.0.1", 8000, "ESTABLISHED", 20, 2)
SERVER = Connection("tcp", "127.0.0.1", 8000, "127.0.0.1", 50000, "ESTABLISHED", 10, 3)


class EventSource:
    """Snapshots and end events, one batch per poll; counters only when asked."""

    name = "events"

    def __init__(self, *polls, watches=True):
        self._polls = list(polls)  # (snapshot, Ends) per poll
        self._watches = watches
        self._ends = NO_ENDS
        self.asked_counters = []

    def snapshot(self, counters=False):
        self.asked_counters.append(counters)
        snapshot, self._ends = self._polls.pop(0)
        if not counters:
            snapshot = {conn._replace(counters=None) for conn in snapshot}
        return frozenset(snapshot)

    def watches_ends(self):
        return self._watches

    def ends(self):
        return self._ends

    def uid_of(self, conn):
        return None

    def close(self):
        pass


class Cache:
    def __init__(self):
        self.looked_up = []

    def lookup(self, pid):
        self.looked_up.append(pid)
        return ProcessFacts(
            name=f"proc{pid}", command=f"command of {pid}", ppid=1, parent="init",
            args=(f"proc{pid}", "--serve"),
        )  # fmt: skip

    def hashes(self, pid, facts):
        return None

    def created(self, pid):
        return 0.0

    def start_and_facts(self, pid, accept=None):
        created = self.created(pid)
        if created is None:
            return None, UNKNOWN_PROCESS
        if accept is not None and not accept(created):
            return created, None
        return created, self.lookup(pid)

    def begin_poll(self):
        pass

    def retain(self, live):
        pass


def rows_of(poller):
    return [pending.resolved() for pending in poller.poll()]


def end_of(conn, cookie, at, counters=None):
    return End(conn.proto, conn.laddr, conn.lport, conn.raddr, conn.rport, cookie, at, counters)


def poller_of(*polls, watches=True, notices=None, **options):
    say = notices.append if notices is not None else None
    source = EventSource(*polls, watches=watches)
    return Poller(source, ConnectionTracker(), Cache(), notice=say, **options), source


def test_close_rows_carry_the_end_events_time_last_state_and_payload_bytes():
    fin_wait2 = CLIENT._replace(status="FIN_WAIT2", pid=None, cookie=2)
    close_wait = SERVER._replace(status="CLOSE_WAIT")
    ended_at = time.time() + 0.05
    ends = Ends(
        [
            end_of(CLIENT, 2, ended_at, TcpCounters(5002, 7000, 5000, 0)),
            end_of(SERVER, 3, ended_at, TcpCounters(7001, 5001, 7000, 0)),
        ]
    )
    poller, _ = poller_of(
        ({LISTENER, CLIENT, SERVER}, NO_ENDS),
        ({LISTENER, fin_wait2, close_wait}, NO_ENDS),
        ({LISTENER}, ends),
        closed=True,
    )
    opened = rows_of(poller)
    assert [row.event for row in opened] == ["open"] * 3
    assert rows_of(poller) == []  # states, not connections
    closed = {row.lport: row for row in rows_of(poller)}
    client, server = closed[50000], closed[8000]
    assert (client.event, client.status, client.bytes_sent, client.bytes_received) == (
        "close", "FIN_WAIT2", 5000, 7000,
    )  # fmt: skip
    assert (server.status, server.bytes_sent, server.bytes_received) == ("CLOSE_WAIT", 7000, 5000)
    assert (client.pid, client.attribution) == (20, "earlier")  # its FIN_WAIT2 had no owner
    assert (server.pid, server.attribution) == (10, "socket")
    assert abs(client.timestamp.timestamp() - ended_at) < 1e-5  # the kernel's end, not the poll
    assert client.direction == "out" and server.direction == "in"


def test_without_end_events_bytes_are_unknown_and_time_wait_ends_the_story():
    time_wait = CLIENT._replace(status="TIME_WAIT", pid=None)
    poller, _ = poller_of(
        ({CLIENT}, NO_ENDS),
        ({time_wait}, NO_ENDS),
        ({time_wait}, NO_ENDS),
        ({time_wait}, NO_ENDS),
        watches=False,
        closed=True,
        transitions=True,
    )
    rows_of(poller)
    closed, remainder = rows_of(poller)
    assert (closed.event, closed.status, closed.bytes_sent) == ("close", "ESTABLISHED", None)
    assert (remainder.event, remainder.status, remainder.pid) == ("state", "TIME_WAIT", 20)
    assert remainder.attribution == "earlier"
    assert rows_of(poller) == [] and rows_of(poller) == []


def test_an_end_no_poll_saw_gets_one_open_and_one_close_row_and_its_time_wait_none():
    never_seen = CLIENT._replace(lport=50001, cookie=9)
    time_wait = never_seen._replace(status="TIME_WAIT", pid=None, cookie=99)
    at = time.time()
    poller, _ = poller_of(
        ({LISTENER}, NO_ENDS),
        ({LISTENER}, Ends([end_of(never_seen, 9, at, TcpCounters(2, 0, 0, 0))])),
        ({LISTENER, time_wait}, NO_ENDS),
        ({LISTENER}, NO_ENDS),
        closed=True,
    )
    rows_of(poller)
    opened, closed = rows_of(poller)
    assert (opened.event, opened.lport, opened.status) == ("open", 50001, "CLOSE")
    # Learnt of at its end: both rows have the end's time, and its life is unknown.
    assert opened.timestamp == closed.timestamp and abs(opened.timestamp.timestamp() - at) < 1e-5
    assert (closed.event, closed.lport, closed.duration) == ("close", 50001, None)
    assert (closed.bytes_sent, closed.bytes_received) == (0, 0)  # a SYN and a FIN, no data
    assert rows_of(poller) == []  # its TIME_WAIT: the same story
    assert rows_of(poller) == []


def test_lost_end_events_are_inferred_and_told_once_with_no_close_twice():
    other = CLIENT._replace(lport=50001, cookie=5)
    notices = []
    poller, _ = poller_of(
        ({CLIENT, other}, NO_ENDS),
        (set(), Ends([end_of(CLIENT, 2, time.time())], lost=True)),
        (set(), Ends([end_of(other, 5, time.time())])),  # late: already inferred
        (set(), NO_ENDS),
        closed=True,
        notices=notices,
    )
    rows_of(poller)
    closed = rows_of(poller)
    assert sorted(row.lport for row in closed) == [50000, 50001]
    assert rows_of(poller) == [] and rows_of(poller) == []
    assert len(notices) == 1 and "1 end was inferred" in notices[0], notices


def test_update_rows_ask_for_counters_only_when_due_and_show_bytes_so_far():
    first = CLIENT._replace(counters=TcpCounters(1001, 10, 1000, 0))
    later = CLIENT._replace(counters=TcpCounters(3001, 20, 3300, 300))
    clock = [100.0]
    poller, source = poller_of(
        ({first}, NO_ENDS), ({later}, NO_ENDS), ({later}, NO_ENDS), update=2.0
    )
    real_monotonic = time.monotonic
    try:
        time.monotonic = lambda: clock[0]
        opened, update = rows_of(poller)
        clock[0] += 1.0
        assert rows_of(poller) == []
        clock[0] += 1.0
        (again,) = rows_of(poller)
    finally:
        time.monotonic = real_monotonic
    assert source.asked_counters == [True, False, True]
    assert (opened.event, update.event, again.event) == ("open", "update", "update")
    assert (update.bytes_sent, update.bytes_received, update.duration) == (1000, 10, 0.0)
    assert (again.bytes_sent, again.bytes_received, again.duration) == (3000, 20, 2.0)
    assert again.status == "ESTABLISHED" and again.pid == 20


def test_owners_list_every_holder_with_names_at_most_max_owners():
    holders = tuple(range(100, 100 + MAX_OWNERS + 4))
    shared = CLIENT._replace(pid=100, owners=holders)
    poller, _ = poller_of(({shared}, NO_ENDS))
    (row,) = rows_of(poller)
    assert row.pid == 100 and row.owners_count == MAX_OWNERS + 4
    assert [ref.pid for ref in row.owners] == list(holders[:MAX_OWNERS])
    assert row.owners[1].name == "proc101"


def test_a_source_without_owners_lists_the_pid_and_merges_a_socket_listed_per_holder():
    poller, _ = poller_of(({CLIENT._replace(pid=7), CLIENT._replace(pid=3)}, NO_ENDS))
    (row,) = rows_of(poller)
    assert row.pid == 3
    assert [(ref.pid, ref.name) for ref in row.owners] == [(3, "proc3"), (7, "proc7")]
    assert row.owners_count == 2
    alone, _ = poller_of(({CLIENT}, NO_ENDS))
    assert [ref.pid for ref in rows_of(alone)[0].owners] == [20]


def test_an_owner_found_after_the_open_row_fills_the_later_rows():
    accepted = SERVER._replace(pid=None)  # not yet handed to its process
    poller, _ = poller_of(
        ({accepted}, NO_ENDS),
        ({SERVER}, NO_ENDS),
        ({SERVER._replace(status="CLOSE_WAIT")}, NO_ENDS),
        (set(), NO_ENDS),
        closed=True,
        transitions=True,
        watches=False,
    )
    (opened,) = rows_of(poller)
    assert (opened.pid, opened.attribution) == (None, None)
    assert rows_of(poller) == []
    (state,) = rows_of(poller)
    assert (state.event, state.pid, state.pname, state.attribution) == (
        "state", 10, "proc10", "socket",
    )  # fmt: skip
    (closed,) = rows_of(poller)
    assert (closed.status, closed.pid, closed.command) == ("CLOSE_WAIT", 10, "command of 10")
    for row in (state, closed):  # every fact of the process, the parent's too
        assert (row.ppid, row.parent, row.args) == (1, "init", ("proc10", "--serve"))


def test_a_pid_filter_shows_the_open_row_once_the_owner_is_known():
    from histstat.filters import RowFilter

    accepted = SERVER._replace(pid=None)
    poller, _ = poller_of(
        ({accepted}, NO_ENDS),
        ({SERVER}, NO_ENDS),
        row_filter=RowFilter(pids=frozenset({10})),
    )
    assert rows_of(poller) == []
    (opened,) = rows_of(poller)
    assert (opened.event, opened.pid, opened.attribution) == ("open", 10, "socket")


def test_skip_existing_leaves_out_every_row_of_a_story_of_the_first_poll():
    ends = Ends([end_of(CLIENT, 2, time.time(), TcpCounters(1, 1, 0, 0))])
    poller, _ = poller_of(
        ({CLIENT}, NO_ENDS),
        ({CLIENT._replace(status="FIN_WAIT2", pid=None)}, NO_ENDS),
        ({CLIENT._replace(status="TIME_WAIT", pid=None)}, ends),
        closed=True,
        transitions=True,
        update=0.001,
        skip_existing=True,
    )
    assert rows_of(poller) == [] and rows_of(poller) == [] and rows_of(poller) == []

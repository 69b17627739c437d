"""Rows are written in the order found, each once its hashes are known."""

import datetime
import functools
import threading
import time
from concurrent.futures import Future

import pytest

from histstat.enrich import user_name
from histstat.filters import RowFilter
from histstat.hashing import Hashes
from histstat.output import writer as writer_module
from histstat.output.base import SinkBusy, SinkError
from histstat.output.format import format_plain_row, text_fields
from histstat.output.writer import CHUNK_ROWS, OrderedWriter
from histstat.pending import Fill, PendingRow
from histstat.poller import MAX_HASH_WAIT, MAX_NAME_WAIT, Poller, _with_hashes, make_row
from histstat.records import Connection, ProcessFacts
from histstat.resolve import ReverseResolver
from histstat.sources.base import NO_ENDS
from histstat.tracker import ConnectionTracker

SEEN = datetime.datetime(2026, 11, 26, 12, 0, 0, tzinfo=datetime.timezone.utc)


class ListSink:
    def __init__(self):
        self.lines = []
        self.flushes = 0

    def write(self, line):
        self.lines.append(line)

    def flush(self):
        self.flushes += 1


def plain_view(with_hashes):
    return functools.partial(format_plain_row, fields=text_fields(with_hashes))


def pending(port, hashes=None, queued=None):
    conn = Connection("tcp", "127.0.0.1", port, None, None, "LISTEN", 1)
    queued = time.monotonic() if queued is None else queued
    fills = () if hashes is None else (Fill(hashes, _with_hashes, MAX_HASH_WAIT),)
    return PendingRow(make_row(conn, ProcessFacts(name=f"p{port}"), SEEN), fills, queued)


def written_ports(sink):
    return [int(line.split("\t")[2]) for line in sink.lines]


def test_rows_wait_for_their_hashes_and_keep_their_order():
    slow, fast = Future(), Future()
    fast.set_result(Hashes("m" * 32, "s" * 64))
    sink = ListSink()
    writer = OrderedWriter([(plain_view(True), sink)])
    writer.add([pending(1, slow), pending(2, fast), pending(3)])
    writer.write_ready(time.monotonic())
    assert sink.lines == []
    assert writer.pending() == 3
    slow.set_result(Hashes("a" * 32, "b" * 64))
    writer.write_ready(time.monotonic())
    assert written_ports(sink) == [1, 2, 3]
    assert sink.lines[0].split("\t")[-3:-1] == ["a" * 32, "b" * 64]
    assert sink.lines[1].split("\t")[-3:-1] == ["m" * 32, "s" * 64]


def test_a_row_still_waiting_at_its_deadline_is_held_not_dropped():
    slow = Future()
    sink = ListSink()
    writer = OrderedWriter([(plain_view(True), sink)])
    writer.add([pending(1, slow)])
    writer.write_ready(time.monotonic() + 0.05)
    assert sink.lines == [] and writer.pending() == 1
    slow.set_result(Hashes())
    writer.write_ready(time.monotonic())
    assert written_ports(sink) == [1]


def test_a_row_whose_hashes_take_too_long_goes_out_unknown_in_order():
    stuck, fast = Future(), Future()
    fast.set_result(Hashes("m" * 32, "s" * 64))
    sink = ListSink()
    writer = OrderedWriter([(plain_view(True), sink)])
    long_ago = time.monotonic() - MAX_HASH_WAIT
    writer.add([pending(1, stuck, queued=long_ago), pending(2, fast), pending(3, Future())])
    writer.write_ready(time.monotonic())
    assert written_ports(sink) == [1, 2]
    assert sink.lines[0].split("\t")[-3:-1] == ["-", "-"]
    assert writer.pending() == 1  # row 3 still has its full wait ahead


def test_final_write_leaves_no_row_behind():
    sink = ListSink()
    writer = OrderedWriter([(plain_view(True), sink)])
    writer.add([pending(1, Future()), pending(2)])
    writer.write_ready(time.monotonic(), final=True)
    assert written_ports(sink) == [1, 2]
    assert writer.pending() == 0


def test_every_sink_gets_every_row_and_is_flushed():
    log, stdout = ListSink(), ListSink()
    writer = OrderedWriter([(plain_view(False), log), (plain_view(False), stdout)])
    writer.add([pending(1), pending(2)])
    writer.write_ready(time.monotonic())
    assert log.lines == stdout.lines and len(log.lines) == 2
    assert log.flushes == stdout.flushes == 1
    assert writer.written == 2


def test_each_sink_gets_its_own_view_of_the_row():
    log, terminal = ListSink(), ListSink()
    writer = OrderedWriter([(plain_view(False), log), (lambda row: f"port {row.lport}", terminal)])
    writer.add([pending(7)])
    writer.write_ready(time.monotonic())
    assert terminal.lines == ["port 7"]
    assert written_ports(log) == [7]


def test_limit_stops_writing_for_good():
    sink = ListSink()
    writer = OrderedWriter([(plain_view(False), sink)], limit=2)
    writer.add([pending(1), pending(2), pending(3)])
    writer.write_ready(time.monotonic())
    assert written_ports(sink) == [1, 2] and writer.done
    writer.add([pending(4)])
    writer.write_ready(time.monotonic())
    assert written_ports(sink) == [1, 2]


class StaticSource:
    """A Source that gives the snapshots it was made with, one per poll."""

    name = "static"

    def __init__(self, *snapshots):
        self._snapshots = list(snapshots)

    def snapshot(self, counters=False):
        return self._snapshots.pop(0)

    def watches_ends(self):
        return False

    def ends(self):
        return NO_ENDS

    def uid_of(self, conn):
        return None

    def close(self):
        pass


class CountingCache:
    def __init__(self):
        self.looked_up = []
        self.hashed = []
        self.started = {}
        self.retained = []

    def lookup(self, pid):
        self.looked_up.append(pid)
        return ProcessFacts(name=f"proc{pid}")

    def hashes(self, pid, facts):
        self.hashed.append(pid)
        return None

    def created(self, pid):
        return self.started.get(pid, 0.0)  # long ago, unless a test says otherwise

    def start_and_facts(self, pid, accept=None):
        created = self.created(pid)
        if accept is not None and not accept(created):
            return created, None
        return created, self.lookup(pid)

    def begin_poll(self):
        pass

    def retain(self, live):
        self.retained.append(live)


def test_filtered_out_sockets_cost_no_process_lookup():
    a = Connection("tcp", "127.0.0.1", 1, None, None, "LISTEN", 10)
    b = Connection("udp", "127.0.0.1", 2, None, None, None, 20)
    cache = CountingCache()
    poller = Poller(
        StaticSource(frozenset({a, b})),
        ConnectionTracker(),
        cache,
        RowFilter(protos=frozenset({"udp"}), names=("proc2*",)),
    )
    assert [p.row.lport for p in poller.poll()] == [2]
    assert cache.looked_up == [20]


def test_process_filter_drops_rows_after_the_lookup():
    a = Connection("tcp", "127.0.0.1", 1, None, None, "LISTEN", 10)
    cache = CountingCache()
    poller = Poller(
        StaticSource(frozenset({a})), ConnectionTracker(), cache, RowFilter(users=frozenset({"x"}))
    )
    assert poller.poll() == []
    assert cache.looked_up == [10]
    assert cache.hashed == []  # a filtered-out process costs no hashing


def test_poller_enriches_only_new_connections_and_prunes_the_cache():
    a = Connection("tcp", "127.0.0.1", 1, None, None, "LISTEN", 10)
    b = Connection("tcp", "127.0.0.1", 2, None, None, "LISTEN", 20)
    cache = CountingCache()
    poller = Poller(StaticSource(frozenset({a}), frozenset({a, b})), ConnectionTracker(), cache)
    first = poller.poll()
    second = poller.poll()
    assert [p.row.lport for p in first] == [1]
    assert [(p.row.lport, p.row.pname) for p in second] == [(2, "proc20")]
    assert cache.looked_up == [10, 20]
    assert cache.retained == [{10}, {10, 20}]
    assert second[0].row.timestamp.tzinfo is not None


SERVER = Connection("tcp", "127.0.0.1", 8000, None, None, "LISTEN", 10)
ACCEPTED = Connection("tcp", "127.0.0.1", 8000, "127.0.0.1", 50000, "ESTABLISHED", 10)
CLIENT = Connection("tcp", "127.0.0.1", 50000, "127.0.0.1", 8000, "ESTABLISHED", 20)
ORPHAN = CLIENT._replace(status="TIME_WAIT", pid=None)


def rows_of(poller):
    return [pending.resolved() for pending in poller.poll()]


def test_a_gone_connection_gets_a_close_row_repeating_its_open_row():
    poller = Poller(
        StaticSource(frozenset({SERVER, CLIENT}), frozenset({SERVER}), frozenset({SERVER})),
        ConnectionTracker(),
        CountingCache(),
        closed=True,
    )
    opened = {row.lport: row for row in rows_of(poller)}
    (closed,) = rows_of(poller)
    assert closed.event == "close" and opened[50000].event == "open"
    assert (closed.pname, closed.pid, closed.command) == (opened[50000].pname, 20, None)
    assert closed.duration_from_start is True and closed.duration >= 0
    assert closed.timestamp >= opened[50000].timestamp
    assert rows_of(poller) == []


def test_open_rows_say_whether_the_connection_was_there_at_the_first_poll():
    poller = Poller(
        StaticSource(frozenset({SERVER}), frozenset({SERVER, CLIENT})),
        ConnectionTracker(),
        CountingCache(),
    )
    (listener,) = rows_of(poller)
    (client,) = rows_of(poller)
    assert (listener.duration_from_start, client.duration_from_start) == (True, False)


def test_rows_carry_the_process_parent_arguments_and_start():
    started = datetime.datetime(2026, 11, 26, 11, 0, tzinfo=datetime.timezone.utc)
    facts = ProcessFacts(name="curl", command="curl -s x", ppid=7, parent="bash",
                         args=("curl", "-s", "x"), started=started)  # fmt: skip
    row = make_row(CLIENT, facts, SEEN)
    assert (row.ppid, row.parent, row.args, row.started) == (7, "bash", facts.args, started)


def test_without_closed_nothing_is_written_when_a_connection_goes():
    poller = Poller(
        StaticSource(frozenset({CLIENT}), frozenset()), ConnectionTracker(), CountingCache()
    )
    rows_of(poller)
    assert rows_of(poller) == []


def test_a_later_state_is_no_new_open_row_and_with_transitions_stays_attributed():
    cache = CountingCache()
    snapshots = (frozenset({SERVER, ACCEPTED, CLIENT}), frozenset({SERVER, ORPHAN}))
    quiet = Poller(StaticSource(*snapshots), ConnectionTracker(), CountingCache())
    rows_of(quiet)
    assert rows_of(quiet) == []  # TIME_WAIT is the client's story going on, not a connection
    poller = Poller(StaticSource(*snapshots), ConnectionTracker(), cache, transitions=True)
    first = {row.lport: row for row in rows_of(poller)}
    assert first[50000].attribution == "socket"
    (orphan,) = rows_of(poller)
    assert (orphan.event, orphan.status, orphan.pid, orphan.pname) == (
        "state", "TIME_WAIT", 20, "proc20",
    )  # fmt: skip
    assert orphan.attribution == "earlier"


def test_attribution_decides_a_pid_filter_and_reads_facts_only_then():
    cache = CountingCache()
    poller = Poller(
        StaticSource(frozenset({CLIENT}), frozenset({ORPHAN})),
        ConnectionTracker(),
        cache,
        RowFilter(statuses=frozenset({"TIME_WAIT"}), pids=frozenset({20})),
    )
    assert rows_of(poller) == []  # the ESTABLISHED moment is filtered out...
    assert cache.looked_up == []  # ...at no process cost
    (orphan,) = rows_of(poller)  # the story is attributed, so --pid 20 keeps its TIME_WAIT
    assert (orphan.event, orphan.status) == ("open", "TIME_WAIT")
    assert (orphan.pid, orphan.pname, orphan.attribution) == (20, "proc20", "earlier")


def test_a_reused_pid_is_never_credited_with_an_earlier_owner():
    cache = CountingCache()
    poller = Poller(
        StaticSource(frozenset({CLIENT}), frozenset({ORPHAN})),
        ConnectionTracker(),
        cache,
        RowFilter(statuses=frozenset({"TIME_WAIT"})),  # the owner's row is filtered out
    )
    assert rows_of(poller) == []
    cache.started[20] = time.time() + 60  # pid 20 is now a process started after
    (orphan,) = rows_of(poller)
    assert (orphan.pid, orphan.attribution) == (None, None)
    assert cache.looked_up == []


def test_a_long_connection_still_attributes_its_remainder():
    clock = [1000.0]
    poller = Poller(
        StaticSource(frozenset({CLIENT}), frozenset({CLIENT}), frozenset({ORPHAN})),
        ConnectionTracker(),
        CountingCache(),
        closed=True,
        transitions=True,
    )
    real_monotonic = time.monotonic
    try:
        time.monotonic = lambda: clock[0]
        rows_of(poller)
        clock[0] += 3600  # an hour later, still open
        assert rows_of(poller) == []
        clock[0] += 1
        closed, orphan = rows_of(poller)
    finally:
        time.monotonic = real_monotonic
    assert (closed.event, closed.status, closed.pid, closed.attribution) == (
        "close", "ESTABLISHED", 20, "socket",
    )  # fmt: skip
    assert closed.duration == 3601.0
    assert (orphan.event, orphan.status, orphan.pid, orphan.attribution) == (
        "state", "TIME_WAIT", 20, "earlier",
    )  # fmt: skip


def test_direction_of_both_ends_of_a_local_connection():
    poller = Poller(
        StaticSource(frozenset({SERVER, ACCEPTED, CLIENT})), ConnectionTracker(), CountingCache()
    )
    direction = {row.lport: row.direction for row in rows_of(poller) if row.raddr}
    assert direction == {8000: "in", 50000: "out"}


def test_a_hanging_resolver_never_delays_polling_and_a_row_waits_half_a_second():
    release = threading.Event()

    def hanging_lookup(address):
        release.wait(30)
        return "late.example"

    resolver = ReverseResolver(lookup=hanging_lookup)
    try:
        poller = Poller(
            StaticSource(frozenset({CLIENT})), ConnectionTracker(), CountingCache(),
            resolver=resolver,
        )  # fmt: skip
        started = time.monotonic()
        pending_rows = poller.poll()
        assert time.monotonic() - started < MAX_NAME_WAIT / 2  # the poll did not wait
        sink = ListSink()
        writer = OrderedWriter([(lambda row: row, sink)])
        writer.add(pending_rows)
        writer.write_ready(time.monotonic() + 5)
        waited = time.monotonic() - started
        assert MAX_NAME_WAIT <= waited < MAX_NAME_WAIT + 1.0
        (row,) = sink.lines
        assert (row.raddr, row.rhost) == ("127.0.0.1", None)
    finally:
        release.set()
        resolver.close()


def test_a_known_name_fills_rhost():
    resolver = ReverseResolver(lookup=lambda address: f"host-{address}")
    try:
        poller = Poller(
            StaticSource(frozenset({CLIENT})), ConnectionTracker(), CountingCache(),
            resolver=resolver,
        )  # fmt: skip
        sink = ListSink()
        writer = OrderedWriter([(lambda row: row, sink)])
        writer.add(poller.poll())
        writer.write_ready(time.monotonic() + 5)
        assert [row.rhost for row in sink.lines] == ["host-127.0.0.1"]
    finally:
        resolver.close()


class UidSource(StaticSource):
    def uid_of(self, conn):
        return 0


def test_socket_uid_names_the_user_when_the_process_is_unknown():
    unowned = CLIENT._replace(pid=None, lport=50001)
    orphan = unowned._replace(status="TIME_WAIT", lport=50002)
    poller = Poller(UidSource(frozenset({unowned, orphan})), ConnectionTracker(), CountingCache())
    users = {row.lport: row.user for row in rows_of(poller)}
    # TIME_WAIT sockets carry uid 0 whoever owned them: never a user from that.
    assert users == {50001: user_name(0), 50002: None}


def test_a_new_connection_on_the_endpoint_of_one_gone_is_a_new_story():
    later = CLIENT._replace(pid=30)
    poller = Poller(
        StaticSource(frozenset({CLIENT}), frozenset(), frozenset({later})),
        ConnectionTracker(),
        CountingCache(),
        closed=True,
    )
    rows_of(poller)
    (closed,) = rows_of(poller)  # reset: gone entirely
    assert (closed.event, closed.pid) == ("close", 20)
    (opened,) = rows_of(poller)
    assert (opened.event, opened.pid, opened.attribution) == ("open", 30, "socket")


# --------------------------------------------------------------------------- chunks, busy


class EventSink:
    """A sink that records what happens to it in a log shared with other sinks."""

    def __init__(self, name, events, busy=False):
        self.name = name
        self.events = events
        self.busy = busy
        self.unflushed = []
        self.lines = []  # saved: flushed

    def write(self, line):
        self.unflushed.append(line)
        self.events.append((self.name, "write", line))

    def flush(self):
        if self.busy:
            self.unflushed.clear()  # SinkBusy: what was written since the last flush is gone
            raise SinkBusy(f"sink {self.name!r}", "busy")
        self.lines += self.unflushed
        self.unflushed.clear()
        self.events.append((self.name, "flush", None))


def test_rows_go_through_the_sinks_in_bounded_chunks_each_saved_before_the_next_sink():
    events = []
    log, database, stdout = (EventSink(name, events) for name in ("log", "db", "stdout"))
    view = plain_view(False)
    writer = OrderedWriter([(view, log), (view, database), (view, stdout)])
    count = 2 * CHUNK_ROWS + 10
    writer.add([pending(port) for port in range(1, count + 1)])
    writer.write_ready(time.monotonic())
    assert log.lines == database.lines == stdout.lines and len(stdout.lines) == count
    saved = {"log": set(), "db": set()}
    unflushed = {"log": [], "db": [], "stdout": []}
    for name, what, line in events:
        if what == "write":
            if name == "db":
                assert line in saved["log"]  # the log had it first
            if name == "stdout":
                assert line in saved["db"]  # shown only once committed
            unflushed[name].append(line)
            assert len(unflushed[name]) <= CHUNK_ROWS  # never more at once
        else:
            saved.setdefault(name, set()).update(unflushed[name])
            unflushed[name] = []
    assert writer.written == count and writer.pending() == 0


def test_a_busy_sink_holds_rows_for_the_sinks_after_it_while_those_before_go_on():
    events, notices = [], []
    log, database, stdout = (EventSink(name, events) for name in ("log", "db", "stdout"))
    view = plain_view(False)
    writer = OrderedWriter([(view, log), (view, database), (view, stdout)], notice=notices.append)
    writer.add([pending(1)])
    writer.write_ready(time.monotonic())
    database.busy = True
    for port in (2, 3):
        writer.add([pending(port)])
        writer.write_ready(time.monotonic())
    assert written_ports(log) == [1, 2, 3]
    assert written_ports(database) == written_ports(stdout) == [1]
    assert writer.pending() == 2
    assert len(notices) == 1 and "sink 'db' is busy" in notices[0]
    database.busy = False
    writer.add([pending(4)])
    writer.write_ready(time.monotonic())
    assert written_ports(log) == written_ports(database) == written_ports(stdout) == [1, 2, 3, 4]
    assert len(notices) == 2 and "free again" in notices[1] and "writing the 3 rows" in notices[1]
    assert writer.pending() == 0


def test_rows_held_beyond_the_bound_stop_histstat_with_the_reason(monkeypatch):
    monkeypatch.setattr(writer_module, "MAX_HELD_ROWS", 3)
    events = []
    log, database = EventSink("log", events), EventSink("db", events, busy=True)
    writer = OrderedWriter([(plain_view(False), log), (plain_view(False), database)])
    writer.add([pending(port) for port in (1, 2, 3)])
    writer.write_ready(time.monotonic())  # three rows wait: within the bound
    writer.add([pending(4)])
    with pytest.raises(SinkError) as caught:
        writer.write_ready(time.monotonic())
    message = str(caught.value)
    assert "sink 'db' has been busy for" in message and "4 rows wait for it" in message
    assert "more than histstat holds (3 rows" in message
    assert written_ports(log) == [1, 2, 3, 4]  # the log has every row all the same


def test_a_sink_busy_to_the_end_names_the_rows_it_never_got():
    events = []
    log, database = EventSink("log", events), EventSink("db", events, busy=True)
    writer = OrderedWriter([(plain_view(False), log), (plain_view(False), database)])
    writer.add([pending(1), pending(2)])
    with pytest.raises(SinkError, match="sink 'db' is still busy: 2 rows found were not saved"):
        writer.write_the_rest(time.monotonic(), time.monotonic() + 0.05)
    assert written_ports(log) == [1, 2]


def test_an_abandoned_sink_is_spared_the_formatting():
    formatted = []

    class Abandoned(ListSink):
        abandoned = True

    def view(row):
        formatted.append(row.lport)
        return str(row.lport)

    log, stdout = ListSink(), Abandoned()
    writer = OrderedWriter([(plain_view(False), log), (view, stdout)])
    writer.add([pending(1), pending(2)])
    writer.write_ready(time.monotonic())
    assert written_ports(log) == [1, 2] and formatted == [] and stdout.lines == []
    assert writer.written == 2


def test_skip_existing_leaves_out_the_first_poll_and_its_close_rows():
    later = CLIENT._replace(lport=50001, pid=30)
    cache = CountingCache()
    poller = Poller(
        StaticSource(frozenset({SERVER, CLIENT}), frozenset({SERVER, later}), frozenset({SERVER})),
        ConnectionTracker(),
        cache,
        closed=True,
        skip_existing=True,
    )
    assert rows_of(poller) == []
    (opened,) = rows_of(poller)  # CLIENT went: no close row for it
    assert (opened.event, opened.lport, opened.pid) == ("open", 50001, 30)
    (closed,) = rows_of(poller)  # a connection shown gets its close row as ever
    assert (closed.event, closed.lport, closed.duration_from_start) == ("close", 50001, False)


def test_a_skipped_listener_still_makes_later_accepted_connections_in():
    poller = Poller(
        StaticSource(frozenset({SERVER}), frozenset({SERVER, ACCEPTED, CLIENT})),
        ConnectionTracker(),
        CountingCache(),
        skip_existing=True,
    )
    assert rows_of(poller) == []
    direction = {row.lport: row.direction for row in rows_of(poller)}
    assert direction == {8000: "in", 50000: "out"}


def test_skipped_connections_later_states_stay_out_until_their_endpoint_is_gone():
    """A CLOSE_WAIT or the TIME_WAIT a skipped connection leaves is the same story:
    left out while the table holds its endpoint; a connection there after it is new."""
    poller = Poller(
        StaticSource(
            frozenset({CLIENT, SERVER}),
            frozenset({ORPHAN, SERVER}),  # CLIENT's TIME_WAIT remainder
            frozenset({SERVER}),
            frozenset({SERVER, CLIENT}),  # the same endpoint, once the old one left
        ),
        ConnectionTracker(),
        CountingCache(),
        closed=True,
        skip_existing=True,
    )
    assert ORPHAN[:5] == CLIENT[:5]
    assert rows_of(poller) == []
    assert rows_of(poller) == []
    assert rows_of(poller) == []
    (opened,) = rows_of(poller)
    assert (opened.event, opened.lport, opened.status) == ("open", CLIENT.lport, "ESTABLISHED")


class StalledStdout(EventSink):
    """A stdout whose reader does not read: it takes the first ``room`` rows (the last
    of them kept half written) and says it is busy."""

    def __init__(self, events, room):
        super().__init__("stdout", events)
        self.room = room

    def flush(self):
        if self.room is None:
            return super().flush()
        taken = self.unflushed[: self.room]
        self.room = 0
        self.unflushed.clear()
        self.lines += taken
        raise SinkBusy("stdout", "not being read", taken=len(taken), stdout=True)


def test_a_stalled_stdout_keeps_what_it_took_and_the_log_goes_on():
    events, notices = [], []
    log, stdout = EventSink("log", events), StalledStdout(events, room=2)
    view = plain_view(False)
    writer = OrderedWriter([(view, log), (view, stdout)], notice=notices.append)
    writer.add([pending(port) for port in (1, 2, 3, 4)])
    writer.write_ready(time.monotonic())
    writer.add([pending(5)])
    writer.write_ready(time.monotonic())
    assert written_ports(log) == [1, 2, 3, 4, 5]
    assert written_ports(stdout) == [1, 2]  # taken once, never written again
    (started,) = notices
    assert "stdout is not being read" in started and "the log or database gets every row" in started
    stdout.room = None  # the reader reads again
    writer.write_ready(time.monotonic())
    assert written_ports(stdout) == [1, 2, 3, 4, 5]
    assert "stdout is read again" in notices[1] and "writing the 3 rows" in notices[1]


def test_a_stdout_never_read_skips_rows_past_the_bound_and_the_capture_goes_on(monkeypatch):
    monkeypatch.setattr(writer_module, "MAX_HELD_ROWS", 3)
    events, notices = [], []
    log, stdout = EventSink("log", events), StalledStdout(events, room=0)
    view = plain_view(False)
    writer = OrderedWriter([(view, log), (view, stdout)], notice=notices.append)
    for port in range(1, 9):
        writer.add([pending(port)])
        writer.write_ready(time.monotonic())  # never raises: stdout alone loses rows
    assert written_ports(log) == list(range(1, 9))
    skipped = [line for line in notices if "skipped on stdout" in line]
    assert skipped and "the log and the database have them" in skipped[0]
    assert writer.pending() <= 3
    stdout.room = None
    writer.add([pending(9)])
    writer.write_the_rest(time.monotonic(), time.monotonic())
    assert written_ports(stdout)[-1] == 9  # it goes on with the rows found later
    assert "skipped on it meanwhile" in notices[-1]


def test_stdout_alone_never_read_skips_rows_past_the_bound_too(monkeypatch):
    monkeypatch.setattr(writer_module, "MAX_HELD_ROWS", 3)
    notices = []
    stdout = StalledStdout([], room=0)
    writer = OrderedWriter([(plain_view(False), stdout)], notice=notices.append)
    for port in range(1, 9):
        writer.add([pending(port)])
        writer.write_ready(time.monotonic())
    assert writer.pending() <= 3
    (skipped,) = [line for line in notices if "skipped on stdout" in line]
    assert "the log" not in skipped

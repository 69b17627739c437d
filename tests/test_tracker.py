"""The tracker reports what is new since the previous poll, by set difference."""

from histstat.attribution import EndpointMemory, ListenerMemory
from histstat.records import Connection
from histstat.tracker import ConnectionTracker

LISTENER = Connection("tcp", "127.0.0.1", 8000, None, None, "LISTEN", 10)
ESTABLISHED = Connection("tcp", "127.0.0.1", 8000, "127.0.0.1", 50000, "ESTABLISHED", 10)
UDP = Connection("udp", "0.0.0.0", 53, None, None, None, None)


def test_first_poll_reports_every_current_connection():
    tracker = ConnectionTracker()
    assert set(tracker.new_since(frozenset({LISTENER, ESTABLISHED, UDP}))) == {
        LISTENER,
        ESTABLISHED,
        UDP,
    }


def test_unchanged_connections_are_not_reported_again():
    tracker = ConnectionTracker()
    tracker.new_since(frozenset({LISTENER, ESTABLISHED}))
    assert tracker.new_since(frozenset({LISTENER, ESTABLISHED})) == []


def test_only_the_new_connection_is_reported():
    tracker = ConnectionTracker()
    tracker.new_since(frozenset({LISTENER}))
    assert tracker.new_since(frozenset({LISTENER, ESTABLISHED})) == [ESTABLISHED]


def test_status_change_is_a_new_row():
    tracker = ConnectionTracker()
    tracker.new_since(frozenset({LISTENER, ESTABLISHED}))
    time_wait = ESTABLISHED._replace(status="TIME_WAIT", pid=None)
    assert tracker.new_since(frozenset({LISTENER, time_wait})) == [time_wait]


def test_new_pid_on_same_endpoints_is_a_new_row():
    tracker = ConnectionTracker()
    tracker.new_since(frozenset({LISTENER}))
    reused = LISTENER._replace(pid=11)
    assert tracker.new_since(frozenset({reused})) == [reused]


def test_connection_that_left_and_came_back_is_new_again():
    tracker = ConnectionTracker()
    tracker.new_since(frozenset({LISTENER, ESTABLISHED}))
    tracker.new_since(frozenset({LISTENER}))
    assert tracker.new_since(frozenset({LISTENER, ESTABLISHED})) == [ESTABLISHED]


def test_new_rows_come_in_a_stable_order_despite_unknown_fields():
    conns = {LISTENER, ESTABLISHED, UDP, UDP._replace(lport=5353, pid=3)}
    first = ConnectionTracker().new_since(frozenset(conns))
    second = ConnectionTracker().new_since(frozenset(reversed(list(conns))))
    assert first == second
    assert len(first) == 4


def test_live_pids_are_the_socket_owners_of_the_latest_poll():
    tracker = ConnectionTracker()
    tracker.new_since(frozenset({LISTENER, UDP}))
    assert tracker.live_pids() == {10}
    tracker.new_since(frozenset({UDP._replace(pid=7)}))
    assert tracker.live_pids() == {7}


def test_changes_report_what_went_away_with_its_lifetime():
    tracker = ConnectionTracker()
    tracker.changes(frozenset({LISTENER}), now=100.0)
    tracker.changes(frozenset({LISTENER, ESTABLISHED}), now=101.0)
    tracker.changes(frozenset({LISTENER, ESTABLISHED}), now=102.0)
    new, gone = tracker.changes(frozenset({LISTENER}), now=103.0)
    assert (new, gone) == ([], [ESTABLISHED])
    # First seen at 101, last seen at 102 (the poll before the one that missed it).
    assert tracker.lifetime(ESTABLISHED) == (1.0, False)


def test_connection_there_at_start_has_a_lower_bound_lifetime():
    tracker = ConnectionTracker()
    tracker.changes(frozenset({LISTENER, ESTABLISHED}), now=10.0)
    tracker.changes(frozenset({LISTENER, ESTABLISHED}), now=15.0)
    _, gone = tracker.changes(frozenset({LISTENER}), now=20.0)
    assert gone == [ESTABLISHED]
    assert tracker.lifetime(ESTABLISHED) == (5.0, True)


ACCEPTED = Connection("tcp", "127.0.0.1", 8000, "127.0.0.1", 50000, "ESTABLISHED", 10)
OUTGOING = Connection("tcp", "127.0.0.1", 50000, "127.0.0.1", 8000, "ESTABLISHED", 11)


def test_direction_in_out_listen_and_none_for_udp():
    listeners = ListenerMemory()
    listeners.opened(LISTENER)
    assert listeners.direction(LISTENER, 0.0) == "listen"
    assert listeners.direction(ACCEPTED, 0.0) == "in"
    assert listeners.direction(OUTGOING, 0.0) == "out"
    assert listeners.direction(UDP, 0.0) is None


def test_wildcard_and_dual_stack_listeners_make_connections_in():
    listeners = ListenerMemory()
    listeners.opened(Connection("tcp6", "::", 8000, None, None, "LISTEN", 10))
    mapped = Connection("tcp6", "::ffff:127.0.0.1", 8000, "::ffff:127.0.0.1", 5, "ESTABLISHED", 10)
    assert listeners.direction(mapped, 0.0) == "in"
    assert listeners.direction(ACCEPTED, 0.0) == "in"
    assert listeners.direction(ACCEPTED._replace(lport=8001), 0.0) == "out"


def test_a_listener_closed_recently_still_counts_then_is_forgotten():
    listeners = ListenerMemory(memory=30.0)
    listeners.opened(LISTENER)
    listeners.closed(LISTENER, now=100.0)
    assert listeners.direction(ACCEPTED, 129.0) == "in"
    assert listeners.direction(ACCEPTED, 131.0) == "out"
    listeners.forget_expired(131.0)
    assert len(listeners) == 0


def test_endpoint_memory_attributes_then_forgets_an_orphan():
    memory = EndpointMemory(memory=60.0)
    memory.remember(OUTGOING, "owner", now=0.0)
    orphan = OUTGOING._replace(status="TIME_WAIT", pid=None)
    memory.touch(OUTGOING, now=50.0)  # last seen owned at 50
    memory.forget_expired(100.0)
    assert memory.owner_of(orphan) == "owner"
    memory.forget_expired(111.0)
    assert memory.owner_of(orphan) is None


def test_endpoint_memory_stays_bounded_under_a_stream_of_connections():
    memory = EndpointMemory(memory=1e9, limit=1000)
    for port in range(50_000):
        conn = OUTGOING._replace(lport=port % 65536, rport=port)
        memory.remember(conn, port, now=port)
        memory.touch(conn, now=port)  # each closes at once
    assert len(memory) == 1000
    assert memory.owner_of(OUTGOING._replace(lport=49_999, rport=49_999)) == 49_999
    assert memory.owner_of(OUTGOING._replace(lport=0, rport=0)) is None


def test_a_long_lived_connection_keeps_its_owner_until_it_closes():
    memory = EndpointMemory(memory=180.0)
    memory.remember(OUTGOING, "owner", now=0.0)
    memory.forget_expired(10_000.0)  # hours later, still open
    assert memory.owner_of(OUTGOING) == "owner"
    memory.touch(OUTGOING, now=10_000.0)  # closes now
    memory.forget_expired(10_170.0)
    assert memory.owner_of(OUTGOING) == "owner"
    memory.forget_expired(10_181.0)
    assert memory.owner_of(OUTGOING) is None


def test_an_orphan_that_went_away_is_not_attributed_again():
    memory = EndpointMemory()
    memory.remember(OUTGOING, "owner", now=0.0)
    memory.touch(OUTGOING, now=1.0)
    memory.forget(OUTGOING)
    assert memory.owner_of(OUTGOING) is None


def test_a_port_counts_as_listening_until_its_last_listener_closes():
    listeners = ListenerMemory(memory=30.0)
    worker_a, worker_b = LISTENER, LISTENER._replace(pid=11)
    listeners.opened(worker_a)
    listeners.opened(worker_b)
    listeners.closed(worker_a, now=0.0)
    listeners.forget_expired(1000.0)
    assert listeners.direction(ACCEPTED, 1000.0) == "in"  # worker_b still listens
    listeners.closed(worker_b, now=1000.0)
    assert listeners.direction(ACCEPTED, 1029.0) == "in"
    assert listeners.direction(ACCEPTED, 1031.0) == "out"

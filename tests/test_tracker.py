"""The tracker reports what is new since the previous poll, by set difference."""

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

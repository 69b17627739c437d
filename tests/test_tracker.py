"""The tracker: one story per socket from snapshots and end events; the listeners."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from histstat.attribution import ListenerMemory
from histstat.records import MAX_OWNERS, Connection, TcpCounters
from histstat.sources.base import End, Ends
from histstat.tracker import (
    ConnectionTracker,
    Story,
    connect_identity,
    identity_key,
    payload_bytes,
)

LISTENER = Connection("tcp", "127.0.0.1", 8000, None, None, "LISTEN", 10)
ESTABLISHED = Connection("tcp", "127.0.0.1", 8000, "127.0.0.1", 50000, "ESTABLISHED", 10)
UDP = Connection("udp", "0.0.0.0", 53, None, None, None, None)


def kinds(poll, *wanted):
    """(kind, status) of a poll's changes, optionally only of the ``wanted`` kinds."""
    return [(c.kind, c.conn.status) for c in poll.changes if not wanted or c.kind in wanted]


def test_first_poll_opens_a_story_per_socket():
    tracker = ConnectionTracker()
    poll = tracker.update(frozenset({LISTENER, ESTABLISHED, UDP}), now=0.0)
    assert {c.conn for c in poll.changes} == {LISTENER, ESTABLISHED, UDP}
    assert {c.kind for c in poll.changes} == {"open"}
    assert all(c.story.from_start for c in poll.changes)


def test_unchanged_connections_change_nothing():
    tracker = ConnectionTracker()
    tracker.update(frozenset({LISTENER, ESTABLISHED}), now=0.0)
    assert tracker.update(frozenset({LISTENER, ESTABLISHED}), now=1.0).changes == []


def test_a_change_of_state_is_the_same_story_not_a_new_connection():
    tracker = ConnectionTracker()
    (opened,) = tracker.update(frozenset({ESTABLISHED}), now=0.0).changes
    closing = ESTABLISHED._replace(status="FIN_WAIT2", pid=None)
    (change,) = tracker.update(frozenset({closing}), now=1.0).changes
    assert (change.kind, change.story, change.conn) == ("state", opened.story, closing)
    assert not change.story.ended


def test_an_owner_lost_by_the_descriptor_scan_never_ends_the_socket():
    tracker = ConnectionTracker()
    tracker.update(frozenset({ESTABLISHED}), now=0.0)
    ownerless = ESTABLISHED._replace(pid=None)
    assert kinds(tracker.update(frozenset({ownerless}), now=1.0)) == [("owner", "ESTABLISHED")]
    assert kinds(tracker.update(frozenset({ESTABLISHED}), now=2.0)) == [("owner", "ESTABLISHED")]


def test_without_end_events_time_wait_is_the_end_and_its_remainder_the_same_story():
    tracker = ConnectionTracker()
    tracker.update(frozenset({ESTABLISHED}), now=0.0)
    fin_wait2 = ESTABLISHED._replace(status="FIN_WAIT2", pid=None)
    time_wait = fin_wait2._replace(status="TIME_WAIT")
    assert kinds(tracker.update(frozenset({fin_wait2}), now=1.0)) == [("state", "FIN_WAIT2")]
    poll = tracker.update(frozenset({time_wait}), now=2.0)
    # The end first (its last state FIN_WAIT2), then the remainder's state.
    assert kinds(poll) == [("close", "FIN_WAIT2"), ("state", "TIME_WAIT")]
    story = poll.changes[0].story
    assert (story.last_status, story.duration, story.exact_end) == ("FIN_WAIT2", 2.0, False)
    assert tracker.update(frozenset({time_wait}), now=3.0).changes == []
    assert tracker.update(frozenset(), now=4.0).changes == []  # its remainder's end: nothing


def test_a_socket_gone_from_the_table_ends_once_at_that_poll():
    tracker = ConnectionTracker()
    tracker.update(frozenset({LISTENER, ESTABLISHED}), now=10.0)
    tracker.update(frozenset({LISTENER, ESTABLISHED}), now=11.0)
    poll = tracker.update(frozenset({LISTENER}), now=12.0)
    assert kinds(poll) == [("close", "ESTABLISHED")]
    assert poll.changes[0].story.duration == 2.0
    assert tracker.update(frozenset({LISTENER}), now=13.0).changes == []


def test_a_new_connection_on_an_ended_5_tuple_is_a_new_story():
    tracker = ConnectionTracker()
    tracker.update(frozenset({ESTABLISHED}), now=0.0)
    tracker.update(frozenset(), now=1.0)
    (again,) = tracker.update(frozenset({ESTABLISHED}), now=2.0).changes
    assert again.kind == "open" and not again.story.from_start


def test_cookie_identifies_the_socket_before_the_5_tuple():
    tracker = ConnectionTracker()
    first = ESTABLISHED._replace(cookie=7)
    (opened,) = tracker.update(frozenset({first}), now=0.0).changes
    # The same 5-tuple with another cookie, in a state only a new connection is in.
    other = first._replace(cookie=8, status="SYN_SENT")
    poll = tracker.update(frozenset({other}), now=1.0)
    assert kinds(poll) == [("open", "SYN_SENT"), ("close", "ESTABLISHED")]
    assert poll.changes[1].story is opened.story


def test_an_accepted_socket_whose_cookie_appears_later_stays_one_story():
    tracker = ConnectionTracker()
    tracker.update(frozenset({ESTABLISHED._replace(cookie=0)}), now=0.0)
    poll = tracker.update(frozenset({ESTABLISHED._replace(cookie=42)}), now=1.0)
    assert poll.changes == []
    end = End("tcp", "127.0.0.1", 8000, "127.0.0.1", 50000, 42, 100.5, None)
    poll = tracker.update(frozenset(), now=2.0, ends=Ends([end]), watches_ends=True, wall=101.0)
    assert kinds(poll) == [("close", "ESTABLISHED")]
    assert poll.changes[0].story.end_time == 1.5  # the event's time, not the poll's


def test_a_request_socket_replaced_by_its_accepted_socket_stays_one_story():
    """A dump can list a listener's request socket (SYN_RECV, its own cookie) before the
    handshake's last ACK; the full socket that replaces it has another cookie, which
    its end event carries."""
    tracker = ConnectionTracker()
    request = ESTABLISHED._replace(status="SYN_RECV", pid=None, cookie=7)
    (opened,) = tracker.update(frozenset({request}), now=0.0, watches_ends=True).changes
    accepted = ESTABLISHED._replace(cookie=8)
    poll = tracker.update(frozenset({accepted}), now=1.0, watches_ends=True, wall=101.0)
    assert kinds(poll) == [("state", "ESTABLISHED")]
    assert poll.changes[0].story is opened.story
    end = End("tcp", "127.0.0.1", 8000, "127.0.0.1", 50000, 8, 101.5, None)
    poll = tracker.update(frozenset(), now=2.0, ends=Ends([end]), watches_ends=True, wall=102.0)
    assert kinds(poll) == [("close", "ESTABLISHED")]
    assert poll.changes[0].story is opened.story and opened.story.exact_end


def test_an_end_event_ends_the_story_exactly_and_its_remainder_is_absorbed():
    tracker = ConnectionTracker()
    live = ESTABLISHED._replace(cookie=5)
    tracker.update(frozenset({live}), now=0.0, watches_ends=True, wall=100.0)
    counters = TcpCounters(5002, 7000, 5000, 0)
    end = End("tcp", "127.0.0.1", 8000, "127.0.0.1", 50000, 5, 100.8, counters)
    # The remainder carries another cookie than the end event: a dump never saw...
    remainder = live._replace(status="FIN_WAIT2", pid=None, cookie=99)
    poll = tracker.update(
        frozenset({remainder}), now=1.0, ends=Ends([end]), watches_ends=True, wall=101.0
    )
    assert kinds(poll) == [("state", "FIN_WAIT2"), ("close", "FIN_WAIT2")]
    story = poll.changes[-1].story
    assert (story.exact_end, story.end_wall, story.end_counters) == (True, 100.8, counters)
    time_wait = remainder._replace(status="TIME_WAIT", cookie=100)
    poll = tracker.update(frozenset({time_wait}), now=2.0, watches_ends=True, wall=102.0)
    assert kinds(poll) == [("state", "TIME_WAIT")]
    assert poll.changes[0].story is story and story.ended
    assert tracker.update(frozenset(), now=3.0, watches_ends=True, wall=103.0).changes == []


def test_a_time_wait_seen_with_its_end_event_follows_the_close_row():
    tracker = ConnectionTracker()
    live = ESTABLISHED._replace(cookie=5)
    tracker.update(frozenset({live}), now=0.0, watches_ends=True, wall=100.0)
    end = End("tcp", "127.0.0.1", 8000, "127.0.0.1", 50000, 5, 100.5, None)
    time_wait = live._replace(status="TIME_WAIT", pid=None)
    poll = tracker.update(
        frozenset({time_wait}), now=1.0, ends=Ends([end]), watches_ends=True, wall=101.0
    )
    # What the end leaves comes after the end, although the poll saw it first.
    assert kinds(poll) == [("close", "ESTABLISHED"), ("state", "TIME_WAIT")]


@pytest.mark.parametrize(
    ("left", "arrived", "expected"),
    [
        # The passive side: freed at its last ACK, after the peer's FIN; nothing left.
        (set(), 100.5, (7000, 5000)),
        # The active closer: freed at FIN_WAIT2, before the peer's FIN; its remainder.
        ({"FIN_WAIT2"}, 100.5, (7000, 5001)),
        # An event that came after the poll's dump: the table cannot tell which side.
        (set(), 101.5, (7000, 5001)),
    ],
)
def test_an_end_that_left_nothing_in_the_table_counted_the_peers_fin(left, arrived, expected):
    tracker = ConnectionTracker()
    live = ESTABLISHED._replace(cookie=5)
    tracker.update(frozenset({live}), now=0.0, watches_ends=True, wall=100.0)
    counters = TcpCounters(7001, 5001, 7000, 0)
    end = End("tcp", "127.0.0.1", 8000, "127.0.0.1", 50000, 5, arrived, counters)
    snapshot = frozenset(live._replace(status=state, pid=None) for state in left)
    poll = tracker.update(snapshot, now=1.0, ends=Ends([end]), watches_ends=True, wall=101.0)
    (story,) = {change.story for change in poll.changes}
    assert payload_bytes(story, story.end_counters, opened_here=False) == expected


def test_the_ends_of_one_poll_come_in_the_order_the_kernel_sent_them():
    tracker = ConnectionTracker()
    first = ESTABLISHED._replace(cookie=5)
    second = ESTABLISHED._replace(rport=40000, cookie=6)  # sorts before the first
    tracker.update(frozenset({first, second}), now=0.0, watches_ends=True, wall=100.0)
    ends = [
        End("tcp", "127.0.0.1", 8000, "127.0.0.1", 50000, 5, 100.2, None),
        End("tcp", "127.0.0.1", 8000, "127.0.0.1", 40000, 6, 100.7, None),
    ]
    poll = tracker.update(frozenset(), now=1.0, ends=Ends(ends), watches_ends=True, wall=101.0)
    assert [change.conn.rport for change in poll.changes] == [50000, 40000]


def test_an_end_for_a_connection_no_poll_saw_opens_and_closes_it_once():
    tracker = ConnectionTracker()
    end = End("tcp", "127.0.0.1", 50001, "127.0.0.1", 8000, 11, 99.9, TcpCounters(2, 0, 0, 0))
    poll = tracker.update(frozenset(), now=1.0, ends=Ends([end]), watches_ends=True, wall=100.0)
    assert kinds(poll) == [("open", "CLOSE"), ("close", "CLOSE")]
    # Its TIME_WAIT entry, with another cookie, in a later dump: the same story.
    time_wait = Connection("tcp", "127.0.0.1", 50001, "127.0.0.1", 8000, "TIME_WAIT", None, 12)
    poll = tracker.update(frozenset({time_wait}), now=2.0, watches_ends=True, wall=101.0)
    assert kinds(poll) == [("state", "TIME_WAIT")]
    # The same event twice (or late): never a second close.
    poll = tracker.update(
        frozenset({time_wait}), now=3.0, ends=Ends([end]), watches_ends=True, wall=102.0
    )
    assert poll.changes == []


def test_a_second_end_on_the_same_5_tuple_with_another_cookie_is_another_connection():
    """A port still in TIME_WAIT given again at once (loopback, tcp_tw_reuse): two full
    sockets on one 5-tuple, each ending once, are two stories, even in one batch."""
    tracker = ConnectionTracker()
    first = End("tcp", "127.0.0.1", 50001, "127.0.0.1", 8000, 11, 99.9, TcpCounters(2, 0, 0, 0))
    second = first._replace(cookie=21, time=100.3)
    poll = tracker.update(frozenset(), now=1.0, ends=Ends([first]), watches_ends=True, wall=100.0)
    assert kinds(poll) == [("open", "CLOSE"), ("close", "CLOSE")]
    time_wait = Connection("tcp", "127.0.0.1", 50001, "127.0.0.1", 8000, "TIME_WAIT", None, 12)
    poll = tracker.update(
        frozenset({time_wait}), now=2.0, ends=Ends([second]), watches_ends=True, wall=101.0
    )
    assert kinds(poll, "open", "close") == [("open", "CLOSE"), ("close", "CLOSE")]
    third = first._replace(cookie=31, time=101.5)
    poll = tracker.update(
        frozenset(),
        now=3.0,
        ends=Ends([third._replace(cookie=41), third]),
        watches_ends=True,
        wall=102.0,
    )
    assert (
        kinds(poll, "open", "close")
        == [("open", "CLOSE"), ("open", "CLOSE")] + [("close", "CLOSE")] * 2
    )
    # The same events again (or late): never a second close.
    poll = tracker.update(
        frozenset(), now=4.0, ends=Ends([second, third]), watches_ends=True, wall=103.0
    )
    assert kinds(poll, "open", "close") == []


def test_an_abort_no_poll_saw_is_left_out_for_it_has_only_a_cookie():
    tracker = ConnectionTracker()
    end = End("tcp", None, 50001, "127.0.0.1", None, 11, 99.9, TcpCounters(0, 0, 0, 0))
    poll = tracker.update(frozenset(), now=1.0, ends=Ends([end]), watches_ends=True, wall=100.0)
    assert poll.changes == []


def test_an_abort_joins_its_story_by_cookie_alone():
    tracker = ConnectionTracker()
    tracker.update(frozenset({ESTABLISHED._replace(cookie=3)}), now=0.0, watches_ends=True)
    end = End("tcp", None, 8000, "127.0.0.1", None, 3, 0.5, TcpCounters(0, 0, 0, 0))
    poll = tracker.update(frozenset(), now=1.0, ends=Ends([end]), watches_ends=True, wall=1.0)
    assert kinds(poll) == [("close", "ESTABLISHED")] and poll.changes[0].story.exact_end


def test_with_end_events_a_time_wait_waits_one_poll_for_its_event():
    tracker = ConnectionTracker()
    tracker.update(frozenset({ESTABLISHED}), now=0.0, watches_ends=True)
    time_wait = ESTABLISHED._replace(status="TIME_WAIT", pid=None)
    poll = tracker.update(frozenset({time_wait}), now=1.0, watches_ends=True)
    assert kinds(poll) == [("state", "TIME_WAIT")]  # its end event may still be on its way
    poll = tracker.update(frozenset({time_wait}), now=2.0, watches_ends=True)
    assert kinds(poll) == [("close", "ESTABLISHED")]  # it was lost: inferred
    assert poll.changes[0].story.end_time == 1.0


def test_lost_end_events_are_inferred_from_the_table_and_counted():
    tracker = ConnectionTracker()
    a = ESTABLISHED._replace(cookie=1)
    b = ESTABLISHED._replace(cookie=2, rport=50001)
    c = ESTABLISHED._replace(cookie=3, rport=50002)
    tracker.update(frozenset({a, b, c}), now=0.0, watches_ends=True)
    got = End("tcp", "127.0.0.1", 8000, "127.0.0.1", 50000, 1, 0.9, None)
    remainder = c._replace(status="TIME_WAIT", pid=None)
    poll = tracker.update(
        frozenset({remainder}), now=1.0, ends=Ends([got], lost=True), watches_ends=True, wall=1.0
    )
    closes = [c.story.cookie for c in poll.changes if c.kind == "close"]
    assert sorted(closes) == [1, 2, 3]  # each once
    assert poll.inferred_after_loss == 2  # b gone, c in TIME_WAIT: no event for either
    assert tracker.update(frozenset({remainder}), now=2.0, watches_ends=True).changes == []


def test_a_shared_socket_listed_per_holder_is_one_story_with_every_owner():
    shared = [ESTABLISHED._replace(pid=pid) for pid in (30, 10, 20)]
    (opened,) = ConnectionTracker().update(frozenset(shared), now=0.0).changes
    assert (opened.conn.pid, opened.conn.owners) == (10, (10, 20, 30))


def test_a_listener_named_by_another_holder_stays_one_story():
    # psutil names one holder of a shared listener: a fork or an exit changes which.
    tracker = ConnectionTracker()
    (opened,) = tracker.update(frozenset({LISTENER}), now=0.0).changes
    poll = tracker.update(frozenset({LISTENER._replace(pid=11)}), now=1.0)
    assert kinds(poll) == [("owner", "LISTEN")] and poll.changes[0].story is opened.story
    poll = tracker.update(frozenset({LISTENER}), now=2.0)
    assert kinds(poll) == [("owner", "LISTEN")] and poll.changes[0].story is opened.story


def test_listeners_sharing_a_port_are_told_apart_by_their_owner():
    workers = frozenset({LISTENER, LISTENER._replace(pid=11)})
    poll = ConnectionTracker().update(workers, now=0.0)
    assert sorted(c.conn.pid for c in poll.changes) == [10, 11]


def test_ended_stories_are_remembered_within_bounds():
    tracker = ConnectionTracker(ended_memory=1e9, max_ended=1000)
    for port in range(5000):
        conn = ESTABLISHED._replace(rport=port)
        tracker.update(frozenset({conn}), now=2.0 * port)
        tracker.update(frozenset(), now=2.0 * port + 1)
    assert tracker.remembered() == 1000
    expiring = ConnectionTracker(ended_memory=10.0)
    expiring.update(frozenset({ESTABLISHED}), now=0.0)
    expiring.update(frozenset(), now=1.0)
    expiring.update(frozenset(), now=12.0)
    assert expiring.remembered() == 0


def test_live_pids_are_the_socket_holders_of_the_latest_poll():
    tracker = ConnectionTracker()
    tracker.update(frozenset({LISTENER, UDP}), now=0.0)
    assert tracker.live_pids() == {10}
    tracker.update(frozenset({UDP._replace(pid=7, owners=(7, 8))}), now=1.0)
    assert tracker.live_pids() == {7, 8}  # every holder a row lists keeps its facts cached


@pytest.mark.parametrize(
    ("counters", "states", "opened_here", "expected"),
    [
        # Measured on Linux 6.18 (docs/story.md): 5,000 bytes up, 7,000 down.
        (TcpCounters(5002, 7000, 5000, 0), {"ESTABLISHED", "FIN_WAIT2"}, True, (5000, 7000)),
        (TcpCounters(7001, 5001, 7000, 0), {"ESTABLISHED", "CLOSE_WAIT"}, False, (7000, 5000)),
        (TcpCounters(5002, 7001, 5000, 0), {"ESTABLISHED", "TIME_WAIT"}, True, (5000, 7000)),
        (TcpCounters(5002, 7000, 5300, 300), {"ESTABLISHED"}, True, (5000, 7000)),
        (TcpCounters(5002, 7000), {"ESTABLISHED", "FIN_WAIT2"}, True, (5000, 7000)),  # < 4.19
        (TcpCounters(7001, 5001), {"ESTABLISHED", "LAST_ACK"}, False, (7000, 5000)),
        (TcpCounters(0, 5000, 0, 0), {"ESTABLISHED"}, False, (0, 5000)),  # reset by the peer
        (TcpCounters(0, 0, 0, 0), {"ESTABLISHED"}, True, (None, None)),  # cleared: abort
        (TcpCounters(0, 0), {"CLOSE_WAIT", "FIN_WAIT1"}, False, (None, None)),
        (TcpCounters(1, 0, 0, 0), {"TIME_WAIT", "FIN_WAIT1"}, True, (0, 0)),  # never negative
        (None, {"ESTABLISHED"}, True, (None, None)),
    ],
)
def test_payload_bytes_leave_out_syn_and_fin(counters, states, opened_here, expected):
    story = Story(ESTABLISHED, 0.0, False)
    for status in states:
        story.saw(status)
    assert payload_bytes(story, counters, opened_here) == expected


def test_udp_has_no_bytes():
    story = Story(UDP, 0.0, False)
    assert payload_bytes(story, TcpCounters(1, 1, 1, 0), False) == (None, None)


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


def test_a_socket_first_seen_in_time_wait_ends_at_once_without_end_events():
    tracker = ConnectionTracker()
    time_wait = ESTABLISHED._replace(status="TIME_WAIT", pid=None)
    poll = tracker.update(frozenset({time_wait}), now=0.0)
    assert kinds(poll) == [("open", "TIME_WAIT"), ("close", "TIME_WAIT")]
    assert tracker.update(frozenset({time_wait}), now=1.0).changes == []
    events = ConnectionTracker()
    assert kinds(events.update(frozenset({time_wait}), now=0.0, watches_ends=True)) == [
        ("open", "TIME_WAIT")
    ]
    poll = events.update(frozenset({time_wait}), now=1.0, watches_ends=True)
    assert kinds(poll) == [("close", "TIME_WAIT")]  # its end event never came


# Network namespaces: the same 5-tuple in two namespaces is two sockets.
NS_A, NS_B = 4026531840, 4026532500
IN_A = ESTABLISHED._replace(netns=NS_A)
IN_B = ESTABLISHED._replace(netns=NS_B, pid=30)


def test_identity_is_the_5_tuple_and_namespace_and_the_owner_without_remote_end():
    assert identity_key(IN_A) == ("tcp", "127.0.0.1", 8000, "127.0.0.1", 50000, NS_A)
    listener = LISTENER._replace(netns=NS_B)
    assert identity_key(listener) == ("tcp", "127.0.0.1", 8000, None, None, NS_B, 10)
    end = End("tcp", "127.0.0.1", 8000, "127.0.0.1", 50000, 5, 1.0, None, NS_A)
    assert identity_key(end) == identity_key(IN_A)
    assert identity_key(ESTABLISHED)[5] is None  # a source that does not know it


def test_the_same_5_tuple_in_two_namespaces_is_two_stories_each_ending_alone():
    tracker = ConnectionTracker()
    poll = tracker.update(frozenset({IN_A, IN_B}), now=0.0)
    assert kinds(poll) == [("open", "ESTABLISHED"), ("open", "ESTABLISHED")]
    stories = {c.conn.netns: c.story for c in poll.changes}
    assert stories[NS_A] is not stories[NS_B]
    poll = tracker.update(frozenset({IN_B}), now=1.0)
    assert kinds(poll) == [("close", "ESTABLISHED")] and poll.changes[0].story is stories[NS_A]
    assert tracker.update(frozenset({IN_B}), now=2.0).changes == []
    assert len(tracker.live()) == 1 and tracker.live()[0] is stories[NS_B]


def test_a_remainder_in_another_namespace_is_a_story_of_its_own():
    tracker = ConnectionTracker()
    (opened,) = tracker.update(frozenset({IN_A}), now=0.0).changes
    tracker.update(frozenset(), now=1.0)  # A's ended: remembered for its remainder
    remainder_b = IN_B._replace(status="TIME_WAIT", pid=None)
    poll = tracker.update(frozenset({remainder_b}), now=2.0)
    assert kinds(poll, "open") == [("open", "TIME_WAIT")]
    assert poll.changes[0].story is not opened.story
    # ...while A's own remainder is A's story.
    tracker = ConnectionTracker()
    (opened,) = tracker.update(frozenset({IN_A}), now=0.0).changes
    tracker.update(frozenset(), now=1.0)
    poll = tracker.update(frozenset({IN_A._replace(status="TIME_WAIT", pid=None)}), now=2.0)
    assert kinds(poll) == [("state", "TIME_WAIT")] and poll.changes[0].story is opened.story


def test_an_end_event_ends_only_the_story_of_its_namespace():
    tracker = ConnectionTracker()
    poll = tracker.update(frozenset({IN_A, IN_B}), now=0.0, watches_ends=True, wall=100.0)
    stories = {c.conn.netns: c.story for c in poll.changes}
    end_b = End("tcp", "127.0.0.1", 8000, "127.0.0.1", 50000, 0, 100.5, None, NS_B)
    poll = tracker.update(
        frozenset({IN_A}), now=1.0, ends=Ends([end_b]), watches_ends=True, wall=101.0
    )
    (close,) = poll.changes
    assert close.kind == "close" and close.story is stories[NS_B] and close.story.exact_end
    assert not stories[NS_A].ended


def test_an_end_without_a_namespace_joins_as_from_a_source_that_knows_none():
    tracker = ConnectionTracker()
    tracker.update(frozenset({ESTABLISHED}), now=0.0, watches_ends=True, wall=100.0)
    end = End("tcp", "127.0.0.1", 8000, "127.0.0.1", 50000, 0, 100.5, None)
    poll = tracker.update(frozenset(), now=1.0, ends=Ends([end]), watches_ends=True, wall=101.0)
    assert kinds(poll) == [("close", "ESTABLISHED")] and poll.changes[0].story.exact_end


def test_an_end_without_a_namespace_joins_the_one_story_of_its_5_tuple_in_any():
    # Snapshots that say the namespace, an end event that does not: it joins the only
    # story of its 5-tuple; where two namespaces hold it, neither (each ends at its poll).
    tracker = ConnectionTracker()
    (opened,) = tracker.update(frozenset({IN_A}), now=0.0, watches_ends=True, wall=100.0).changes
    end = End("tcp", "127.0.0.1", 8000, "127.0.0.1", 50000, 0, 100.5, None)
    poll = tracker.update(frozenset(), now=1.0, ends=Ends([end]), watches_ends=True, wall=101.0)
    assert kinds(poll) == [("close", "ESTABLISHED")] and poll.changes[0].story is opened.story
    assert opened.story.exact_end
    tracker = ConnectionTracker()
    tracker.update(frozenset({IN_A, IN_B}), now=0.0, watches_ends=True, wall=100.0)
    poll = tracker.update(
        frozenset({IN_A, IN_B}), now=1.0, ends=Ends([end]), watches_ends=True, wall=101.0
    )
    assert poll.changes == []  # no phantom story either
    poll = tracker.update(frozenset(), now=2.0, watches_ends=True, wall=102.0)
    assert kinds(poll) == [("close", "ESTABLISHED"), ("close", "ESTABLISHED")]
    assert not any(change.story.exact_end for change in poll.changes)


def test_the_namespaces_remembered_follow_the_stories_known():
    tracker = ConnectionTracker(ended_memory=10.0)
    for netns in range(1, 1001):  # a thousand containers, each with one connection
        tracker.update(frozenset({IN_A._replace(netns=netns)}), now=float(netns))
    tracker.update(frozenset(), now=2000.0)  # all gone, and forgotten
    tracker.update(frozenset({IN_A}), now=2001.0)
    assert len(tracker._namespaces) <= 2 * tracker._namespaces_kept + 16 < 100


def test_a_cookie_of_another_namespace_is_another_socket():
    # Before Linux 5.12 each namespace numbered its own cookies: they collide.
    tracker = ConnectionTracker()
    a = IN_A._replace(cookie=7)
    (opened,) = tracker.update(frozenset({a}), now=0.0, watches_ends=True, wall=100.0).changes
    b = IN_B._replace(cookie=7, lport=9000)
    poll = tracker.update(frozenset({a, b}), now=1.0, watches_ends=True, wall=101.0)
    assert kinds(poll) == [("open", "ESTABLISHED")] and poll.changes[0].story is not opened.story
    end_b = End("tcp", "127.0.0.1", 9000, "127.0.0.1", 50000, 7, 101.5, None, NS_B)
    poll = tracker.update(
        frozenset({a}), now=2.0, ends=Ends([end_b]), watches_ends=True, wall=102.0
    )
    assert [c.conn.lport for c in poll.changes if c.kind == "close"] == [9000]
    assert not opened.story.ended


def test_a_listener_in_another_namespace_is_no_new_holder_of_one_gone():
    tracker = ConnectionTracker()
    in_a = LISTENER._replace(netns=NS_A)
    (opened,) = tracker.update(frozenset({in_a}), now=0.0).changes
    in_b = LISTENER._replace(netns=NS_B, pid=11)
    poll = tracker.update(frozenset({in_b}), now=1.0)
    assert kinds(poll) == [("open", "LISTEN"), ("close", "LISTEN")]
    assert poll.changes[1].story is opened.story
    # Within one namespace, another holder is the same listener.
    poll = tracker.update(frozenset({in_b._replace(pid=12)}), now=2.0)
    assert kinds(poll) == [("owner", "LISTEN")]


class FailedConnect:
    def __init__(self, key):
        self.proto, self.laddr, self.lport, self.raddr, self.rport = key[:5]
        self.key = key
        self.time, self.end_time = 99.0, 99.5


def test_a_failed_connect_is_a_story_in_its_namespace():
    tracker = ConnectionTracker()
    live = IN_A._replace(status="SYN_SENT")
    tracker.update(frozenset({live}), now=0.0, wall=100.0)
    key = ("tcp", "127.0.0.1", 8000, "127.0.0.1", 50000)
    # The same 5-tuple failing in namespace B while A's socket lives: a story of its own.
    poll = tracker.update(frozenset({live}), now=1.0, wall=101.0,
                          failed=[FailedConnect((*key, NS_B))])  # fmt: skip
    assert kinds(poll) == [("open", "SYN_SENT"), ("close", "SYN_SENT")]
    assert poll.changes[0].story.conn.netns == NS_B
    # In A, a poll saw it: no second story.
    poll = tracker.update(frozenset({live}), now=2.0, wall=102.0,
                          failed=[FailedConnect((*key, NS_A))])  # fmt: skip
    assert poll.changes == []
    # Connect events keyed by the 5-tuple alone are of an unknown namespace.
    assert connect_identity(FailedConnect(key)) == (*key, None)


def test_a_listener_makes_only_its_own_namespaces_connections_in():
    listeners = ListenerMemory()
    listeners.opened(LISTENER._replace(netns=NS_A))
    assert listeners.direction(IN_A, 0.0) == "in"
    assert listeners.direction(IN_B, 0.0) == "out"
    assert listeners.listener_of(IN_A) == ("tcp", "127.0.0.1", 8000, NS_A)
    assert listeners.listener_of(IN_B) is None
    listeners.closed(LISTENER._replace(netns=NS_A), now=10.0)
    assert listeners.direction(IN_A, 11.0) == "in" and listeners.direction(IN_B, 11.0) == "out"


def test_a_failed_connect_without_a_namespace_joins_the_polled_socket_of_any():
    """histstat.connects keys a connect by its 5-tuple alone: a failed connect a poll saw
    in SYN_SENT (with its namespace) is that socket, not a second story."""
    key = ("tcp", "127.0.0.1", 50000, "127.0.0.1", 8000)
    live = Connection(*key, "SYN_SENT", 42, 77, (42,), netns=NS_A)
    tracker = ConnectionTracker()
    tracker.update(frozenset({live}), now=0.0, watches_ends=True, wall=100.0)
    end = End(*key, 77, 100.9, None, NS_A)
    poll = tracker.update(frozenset(), now=1.0, ends=Ends([end]), watches_ends=True,
                          wall=101.0, failed=[FailedConnect(key)])  # fmt: skip
    assert kinds(poll) == [("close", "SYN_SENT")]
    assert poll.changes[0].conn.netns == NS_A
    # Still live when the connect's failure is heard: no second story either.
    tracker = ConnectionTracker()
    tracker.update(frozenset({live}), now=0.0, watches_ends=True, wall=100.0)
    poll = tracker.update(frozenset({live}), now=1.0, watches_ends=True, wall=101.0,
                          failed=[FailedConnect(key)])  # fmt: skip
    assert poll.changes == []
    # No poll saw it: a story of its own, of an unknown namespace.
    poll = ConnectionTracker().update(frozenset(), now=0.0, wall=101.0,
                                      failed=[FailedConnect(key)])  # fmt: skip
    assert kinds(poll) == [("open", "SYN_SENT"), ("close", "SYN_SENT")]
    assert poll.changes[0].conn.netns is None


def _all_holders(snapshot) -> set:
    """live_pids the slow way: every record of the snapshot looked at."""
    pids = {conn.pid for conn in snapshot if conn.pid is not None}
    for conn in snapshot:
        if len(conn.owners) > 1:
            pids.update(conn.owners[:MAX_OWNERS])
    return pids


_RECORDS = [
    Connection("tcp", "127.0.0.1", 40000 + port, "127.0.0.1", 8000, "ESTABLISHED", pid, port,
               owners=owners)
    for port in range(4)
    for pid, owners in ((None, ()), (5, ()), (6, (6, 5)), (7, (7, *range(100, 120))))
]  # fmt: skip


@given(st.lists(st.sets(st.sampled_from(_RECORDS)), max_size=8))
def test_live_pids_follow_the_records_as_they_come_and_go(snapshots):
    tracker = ConnectionTracker()
    for now, snapshot in enumerate(snapshots):
        tracker.update(frozenset(snapshot), now=float(now))
        assert tracker.live_pids() == _all_holders(snapshot)

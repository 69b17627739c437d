"""The join of connect events into whole connects (histstat.connects), on made-up events:
order, source addresses, ambiguity, network namespaces, failed connects and the bounds of
its memories; the connecting process read from /proc; the reader thread's cycle."""

from __future__ import annotations

import errno
import os
import resource
import select
import socket
import subprocess
import sys
import threading
import time

from test_story import CLIENT, LISTENER, SERVER, Cache, EventSource, poller_of, rows_of

import histstat.connects as connects_module
from histstat.connects import (
    Connect,
    ConnectJoiner,
    ConnectWatcher,
    KnownProcesses,
    Process,
    RecentProcesses,
    normal_address,
    read_connecting_process,
)
from histstat.filters import RowFilter, parse_ports
from histstat.poller import Poller
from histstat.records import Connection, ProcessFacts
from histstat.sources.base import NO_ENDS
from histstat.sources.namespaces import namespace_inode
from histstat.sources.trace_lines import ConnectEvent
from histstat.sources.tracefs import process_start_time
from histstat.tracker import ConnectionTracker
from support.waiting import wait_for


def event(old, new, sport=0, dport=80, saddr="127.0.0.1", daddr="127.0.0.1", time=1.0,
          family=socket.AF_INET, tid=100) -> ConnectEvent:  # fmt: skip
    return ConnectEvent(time, tid, tid, "curl", family, sport, dport, saddr, daddr, old, new)


NETNS = 4026531840  # a namespace's inode, as /proc/<pid>/ns/net gives it
OTHER_NETNS = 4026532999


def process(pid: int, created: float | None = 5.0, netns: int | None = NETNS) -> Process:
    return Process(pid, created, ProcessFacts(name=f"p{pid}"), netns)


def test_outcome_joins_its_connect_and_gives_the_whole_tuple():
    joiner = ConnectJoiner()
    joiner.connected(event("CLOSE", "SYN_SENT", time=1.0), process(7))
    connect = joiner.finished(event("SYN_SENT", "ESTABLISHED", sport=4000, time=1.5))
    assert connect.key == ("tcp", "127.0.0.1", 4000, "127.0.0.1", 80, NETNS)
    assert (connect.time, connect.end_time, connect.failed) == (1.0, 1.5, False)
    assert connect.process == process(7)
    assert joiner.connect_of(connect.key) == connect
    assert joiner.take_failed() == []


def test_failed_connects_are_kept_for_the_poll_in_order():
    joiner = ConnectJoiner()
    for port in (1, 2):
        joiner.connected(event("CLOSE", "SYN_SENT", dport=port), process(7))
    for port in (1, 2):
        joiner.finished(event("SYN_SENT", "CLOSE", sport=5000 + port, dport=port))
    assert [c.rport for c in joiner.take_failed()] == [1, 2]
    assert joiner.take_failed() == []


def test_two_processes_connecting_to_one_destination_are_counted_not_guessed():
    joiner = ConnectJoiner()
    joiner.connected(event("CLOSE", "SYN_SENT", tid=7), process(7))
    joiner.connected(event("CLOSE", "SYN_SENT", tid=8), process(8))
    first = joiner.finished(event("SYN_SENT", "ESTABLISHED", sport=4000))
    second = joiner.finished(event("SYN_SENT", "ESTABLISHED", sport=4001))
    assert first.process is None and joiner.ambiguous == 1
    assert second.process == process(8)  # alone by then


def test_one_process_connecting_twice_to_one_destination_is_not_ambiguous():
    joiner = ConnectJoiner()
    joiner.connected(event("CLOSE", "SYN_SENT"), process(7))
    joiner.connected(event("CLOSE", "SYN_SENT"), process(7))
    assert joiner.finished(event("SYN_SENT", "ESTABLISHED", sport=4000)).process == process(7)
    assert joiner.ambiguous == 0


def test_a_bound_source_port_picks_its_own_connect():
    joiner = ConnectJoiner()
    joiner.connected(event("CLOSE", "SYN_SENT", sport=4001, tid=7), process(7))
    joiner.connected(event("CLOSE", "SYN_SENT", sport=4002, tid=8), process(8))
    assert joiner.finished(event("SYN_SENT", "CLOSE", sport=4002)).process == process(8)
    assert joiner.ambiguous == 0


def test_an_outcome_without_its_connect_has_no_process():
    joiner = ConnectJoiner()
    connect = joiner.finished(event("SYN_SENT", "CLOSE", sport=4000))
    assert connect.process is None and joiner.unmatched == 1


def test_ipv6_addresses_are_spelled_as_sources_spell_them():
    joiner = ConnectJoiner()
    v6 = dict(family=socket.AF_INET6, saddr="::1", daddr="0:0::1")
    joiner.connected(event("CLOSE", "SYN_SENT", **v6), process(7))
    connect = joiner.finished(event("SYN_SENT", "ESTABLISHED", sport=4000, **v6))
    assert connect.key == ("tcp6", "::1", 4000, "::1", 80, NETNS)
    assert connect.process == process(7)
    assert normal_address(socket.AF_INET6, "::ffff:127.0.0.1") == "::ffff:127.0.0.1"


def test_connects_are_forgotten_after_their_memory():
    joiner = ConnectJoiner()
    joiner.connected(event("CLOSE", "SYN_SENT", time=1.0), process(7))
    connect = joiner.finished(event("SYN_SENT", "ESTABLISHED", sport=4000, time=1.0))
    joiner.expire(30.0)
    assert joiner.connect_of(connect.key) is not None
    joiner.expire(100.0)
    assert joiner.connect_of(connect.key) is None


def test_a_process_gone_at_its_read_takes_its_read_of_moments_before():
    recent = RecentProcesses()
    alive = Process(7, 5.0, ProcessFacts(name="beacon", command="beacon --c2"))
    assert recent.fill(alive, 10.0) is alive
    gone = Process(7, None, ProcessFacts(name="beacon"))
    assert recent.fill(gone, 10.5) is alive
    assert recent.fill(gone, 12.0) is gone  # too late: the pid may be another's
    assert recent.fill(Process(7, None, ProcessFacts(name="other")), 10.5).facts.name == "other"


ADDRESS = ("tcp", "127.0.0.1", 4000, "127.0.0.1", 80)


def joined(joiner: ConnectJoiner, *processes: Process, sport: int = 4000) -> Connect:
    """One connect per process to port 80, then one outcome from ``sport``."""
    for each in processes:
        joiner.connected(event("CLOSE", "SYN_SENT", tid=each.pid), each)
    return joiner.finished(event("SYN_SENT", "ESTABLISHED", sport=sport))


def test_a_connect_is_found_in_its_own_namespace_only():
    joiner = ConnectJoiner(own_netns=NETNS)
    connect = joined(joiner, process(7, netns=OTHER_NETNS))
    assert connect.key == (*ADDRESS, OTHER_NETNS) and connect.netns == OTHER_NETNS
    assert joiner.connect_of((*ADDRESS, OTHER_NETNS)) == connect
    assert joiner.connect_of((*ADDRESS, NETNS)) is None
    assert joiner.connect_of(ADDRESS) is None  # five parts: histstat's own namespace
    assert joiner.ambiguous_namespace == 0


def test_five_parts_ask_for_histstats_own_namespace():
    joiner = ConnectJoiner(own_netns=NETNS)
    connect = joined(joiner, process(7))
    assert joiner.connect_of(ADDRESS) == connect == joiner.connect_of((*ADDRESS, NETNS))


def test_a_connect_of_unknown_namespace_goes_to_the_one_connection_asking():
    joiner = ConnectJoiner(own_netns=NETNS)
    connect = joined(joiner, process(7, created=None, netns=None))  # gone before its read
    assert connect.netns is None
    assert joiner.connect_of((*ADDRESS, OTHER_NETNS)) == connect
    assert joiner.connect_of((*ADDRESS, OTHER_NETNS)) == connect  # asked again: the same
    # A second namespace asking for it: given to none more, and counted once.
    assert joiner.connect_of((*ADDRESS, NETNS)) is None
    assert joiner.connect_of((*ADDRESS, NETNS)) is None
    assert joiner.ambiguous_namespace == 1


def test_a_connect_of_unknown_namespace_is_not_guessed_where_another_namespace_has_its_tuple():
    joiner = ConnectJoiner(own_netns=NETNS)
    known = joined(joiner, process(7, netns=OTHER_NETNS))
    joined(joiner, process(8, created=None, netns=None))
    assert joiner.connect_of((*ADDRESS, OTHER_NETNS)) == known
    assert joiner.connect_of((*ADDRESS, NETNS)) is None
    assert joiner.connect_of(ADDRESS) is None
    assert joiner.ambiguous_namespace == 1


def test_a_connect_of_unknown_namespace_is_not_given_when_the_caller_sees_two_connections():
    joiner = ConnectJoiner(own_netns=NETNS)
    joined(joiner, process(7, created=None, netns=None))
    assert joiner.connect_of((*ADDRESS, NETNS), alone=False) is None
    assert joiner.ambiguous_namespace == 1


def test_forgotten_connects_leave_no_namespace_behind():
    joiner = ConnectJoiner(own_netns=NETNS)
    joined(joiner, process(7, netns=OTHER_NETNS))
    joiner.expire(100.0)
    unknown = joined(joiner, process(8, created=None, netns=None))
    assert joiner.connect_of((*ADDRESS, NETNS)) == unknown  # the other namespace's is gone


def test_rivals_in_two_namespaces_leave_the_namespace_unknown():
    joiner = ConnectJoiner()
    connect = joined(joiner, process(7, netns=NETNS), process(8, netns=OTHER_NETNS))
    assert connect.process is None and connect.netns is None and joiner.ambiguous == 1


def test_a_failed_connect_carries_its_namespace():
    joiner = ConnectJoiner()
    joiner.connected(event("CLOSE", "SYN_SENT"), process(7, netns=OTHER_NETNS))
    joiner.finished(event("SYN_SENT", "CLOSE", sport=4000))
    (failed,) = joiner.take_failed()
    assert failed.failed and failed.netns == OTHER_NETNS
    assert failed.key == (*ADDRESS, OTHER_NETNS)


def this_thread_connects() -> ConnectEvent:
    """A CLOSE→SYN_SENT as this thread would make it, the trace's tgid right."""
    return ConnectEvent(1.0, threading.get_native_id(), os.getpid(), "python", socket.AF_INET,
                        0, 80, "127.0.0.1", "127.0.0.1", "CLOSE", "SYN_SENT")  # fmt: skip


def test_the_connecting_process_is_read_with_its_threads_namespace_then_known():
    known = KnownProcesses()
    read = read_connecting_process(this_thread_connects(), known=known)
    assert read.pid == os.getpid() and read.created is not None
    assert read.facts.command and read.netns == namespace_inode("self")
    # Read again: the same process (pid and start time) is taken from what is known.
    marked = read._replace(facts=read.facts._replace(command="as known"))
    ticks = process_start_time(os.getpid())
    assert ticks is not None
    known.add(os.getpid(), ticks, marked)
    again = read_connecting_process(this_thread_connects(), known=known)
    assert again.facts.command == "as known" and again.netns == read.netns


def test_a_wrong_tgid_hint_never_gives_a_known_process_the_thread_is_not_in():
    known = KnownProcesses()
    parent = os.getppid()
    ticks = process_start_time(parent)
    assert ticks is not None
    known.add(parent, ticks, Process(parent, 1.0, ProcessFacts(name="parent")))
    # The tgid cache may name a former holder of the thread id: here, the parent.
    stale = this_thread_connects()._replace(tgid=parent)
    read = read_connecting_process(stale, known=known)
    assert read.pid == os.getpid() and read.facts.name != "parent"


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_known_process_connecting_again_is_found_through_its_pidfd_without_proc(
    monkeypatch,
):
    known = KnownProcesses()
    read = read_connecting_process(this_thread_connects(), known=known)  # read whole
    again = read_connecting_process(this_thread_connects(), known=known)  # start time
    assert again == read
    monkeypatch.setattr("histstat.connects.process_start_time", unreadable)
    monkeypatch.setattr("histstat.connects._status_tgid", unreadable)
    assert read_connecting_process(this_thread_connects(), known=known) == read
    known.close()


def unreadable(*_):
    raise AssertionError("/proc was read")


def test_a_watched_process_that_exited_is_no_longer_taken_for_its_pid():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ticks = wait_for(lambda: process_start_time(child.pid), describe="the child's stat")
        known = KnownProcesses()
        known.add(child.pid, ticks, Process(child.pid, 1.0, ProcessFacts(name="child")))
        held = open_descriptors()
        connects = this_thread_connects()._replace(tid=child.pid, tgid=child.pid)
        assert read_connecting_process(connects, known=known).facts.name == "child"
        assert open_descriptors() == held + 2  # its pidfd, and the epoll of exits
        assert known.running(child.pid) is not None
    finally:
        child.kill()
        child.wait()
    # Exited (and reaped: its pid free for another): the pidfd says so, and goes.
    assert known.running(child.pid) is None
    assert open_descriptors() == held
    assert read_connecting_process(connects, known=known).created is None  # gone


def test_known_processes_watch_a_few_and_close_their_pidfds():
    held = open_descriptors()
    known = KnownProcesses(watched=2)
    pids = [os.getpid(), os.getppid(), 1]
    for pid in pids:
        ticks = process_start_time(pid)
        assert ticks is not None
        known.add(pid, ticks, Process(pid, 1.0, ProcessFacts(name=str(pid))))
        known.watch(pid, ticks, known.open_pidfd(pid))
    assert open_descriptors() == held + 3  # the epoll of exits, and two: the first went
    assert known.running(pids[0]) is None
    assert [known.running(pid).pid for pid in pids[1:]] == pids[1:]  # type: ignore[union-attr]
    known.close()
    assert open_descriptors() == held


def test_a_watched_process_that_exits_is_let_go_without_another_connect():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    known = KnownProcesses()
    try:
        ticks = wait_for(lambda: process_start_time(child.pid), describe="the child's stat")
        held = open_descriptors()
        known.add(child.pid, ticks, Process(child.pid, 1.0, ProcessFacts(name="child")))
        known.watch(child.pid, ticks, known.open_pidfd(child.pid))
        assert open_descriptors() == held + 2  # its pidfd, and the epoll of exits
        exits = select.poll()
        exits.register(known.exits_fileno(), select.POLLIN)
        known.release_exited()
        assert open_descriptors() == held + 2 and exits.poll(0) == []  # it lives
        child.kill()
        child.wait()
        wait_for(lambda: exits.poll(100), describe="the exit told")  # wakes the thread
        known.release_exited()
        assert open_descriptors() == held and known.exits_fileno() is None
    finally:
        child.kill()
        child.wait()
        known.close()


def test_no_pidfd_is_held_when_descriptors_are_scarce(monkeypatch):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    monkeypatch.setattr(resource, "getrlimit", lambda _: (64, hard))
    assert KnownProcesses().open_pidfd(os.getpid()) == -1
    monkeypatch.setattr(resource, "getrlimit", lambda _: (4096, hard))
    roomy = KnownProcesses()
    pidfd = roomy.open_pidfd(os.getpid())
    assert pidfd >= 0
    roomy.discard_pidfd(pidfd)


def test_normal_addresses_are_remembered_within_their_bound(monkeypatch):
    monkeypatch.setattr("histstat.connects.MAX_NORMAL_ADDRESSES", 2)
    spellings = ["0:0::1", "::1", "0::0:1", "127.0.0.1"]
    normal = [normal_address(socket.AF_INET6, text) for text in spellings[:3]]
    assert normal == ["::1"] * 3
    assert normal_address(socket.AF_INET, "127.0.0.1") == "127.0.0.1"
    assert normal_address(socket.AF_INET, "::1") == "::1"  # not an IPv4 address: as given
    assert [normal_address(socket.AF_INET6, text) for text in spellings[:3]] == normal
    assert len(connects_module._normal_addresses) <= 2  # the bound holds


class PipeReader:
    """A stand-in for ConnectEventReader: a pipe's read end, one queued event per byte."""

    def __init__(self):
        self._read, self._write = os.pipe2(os.O_NONBLOCK)
        self.queued: list[ConnectEvent] = []
        self.reads = 0
        self.closed = False

    def send(self, item: ConnectEvent) -> None:
        self.queued.append(item)
        os.write(self._write, b"e")

    def fileno(self) -> int:
        return self._read

    def read(self, timeout: float = 0.0) -> list[ConnectEvent]:
        self.reads += 1
        try:
            count = len(os.read(self._read, 4096))
        except BlockingIOError:
            return []
        taken, self.queued = self.queued[:count], self.queued[count:]
        return taken

    def lost_events(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True
        os.close(self._read)
        os.close(self._write)


def test_the_reader_thread_sleeps_until_events_come_and_a_poll_catches_up_with_them():
    reader = PipeReader()
    watcher = ConnectWatcher(reader, read_process=lambda e, *_: process(e.tid))  # type: ignore[arg-type]
    try:
        wait_for(lambda: reader.reads >= 1, describe="the thread's first read")
        time.sleep(0.5)  # idle: no timeout wakes it (the old loop read twice in 0.5 s)
        assert reader.reads == 1
        now = time.time()  # the poll's take_failed forgets connects older than their memory
        reader.send(event("CLOSE", "SYN_SENT", tid=7, time=now))
        reader.send(event("SYN_SENT", "CLOSE", sport=4000, time=now))
        watcher.catch_up(timeout=5.0)
        (failed,) = watcher.take_failed()
        assert failed.process == process(7) and failed.key == (*ADDRESS, NETNS)
        assert watcher.connect_of((*ADDRESS, NETNS)) == failed
    finally:
        watcher.close()
    assert reader.closed and not watcher._thread.is_alive()


def test_an_event_that_fails_is_counted_and_the_thread_reads_on():
    """A connect whose process read fails (an error no reader foresaw) is lost alone:
    counted, and the events after it are still joined."""

    def read_process(e, *_):
        if e.tid == 7:
            raise OSError("unreadable")
        return process(e.tid)

    reader = PipeReader()
    watcher = ConnectWatcher(reader, read_process=read_process)  # type: ignore[arg-type]
    try:
        now = time.time()
        reader.send(event("CLOSE", "SYN_SENT", tid=7, time=now))
        reader.send(event("CLOSE", "SYN_SENT", tid=8, time=now))
        reader.send(event("SYN_SENT", "CLOSE", sport=4000, time=now))
        watcher.catch_up(timeout=5.0)
        wait_for(lambda: watcher.unhandled == 1, describe="the failed event counted")
        (failed,) = watcher.take_failed()
        assert failed.process == process(8)
        assert watcher.thread_error is None and watcher._thread.is_alive()
    finally:
        watcher.close()


def test_without_a_descriptor_for_its_wake_pipe_the_thread_still_reads_and_stops(monkeypatch):
    reader = PipeReader()

    def no_descriptor(flags):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "pipe2", no_descriptor)
    watcher = ConnectWatcher(reader, read_process=lambda e, *_: process(e.tid))  # type: ignore[arg-type]
    try:
        now = time.time()
        reader.send(event("CLOSE", "SYN_SENT", tid=7, time=now))
        reader.send(event("SYN_SENT", "CLOSE", sport=4000, time=now))
        wait_for(lambda: watcher.take_failed() or None, describe="the failed connect")
    finally:
        started = time.monotonic()
        watcher.close()
    assert reader.closed and not watcher._thread.is_alive()
    assert time.monotonic() - started < 5.0


# The poller with connect events: a stand-in for ConnectWatcher over the story tests'
# event source and process cache.
class Watcher:
    def __init__(self, connects=(), failed=(), lost=0):
        self._connects = {connect.address: connect for connect in connects}
        self._failed = list(failed)
        self._lost = lost

    def connect_of(self, key, alone=True):
        return self._connects.get(tuple(key[:5]))

    def catch_up(self):
        pass

    def take_failed(self):
        failed, self._failed = self._failed, []
        return failed

    def lost_since_told(self):
        lost, self._lost = self._lost, 0
        return lost


def whole_connect(conn, process_, failed=False, at=1000.0):
    return Connect(conn.proto, conn.laddr, conn.lport, conn.raddr, conn.rport, at, at + 0.001,
                   failed, process_)  # fmt: skip


def test_a_story_no_poll_saw_owned_takes_the_connects_process_and_time():
    remainder = CLIENT._replace(status="TIME_WAIT", pid=None, cookie=None)
    gone = Process(20, None, ProcessFacts(name="beacon"))
    watcher = Watcher([whole_connect(remainder, gone)])
    poller, _ = poller_of(({remainder}, NO_ENDS), connects=watcher)
    (row,) = rows_of(poller)
    assert (row.pid, row.pname, row.command, row.attribution) == (20, "beacon", None, "connect")
    assert row.timestamp.timestamp() == 1000.0  # the connect's time, not the poll's


def test_a_process_that_still_lives_gives_its_facts_from_the_cache():
    remainder = CLIENT._replace(status="TIME_WAIT", pid=None, cookie=None)
    alive = Process(20, 0.0, ProcessFacts(name="beacon", command="read at the connect"))
    poller, _ = poller_of(
        ({remainder}, NO_ENDS), connects=Watcher([whole_connect(remainder, alive)])
    )
    (row,) = rows_of(poller)
    assert (row.pid, row.command, row.attribution) == (20, "command of 20", "connect")


def test_a_zombie_keeps_the_command_line_read_at_its_connect():
    """A process that exited but is not yet reaped keeps its pid and start time, and has
    no command line left: the facts read at the connect stay, the cache adds the rest."""

    class Zombie(Cache):
        def lookup(self, pid):
            return ProcessFacts(name="beacon", ppid=1, parent="init")

    remainder = CLIENT._replace(status="TIME_WAIT", pid=None, cookie=None)
    read = Process(20, 0.0, ProcessFacts(name="beacon", command="read at the connect"))
    source = EventSource(({remainder}, NO_ENDS))
    watcher = Watcher([whole_connect(remainder, read)])
    poller = Poller(source, ConnectionTracker(), Zombie(), connects=watcher)
    (row,) = rows_of(poller)
    assert (row.pid, row.command, row.parent, row.attribution) == (
        20, "read at the connect", "init", "connect",
    )  # fmt: skip


class HashingCache(Cache):
    """The story tests' cache that says which processes were asked for and hashed."""

    def __init__(self, started=0.0):
        super().__init__()
        self.started = started
        self.hashed = []

    def created(self, pid):
        return self.started

    def hashes(self, pid, facts):
        self.hashed.append(pid)
        return None


def test_a_connects_story_the_filters_drop_costs_no_process_lookup():
    remainder = CLIENT._replace(status="TIME_WAIT", pid=None, cookie=None)
    alive = Process(20, 0.0, ProcessFacts(name="beacon", command="read at the connect"))
    watcher = Watcher([whole_connect(remainder, alive)])
    cache = HashingCache()
    source = EventSource(({remainder}, NO_ENDS), ({remainder._replace(status="CLOSE")}, NO_ENDS))
    poller = Poller(source, ConnectionTracker(), cache, RowFilter(pids=frozenset({99})),
                    connects=watcher)  # fmt: skip
    assert rows_of(poller) == [] and rows_of(poller) == []
    assert (cache.looked_up, cache.hashed) == ([], [])
    kept = HashingCache()
    source = EventSource(({remainder}, NO_ENDS))
    poller = Poller(source, ConnectionTracker(), kept, RowFilter(pids=frozenset({20})),
                    connects=watcher)  # fmt: skip
    (row,) = rows_of(poller)
    assert (row.pid, row.command, row.attribution) == (20, "command of 20", "connect")
    assert (kept.looked_up, kept.hashed) == ([20], [20])


def test_a_story_its_socket_fields_drop_is_not_searched_for_an_owner():
    class AskedWatcher(Watcher):
        asked: list = []

        def connect_of(self, key, alone=True):
            self.asked.append(key)
            return super().connect_of(key, alone)

    remainder = CLIENT._replace(status="TIME_WAIT", pid=None, cookie=None)
    alive = Process(20, 0.0, ProcessFacts(name="beacon"))
    for ports, asked in (("1-7999", 0), ("8000", 1)):
        watcher = AskedWatcher([whole_connect(remainder, alive)])
        watcher.asked = []
        cache = HashingCache()
        source = EventSource(({remainder}, NO_ENDS))
        poller = Poller(source, ConnectionTracker(), cache, RowFilter(ports=parse_ports(ports)),
                        connects=watcher)  # fmt: skip
        assert len(rows_of(poller)) == asked
        assert (len(watcher.asked), cache.looked_up) == (asked, [20] * asked)


class JoinerWatcher(Watcher):
    """The poller's view of a real ConnectJoiner."""

    def __init__(self, joiner):
        super().__init__()
        self.joiner = joiner

    def connect_of(self, key, alone=True):
        return self.joiner.connect_of(key, alone)


def test_a_connect_of_unknown_namespace_goes_to_neither_of_two_namespaces_sharing_its_tuple():
    """Two connections of one 5-tuple in two namespaces, and one connect whose namespace
    went unread: the poller tells the joiner that the first to ask is not alone."""
    joiner = ConnectJoiner(own_netns=NETNS)
    joined(joiner, process(7, netns=None))
    proto, laddr, lport, raddr, rport = ADDRESS
    here = Connection(proto, laddr, lport, raddr, rport, "TIME_WAIT", None, netns=NETNS)
    there = here._replace(netns=OTHER_NETNS)
    source = EventSource(({here, there}, NO_ENDS))
    poller = Poller(source, ConnectionTracker(), HashingCache(), connects=JoinerWatcher(joiner))
    rows = rows_of(poller)
    assert [(row.netns, row.pid, row.attribution) for row in rows] == [
        (NETNS, None, None), (OTHER_NETNS, None, None),
    ]  # fmt: skip
    assert joiner.ambiguous_namespace == 1
    joiner = ConnectJoiner(own_netns=NETNS)
    joined(joiner, process(7, netns=None))
    alone = EventSource(({there}, NO_ENDS))
    poller = Poller(alone, ConnectionTracker(), HashingCache(), connects=JoinerWatcher(joiner))
    (row,) = rows_of(poller)  # alone in its 5-tuple: it is that connection's
    assert (row.pid, row.attribution) == (7, "connect")


def test_a_connecting_process_whose_pid_is_another_process_now_keeps_what_its_connect_read():
    """The pid lives with another start than the connect's: the new process is neither
    read nor hashed, and the row has the facts read at the connect."""
    remainder = CLIENT._replace(status="TIME_WAIT", pid=None, cookie=None)
    read = Process(20, 5.0, ProcessFacts(name="beacon", command="read at the connect"))
    cache = HashingCache(started=9.0)
    source = EventSource(({remainder}, NO_ENDS))
    watcher = Watcher([whole_connect(remainder, read)])
    (row,) = rows_of(Poller(source, ConnectionTracker(), cache, connects=watcher))
    assert (row.pid, row.command, row.attribution) == (20, "read at the connect", "connect")
    assert (cache.looked_up, cache.hashed) == ([], [])


def test_a_failed_connect_is_an_open_and_a_close_row_in_syn_sent():
    refused = CLIENT._replace(status="SYN_SENT", pid=None, cookie=None)
    connect = whole_connect(refused, Process(20, None, ProcessFacts(name="scan")), failed=True)
    poller, _ = poller_of((set(), NO_ENDS), connects=Watcher(failed=[connect]), closed=True)
    opened, closed = rows_of(poller)
    assert (opened.event, closed.event) == ("open", "close")
    for row in (opened, closed):
        assert (row.status, row.pid, row.pname, row.attribution) == ("SYN_SENT", 20, "scan",
                                                                      "connect")  # fmt: skip
    assert opened.timestamp.timestamp() == 1000.0
    assert closed.timestamp.timestamp() == 1000.001


def test_lost_connect_events_are_told():
    notices = []
    poller, _ = poller_of((set(), NO_ENDS), connects=Watcher(lost=3), notices=notices)
    rows_of(poller)
    assert len(notices) == 1 and "3 connect events were lost" in notices[0]


def test_an_accepted_connection_nobody_holds_takes_the_listeners_owner():
    accepted = SERVER._replace(pid=None, cookie=None)
    poller, _ = poller_of(({LISTENER, accepted}, NO_ENDS))
    rows = {row.status: row for row in rows_of(poller)}
    row = rows["ESTABLISHED"]
    assert (row.pid, row.pname, row.attribution, row.direction) == (10, "proc10", "listener", "in")

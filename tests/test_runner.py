"""The runner's loop: signals that never land inside a write, and the notices of a loop
that falls behind or runs out of file descriptors."""

from __future__ import annotations

import errno
import io
import json
import signal
import socket
import threading
import time

from histstat import runner
from histstat.environment import Environment
from histstat.poller import Poller
from histstat.shortage import SHORTAGE
from support.waiting import STOP_TIMEOUT


class Said:
    def __init__(self):
        self.lines = []

    def __call__(self, line):
        self.lines.append(line)


def test_a_stall_says_where_the_time_went():
    said = Said()
    watch = runner.LoopWatch(0.1, said)
    watch.iteration_done(started=10.0, polled=10.02, written=10.03)
    watch.check(10.1)  # on time
    watch.iteration_done(started=10.1, polled=10.12, written=10.13)
    watch.check(12.2)  # stopped for about two seconds after writing
    (line,) = said.lines
    assert "fell 2.0 s behind its 0.1 s interval" in line
    assert "polling 0.020 s, writing 0.010 s, stopped or starved of CPU 2.0 s" in line


def test_slow_writing_is_a_stall_too():
    said = Said()
    watch = runner.LoopWatch(0.1, said)
    watch.iteration_done(started=10.0, polled=10.01, written=10.01)
    watch.check(10.1)
    watch.iteration_done(started=10.1, polled=10.11, written=13.11)  # a stalled reader
    watch.check(13.11)
    (line,) = said.lines
    assert "fell 2.9 s behind" in line and "writing 3.0 s" in line


def test_the_first_iteration_reads_from_cold_and_is_not_held_against_the_loop():
    said = Said()
    watch = runner.LoopWatch(0.1, said)
    watch.iteration_done(started=10.0, polled=15.0, written=15.1)  # every process, cold
    watch.check(15.1)
    assert said.lines == []


def test_a_loop_slower_than_its_interval_but_not_stalled_is_told_once_a_minute():
    said = Said()
    watch = runner.LoopWatch(1.0, said)
    now = 0.0
    for _ in range(10):  # 1.5 s per iteration: behind, but by less than two intervals
        watch.iteration_done(started=now, polled=now + 1.4, written=now + 1.5)
        now += 1.5
        watch.check(now)
    assert len(said.lines) == 1 and "took 1.50 s, longer than the 1 s interval" in said.lines[0]
    watch.tell_the_rest(now)
    assert len(said.lines) == 2 and "interval 8 more times since the last notice" in said.lines[1]


def test_stalls_are_told_at_once_then_summed_up_at_most_once_a_minute():
    said = Said()
    watch = runner.LoopWatch(0.1, said)
    now = 100.0
    for _ in range(3):  # a stall of one second, three times in ten seconds
        watch.iteration_done(started=now, polled=now, written=now)
        now += 1.1
        watch.check(now)
        now += 2.0
    assert len(said.lines) == 1  # the first at once, the others held back...
    watch.tell_the_rest(now)  # ...and told at the end, summed up
    assert len(said.lines) == 2
    assert "2 more times since the last notice, 2.0 s in all" in said.lines[1]


def test_descriptor_shortage_is_counted_and_told_with_the_limit():
    said = Said()
    watch = runner.ShortageWatch(said)
    SHORTAGE.take()
    for _ in range(3):
        SHORTAGE.note(OSError(errno.EMFILE, "Too many open files"))
    SHORTAGE.note(OSError(errno.ENOENT, "No such file or directory"))  # not a shortage
    watch.check(0.0)
    SHORTAGE.note(OSError(errno.EMFILE, "Too many open files"))
    watch.check(1.0)  # within the minute: counted, not said yet
    watch.tell_the_rest(2.0)
    assert len(said.lines) == 2
    assert said.lines[0].startswith("3 reads of process facts, socket owners or executables")
    assert "lack of file descriptors (Too many open files, ulimit -n is" in said.lines[0]
    assert said.lines[1].startswith("1 more read of process facts")
    assert "failed since the last notice for lack of file descriptors" in said.lines[1]


def test_sigterm_cuts_a_slow_poll_short_and_keeps_what_was_found(monkeypatch):
    """In-process with a real signal: a poll that would take a minute ends at once, and
    the rows of the poll before it are written."""
    polls = []
    entered = threading.Event()
    real_poll = Poller.poll

    def slow_poll(self):
        polls.append(time.monotonic())
        if len(polls) == 1:
            return real_poll(self)
        entered.set()
        ends = time.monotonic() + 60
        while time.monotonic() < ends:  # a poll that a hostile host made slow: a minute
            time.sleep(0.01)  # of short steps (a signal that comes just before a long
        return []  # blocking call is only seen once the call returns, in any Python)

    main = threading.main_thread().ident

    def terminate_when_slow():
        if entered.wait(STOP_TIMEOUT):
            # At the main thread, as the kernel prefers for a kill from outside: sent to
            # the process from this thread, it may be taken by this very thread.
            signal.pthread_kill(main, signal.SIGTERM)

    monkeypatch.setattr(Poller, "poll", slow_poll)
    monkeypatch.setattr(runner, "is_privileged", lambda: True)
    stdout, stderr = io.BytesIO(), io.StringIO()
    env = Environment(stdout=stdout, stderr=stderr, stdout_encoding="utf-8", stdout_isatty=False)
    previous = signal.getsignal(signal.SIGTERM)
    killer = threading.Thread(target=terminate_when_slow)
    with socket.socket() as listener:  # a row is sure to come, in the first poll
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        killer.start()
        started = time.monotonic()
        code = runner.main(["-j", "-i", "0.01", "--lport", str(port)], env=env)
        took = time.monotonic() - started
        killer.join(STOP_TIMEOUT)
    assert code == 0
    assert took < 30  # the minute-long poll was cut short
    assert [json.loads(line)["lport"] for line in stdout.getvalue().splitlines()] == [port]
    assert signal.getsignal(signal.SIGTERM) is previous  # the handlers were put back


def test_the_first_iteration_s_writing_to_a_stalled_reader_is_a_stall():
    said = Said()
    watch = runner.LoopWatch(0.1, said)
    watch.iteration_done(started=10.0, polled=15.0, written=18.0)  # cold, then 3 s stuck
    watch.check(18.0)
    (line,) = said.lines
    assert "fell 3.0 s behind" in line and "writing 3.0 s" in line

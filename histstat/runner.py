"""Running histstat: the pipeline built from a Config, the poll loop, signals, exit codes."""

from __future__ import annotations

import contextlib
import enum
import math
import signal
import sys
import time
from collections.abc import Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable

from histstat.cli import parse_config
from histstat.config import Config
from histstat.enrich import ProcessCache
from histstat.environment import Environment, reader_gone
from histstat.geoip import GeoIP, GeoIPError
from histstat.hashing import ExecutableHasher
from histstat.output import Output, ReaderGone, Sink, SinkError, build_outputs
from histstat.output.sinks import LogSink, StdoutSink
from histstat.output.syslog import SyslogSink
from histstat.output.writer import OrderedWriter
from histstat.poller import MAX_HASH_WAIT, Poller
from histstat.privileges import NOT_PRIVILEGED_NOTICE, is_privileged
from histstat.resolve import ReverseResolver
from histstat.shortage import SHORTAGE, note_shortage
from histstat.sources import SourceAccessDenied, make_source
from histstat.tracker import ConnectionTracker

if TYPE_CHECKING:  # imported when used: a run without connect events never loads them
    from histstat.connects import ConnectWatcher

# After SIGTERM or Ctrl-C, what is being written (a row a stalled reader holds back on
# stdout, a database another connection holds locked) gets this long to get through.
GRACE = 1.0  # seconds
# At a normal end (--once, --count, --duration) a database that another connection holds
# locked is waited for this long, SQLite's own default, before its rows are given up.
END_LOCK_WAIT = 5.0  # seconds
NOTICE_EVERY = 60.0  # seconds between two notices of the same kind


class ExitStatus(enum.IntEnum):
    OK = 0  # a normal end, including Ctrl-C, SIGTERM and a closed pipe
    RUNTIME_ERROR = 1
    USAGE = 2  # argparse's own convention


class Interrupted(BaseException):
    """SIGTERM or Ctrl-C cut a poll or a sleep short: end like a normal end."""


class Signals:
    """SIGTERM and SIGINT ask histstat to end; SIGHUP asks for the log to be reopened.

    A handler records the request and nothing else, except inside an ``interruptible``
    section (a poll, the sleep between polls), which it ends at once by raising
    ``Interrupted``. So a signal never lands inside a write: the row being written when
    it comes gets until ``give_up_at`` to get through, and no row is ever cut by one.
    """

    def __init__(self) -> None:
        self.stop_requested_at: float | None = None
        self.hangup = False
        self._interruptible = False
        self._previous: dict[int, Any] = {}

    @property
    def stopping(self) -> bool:
        return self.stop_requested_at is not None

    def give_up_at(self) -> float:
        """The monotonic time past which a write still blocked is abandoned."""
        if self.stop_requested_at is None:
            return math.inf
        return self.stop_requested_at + GRACE

    def stop(self) -> None:
        if self.stop_requested_at is None:
            self.stop_requested_at = time.monotonic()

    def install(self) -> None:
        wanted: dict[int, Callable[[int, FrameType | None], None]] = {signal.SIGTERM: self._on_stop}
        # Ctrl-C, unless whoever started histstat chose to ignore it (a background job).
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            wanted[signal.SIGINT] = self._on_stop
        if hasattr(signal, "SIGHUP"):  # POSIX only
            wanted[signal.SIGHUP] = self._on_hangup
        for signum, handler in wanted.items():
            self._previous[signum] = signal.signal(signum, handler)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop()
        if self._interruptible:
            self._interruptible = False
            raise Interrupted()

    def _on_hangup(self, signum: int, frame: FrameType | None) -> None:
        self.hangup = True

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """A section that a stop request ends at once (it writes nothing)."""
        self._interruptible = True  # first: a signal from here on raises...
        try:
            if self.stopping:  # ...and one that came just before is not missed
                raise Interrupted()
            yield
        finally:
            self._interruptible = False


class StdoutEnd:
    """When stdout's reader, if it does not read, is given up on: the grace after a stop
    request (SIGTERM, Ctrl-C), or after the end of --duration."""

    def __init__(self, signals: Signals) -> None:
        self._signals = signals
        self._ended_at = math.inf

    def stop(self) -> None:
        self._ended_at = min(self._ended_at, time.monotonic())

    def give_up_at(self) -> float:
        return min(self._signals.give_up_at(), self._ended_at + GRACE)


class Notice:
    """A notice said at once, then at most once per NOTICE_EVERY, with what happened
    meanwhile summed up: a cause that keeps coming back must not flood stderr."""

    def __init__(self, say: Callable[[str], None], every: float = NOTICE_EVERY) -> None:
        self._say = say
        self._every = every
        self._last = -math.inf
        self.count = 0  # occurrences not yet told
        self.amount = 0.0  # what they add up to (seconds lost, reads failed)
        self.latest = ""  # the latest one's own description

    def add(self, amount: float, latest: str, now: float) -> None:
        self.count += 1
        self.amount += amount
        self.latest = latest
        if now - self._last >= self._every:
            self.tell(now)

    def tell(self, now: float) -> None:
        """Say what was not told yet, if anything."""
        if self.count:
            self._last = now
            self._say(self.latest)
            self.count, self.amount = 0, 0.0


class LoopWatch:
    """Says on stderr when the loop falls behind its interval, wherever the time went:
    a slow poll, slow writing (a stalled reader, a slow disk), or histstat stopped
    (SIGSTOP, a suspended job) or starved of CPU. Connections that open and close in
    such a gap are never seen, so the analyst must know of it.

    The first poll reads every process from cold and leaves no gap behind it; its own
    length is not held against the loop, but the writing after it is.
    """

    def __init__(self, interval: float, say: Callable[[str], None]) -> None:
        self._interval = interval
        self._stalls = Notice(say)
        self._slow = Notice(say)
        # (started, poll took, writing took, first) of the iteration not judged yet
        self._last: tuple[float, float, float, bool] | None = None
        self._first = True

    def iteration_done(self, started: float, polled: float, written: float) -> None:
        self._last = (started, polled - started, written - polled, self._first)
        self._first = False

    def check(self, now: float) -> None:
        """Judge the last iteration at ``now``, the start of the next one (or the end)."""
        if self._last is None:
            return
        started, polling, writing, first = self._last
        self._last = None  # judged once
        interval = self._interval
        work = polling + writing
        # The first poll's cold reads are excused; its writing (a stalled reader) is not.
        planned = started + max(interval, polling) if first else started + interval
        behind = now - planned
        if behind > 2 * interval:
            elsewhere = now - max(planned, started + work)  # past the planned wake-up
            self._stalls.add(behind, self._stall_message(behind, polling, writing, elsewhere), now)
        elif (writing if first else work) > interval:
            if self._slow.count:  # told later than they happened: how many in all
                what = (
                    f"polling and writing took longer than the {interval:g} s interval "
                    f"{self._slow.count + 1} more times since the last notice (the latest "
                    f"{work:.2f} s)"
                )
            else:
                what = (
                    f"polling and writing took {work:.2f} s, longer than the {interval:g} s "
                    "interval"
                )
            self._slow.add(work, f"{what}: connections that lived between polls may be missed", now)

    def _stall_message(self, behind: float, polling: float, writing: float, elsewhere: float):
        """What the notice says when this stall is told: it alone, or with the stalls
        not told yet (rate limited) summed up."""
        where = (
            f"polling {_seconds(polling)}, writing {_seconds(writing)}, stopped or starved "
            f"of CPU {_seconds(max(elsewhere, 0.0))}"
        )
        if self._stalls.count:
            times = self._stalls.count + 1
            lost = self._stalls.amount + behind
            what = (
                f"the loop fell behind its {self._interval:g} s interval {times} more times "
                f"since the last notice, {_seconds(lost)} in all (the latest {where})"
            )
        else:
            what = (
                f"the loop fell {_seconds(behind)} behind its {self._interval:g} s interval "
                f"({where})"
            )
        return f"{what}: connections that opened and closed meanwhile were not seen"

    def tell_the_rest(self, now: float) -> None:
        self.check(now)
        self._stalls.tell(now)
        self._slow.tell(now)


def _until(deadline: float) -> Callable[[], float]:
    return lambda: deadline


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value >= 1 else f"{value:.3f} s"


def _descriptor_limit() -> str:
    try:
        import resource  # POSIX only
    except ImportError:  # pragma: no cover
        return ""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return "" if soft == resource.RLIM_INFINITY else f", ulimit -n is {soft}"


class ShortageWatch:
    """Says on stderr when reads failed for lack of file descriptors: the rows they
    concern lack their pid, process facts or hashes, which would otherwise pass for a
    process that hides them."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self._notice = Notice(say)
        self._failed = 0  # not told yet
        self._skipped = 0  # polls that could not even read the socket table, not told yet
        self._told = False

    def poll_skipped(self) -> None:
        self._skipped += 1

    def check(self, now: float) -> None:
        failed, error = SHORTAGE.take()
        if not failed:
            return
        self._failed += failed
        reason = (error.strerror if error is not None else None) or "Too many open files"
        more = " more" if self._told else ""
        since = " since the last notice" if self._told else ""
        skipped = ""
        if self._skipped:
            polls = "poll" if self._skipped == 1 else "polls"
            skipped = f"; {self._skipped} {polls} could not read the socket table at all"
        self._notice.add(
            failed,
            f"{self._failed}{more} {'read' if self._failed == 1 else 'reads'} of process "
            "facts, socket owners or executables "
            f"failed{since} for lack of file descriptors ({reason}{_descriptor_limit()}): "
            f"rows lack their pid, process facts or hashes{skipped}",
            now,
        )
        if not self._notice.count:  # told: count afresh
            self._failed = self._skipped = 0
            self._told = True

    def tell_the_rest(self, now: float) -> None:
        self.check(now)
        self._notice.tell(now)


class PollLoop:
    """Polls until --once, --count, --duration or a signal says enough (or forever),
    handing each poll's rows to the writer and watching for a closed pipe, SIGHUP, a
    loop that falls behind and reads that found no descriptor left."""

    def __init__(
        self,
        config: Config,
        env: Environment,
        poller: Poller,
        writer: OrderedWriter,
        sinks: list[Sink],
        stdout: StdoutSink | None,
        signals: Signals,
    ) -> None:
        self.ended_by_duration = False
        self.config = config
        self.env = env
        self.poller = poller
        self.writer = writer
        self.sinks = sinks
        self.stdout = stdout
        self.signals = signals
        self.watch = LoopWatch(config.interval, env.notice)
        self.shortage = ShortageWatch(env.notice)

    def run(self) -> None:
        try:
            self._run()
        finally:  # what a stall or a shortage just before the end left untold
            if self.stdout is not None:  # the end waits for stdout as give_up_at says
                self.stdout.wait_until = lambda: math.inf
            now = time.monotonic()
            self.watch.tell_the_rest(now)
            self.shortage.tell_the_rest(now)

    def _run(self) -> None:
        config = self.config
        signals = self.signals
        ends = time.monotonic() + config.duration if config.duration else math.inf
        while not signals.stopping:
            if signals.hangup:
                signals.hangup = False
                for sink in self.sinks:
                    sink.reopen()
            started = time.monotonic()
            self.watch.check(started)
            try:
                with signals.interruptible():
                    rows = self.poller.poll()
            except OSError as exc:
                # No descriptor left to read the socket table with: this poll is lost,
                # like a stall, and said so; the next one may find descriptors again.
                if not note_shortage(exc):
                    raise
                self.shortage.poll_skipped()
                rows = []
            polled = time.monotonic()
            self.writer.add(rows)
            if config.once:
                return
            next_poll = min(started + config.interval, ends)
            if self.stdout is not None:  # a reader that does not read holds no poll back
                # (and a little before the poll is due, so the loop stays on time)
                self.stdout.wait_until = _until(min(started + 0.9 * config.interval, ends))
            self.writer.write_ready(next_poll)
            self.watch.iteration_done(started, polled, time.monotonic())
            self.shortage.check(time.monotonic())
            if self.writer.done or signals.stopping:
                return
            self._check_reader()
            with signals.interruptible():
                self._sleep_until(next_poll)
            if time.monotonic() >= ends:
                self.ended_by_duration = True
                return

    def _check_reader(self) -> None:
        if self.stdout is not None and self.env.stdout is not None:
            if reader_gone(self.env.stdout):
                raise ReaderGone()

    def _sleep_until(self, deadline: float) -> None:
        """Sleep in slices of at most a second, so a closed pipe ends histstat promptly
        even with a long interval (and a huge interval cannot overflow time.sleep)."""
        while True:
            pause = deadline - time.monotonic()
            if pause <= 0:
                return
            time.sleep(min(pause, 1.0))
            self._check_reader()


def _raise_descriptor_limit() -> None:
    """The soft limit of open descriptors up to the hard one, as many servers do: the
    sockets of other network namespaces take one or two each, and the rows' reads must
    not run short for them (bash's ``ulimit -n`` sets both limits, and is kept)."""
    try:
        import resource  # POSIX only
    except ImportError:  # pragma: no cover
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError):  # refused (e.g. above the kernel's nr_open): kept
            pass


def run(config: Config, env: Environment) -> int:
    signals = Signals()
    signals.install()  # first: a SIGTERM at start-up ends quietly too
    _raise_descriptor_limit()
    hasher = resolver = geoip = None
    opened: list[Sink] = []
    stdout = None
    outputs: list[Output] = []
    writer: OrderedWriter | None = None
    connects: ConnectWatcher | None = None
    try:
        # Databases first: a bad one must leave no header, log or run behind; nor must
        # connect events that --kernel-events on cannot have.
        geoip = GeoIP(list(config.geoip)) if config.geoip else None
        # One poll (--once) has nothing for connect events to add, unless they are asked for.
        wanted = config.kernel_events == "on" or not config.once
        if config.kernel_events != "off" and config.source == "linux" and wanted:
            connects = _connect_watcher(config, env)
        outputs, stdout = build_outputs(config, env)
        stdout_ends = StdoutEnd(signals)
        if stdout is not None:
            stdout.give_up_at = stdout_ends.give_up_at
        writer = OrderedWriter(
            [(out.view, out.sink) for out in _writing_order(outputs, stdout)],
            config.count,
            notice=env.notice,
            stopping=lambda: signals.stopping,
        )
        for output in outputs:
            output.sink.open(output.header)
            opened.append(output.sink)
        if not is_privileged():
            env.say(NOT_PRIVILEGED_NOTICE)  # netstat's own words, without our prefix
        hasher = ExecutableHasher() if config.hashes else None
        resolver = ReverseResolver() if config.resolve else None
        events = config.kernel_events != "off"
        source = make_source(
            config.source, config.row_filter.protos, watch_ends=events, notice=env.notice
        )
        try:
            poller = Poller(
                source,
                ConnectionTracker(),
                ProcessCache(hasher, command_limit=config.command_limit),
                config.row_filter,
                closed=config.closed,
                resolver=resolver,
                geoip=geoip,
                skip_existing=config.skip_existing,
                transitions=config.transitions,
                update=config.update,
                notice=env.notice,
                connects=connects,
            )
            loop = PollLoop(config, env, poller, writer, opened, stdout, signals)
            try:
                loop.run()
            except (Interrupted, KeyboardInterrupt):
                signals.stop()
            if loop.ended_by_duration and stdout is not None:
                # What waits for hashes goes out as they come, as far as stdout has room;
                # then a reader that does not read gets the grace of a stop request.
                stdout.wait_until = lambda: -math.inf
                writer.write_ready(time.monotonic() + MAX_HASH_WAIT)
                stdout.wait_until = lambda: math.inf
                stdout_ends.stop()
            _write_the_rest(writer, signals)
        finally:
            source.close()
    except ReaderGone:
        assert writer is not None and stdout is not None
        stdout.discard()
        try:
            _write_the_rest(writer, signals)  # the log still gets what was found
        except SinkError as exc:
            env.notice(str(exc))
            return ExitStatus.RUNTIME_ERROR
    except (SinkError, GeoIPError) as exc:
        env.notice(str(exc))
        return ExitStatus.RUNTIME_ERROR
    except ConnectsUnavailable as exc:
        env.notice(f"--kernel-events on: no kernel connect events: {exc}")
        return ExitStatus.RUNTIME_ERROR
    except SourceAccessDenied:
        env.notice("the system refused to list connections; run as root (sudo histstat)")
        return ExitStatus.RUNTIME_ERROR
    finally:
        if connects is not None:  # the tracefs instance goes at every end
            _close_connects(connects, env)
        for stage in (hasher, resolver, geoip):
            if stage is not None:
                stage.close()
        for sink in opened:
            try:
                sink.close()
            except (SinkError, ReaderGone):
                pass
        signals.restore()
    return ExitStatus.OK


class ConnectsUnavailable(Exception):
    """--kernel-events on, and connect events cannot be had: the message says why."""


def _connect_watcher(config: Config, env: Environment) -> ConnectWatcher | None:
    """The connect events' reader thread, or None (after a notice under auto) when this
    run cannot have them; raises ConnectsUnavailable under --kernel-events on."""
    from histstat.connects import CONNECT_OUTCOMES, ConnectWatcher, connects_notice
    from histstat.sources.tracefs import ConnectEventReader, TracefsUnavailable, locate_tracefs

    try:
        if not is_privileged():
            raise TracefsUnavailable("they need root")
        reader = ConnectEventReader(locate_tracefs().root, transitions=CONNECT_OUTCOMES)
    except TracefsUnavailable as exc:
        if config.kernel_events == "on":
            raise ConnectsUnavailable(str(exc)) from exc
        env.notice(connects_notice(str(exc)))
        return None
    for name, reason in reader.stale_failed:
        env.notice(f"cannot remove the stale tracefs instance {name}: {reason}")
    try:
        return ConnectWatcher(reader, command_limit=config.command_limit)
    except BaseException:
        reader.close()
        raise


def _close_connects(connects: ConnectWatcher, env: Environment) -> None:
    """Stop the connect events, remove the tracefs instance, and say what went wrong."""
    problem = connects.close()
    if problem is not None:
        env.notice(problem)
    if connects.thread_error is not None:
        env.notice(f"kernel connect events stopped early: {connects.thread_error}")
    if connects.unhandled:
        count = connects.unhandled
        env.notice(
            f"{count} kernel connect {'event' if count == 1 else 'events'} could not be"
            f" handled and went unused (the latest: {connects.unhandled_error})"
        )
    if connects.ambiguous:
        count = connects.ambiguous
        env.notice(
            f"{count} {'connect was' if count == 1 else 'connects were'} left unattributed: "
            "another process connected to the same destination at the same moment"
        )
    if connects.ambiguous_namespace:
        count = connects.ambiguous_namespace
        env.notice(
            f"{count} {'connect was' if count == 1 else 'connects were'} left unattributed: "
            "its process ended before its network namespace was read, and another "
            "namespace had a connection with the same addresses and ports"
        )


def _writing_order(outputs: list[Output], stdout: StdoutSink | None) -> list[Output]:
    """The outputs in the order rows go to them (they are opened in another): logs
    first, which never wait; then the database, which another connection may hold locked
    (rows wait for it while the log goes on); stdout last, which shows only rows that
    every file already has. syslog goes with the logs: it never waits either (a full
    socket drops the row for it alone), and a locked database must not hold it back."""

    def rank(output: Output) -> int:
        if isinstance(output.sink, (LogSink, SyslogSink)):
            return 0
        return 2 if output.sink is stdout else 1

    return sorted(outputs, key=rank)


def _write_the_rest(writer: OrderedWriter, signals: Signals) -> None:
    """Write what was found but still waits (for its hashes, for a locked database):
    nothing found is dropped. After a signal, everything gets the grace it leaves."""
    now = time.monotonic()
    if signals.stopping:  # half the grace for hashes, so that stdout can still show them
        busy_deadline = signals.give_up_at()
        hash_deadline = max(now, busy_deadline - GRACE / 2)
    else:  # a normal end: the reader is expected to read on
        hash_deadline, busy_deadline = now + MAX_HASH_WAIT, now + END_LOCK_WAIT
    writer.write_the_rest(hash_deadline, busy_deadline)


def main(argv: list[str] | None = None, env: Environment | None = None) -> int:
    config = parse_config(argv)
    return int(run(config, env or Environment.from_sys()))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

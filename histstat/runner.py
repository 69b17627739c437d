"""Running histstat: the pipeline built from a Config, the poll loop, signals, exit codes."""

from __future__ import annotations

import enum
import math
import signal
import sys
import time
from types import FrameType
from typing import Any, Callable

from histstat.cli import parse_config
from histstat.config import Config
from histstat.enrich import ProcessCache
from histstat.environment import Environment, reader_gone
from histstat.geoip import GeoIP, GeoIPError
from histstat.hashing import ExecutableHasher
from histstat.output import Output, ReaderGone, Sink, SinkError, build_outputs
from histstat.output.sinks import StdoutSink
from histstat.output.writer import OrderedWriter
from histstat.poller import MAX_HASH_WAIT, Poller
from histstat.privileges import NOT_PRIVILEGED_NOTICE, is_privileged
from histstat.resolve import ReverseResolver
from histstat.sources import SourceAccessDenied, make_source
from histstat.tracker import ConnectionTracker

SLOW_POLL_NOTICE_EVERY = 60.0  # seconds between two "poll slower than interval" notices


class ExitStatus(enum.IntEnum):
    OK = 0  # a normal end, including Ctrl-C, SIGTERM and a closed pipe
    RUNTIME_ERROR = 1
    USAGE = 2  # argparse's own convention


class Terminated(BaseException):
    """SIGTERM: end like Ctrl-C, quietly and with every sink closed."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


class Hangup:
    """SIGHUP asks for the log to be reopened at the next poll (logrotate)."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True


def _install_signals(hangup: Hangup) -> dict[int, Any]:
    """Our handlers in; returns the previous ones, for ``_restore_signals``."""
    wanted: dict[int, Callable[[int, FrameType | None], None]] = {
        signal.SIGTERM: _raise_terminated
    }
    if hasattr(signal, "SIGHUP"):  # POSIX only
        wanted[signal.SIGHUP] = hangup
    return {signum: signal.signal(signum, handler) for signum, handler in wanted.items()}


def _restore_signals(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


class PollLoop:
    """Polls until --once, --count or --duration says enough (or forever), handing each
    poll's rows to the writer and watching for a closed pipe, SIGHUP and slow polls."""

    def __init__(
        self,
        config: Config,
        env: Environment,
        poller: Poller,
        writer: OrderedWriter,
        sinks: list[Sink],
        stdout: StdoutSink | None,
        hangup: Hangup,
    ) -> None:
        self.config = config
        self.env = env
        self.poller = poller
        self.writer = writer
        self.sinks = sinks
        self.stdout = stdout
        self.hangup = hangup

    def run(self) -> None:
        config = self.config
        ends = time.monotonic() + config.duration if config.duration else math.inf
        last_slow_notice = -math.inf
        first = True
        while True:
            if self.hangup.requested:
                self.hangup.requested = False
                for sink in self.sinks:
                    sink.reopen()
            started = time.monotonic()
            self.writer.add(self.poller.poll())
            took = time.monotonic() - started
            if config.once:
                return
            # The first poll reads every process from cold and leaves no gap behind it:
            # only later polls can hide a connection between them.
            slow = took > config.interval and not first
            first = False
            if slow and started - last_slow_notice >= SLOW_POLL_NOTICE_EVERY:
                last_slow_notice = started
                self.env.notice(
                    f"a poll took {took:.2f} s, longer than the {config.interval:g} s "
                    "interval: connections that lived between polls may be missed"
                )
            next_poll = min(started + config.interval, ends)
            self.writer.write_ready(next_poll)
            if self.writer.done:
                return
            self._check_reader()
            self._sleep_until(next_poll)
            if time.monotonic() >= ends:
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


def run(config: Config, env: Environment) -> int:
    hangup = Hangup()
    previous_handlers = _install_signals(hangup)  # first: a SIGTERM at start-up ends quietly too
    hasher = resolver = geoip = None
    opened: list[Sink] = []
    stdout = None
    outputs: list[Output] = []
    writer: OrderedWriter | None = None
    try:
        # Databases first: a bad one must leave no header, log or run behind.
        geoip = GeoIP(list(config.geoip)) if config.geoip else None
        outputs, stdout = build_outputs(config, env)
        writer = OrderedWriter([(out.view, out.sink) for out in outputs], config.count)
        for output in outputs:
            output.sink.open(output.header)
            opened.append(output.sink)
        if not is_privileged():
            env.say(NOT_PRIVILEGED_NOTICE)  # netstat's own words, without our prefix
        hasher = ExecutableHasher() if config.hashes else None
        resolver = ReverseResolver() if config.resolve else None
        source = make_source(config.source, config.row_filter.protos)
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
            )
            PollLoop(config, env, poller, writer, opened, stdout, hangup).run()
            _write_the_rest(writer)  # a normal end: the reader is expected to read on
        finally:
            source.close()
    except (KeyboardInterrupt, Terminated):
        if writer is not None and opened and len(opened) == len(outputs):
            _drain(writer, stdout)
    except ReaderGone:
        assert writer is not None and stdout is not None
        stdout.discard()
        _drain(writer, None)  # the log still gets what was found
    except (SinkError, GeoIPError) as exc:
        env.notice(str(exc))
        return ExitStatus.RUNTIME_ERROR
    except SourceAccessDenied:
        env.notice("the system refused to list connections; run as root (sudo histstat)")
        return ExitStatus.RUNTIME_ERROR
    finally:
        for stage in (hasher, resolver, geoip):
            if stage is not None:
                stage.close()
        for sink in opened:
            try:
                sink.close()
            except (SinkError, ReaderGone):
                pass
        _restore_signals(previous_handlers)
    return ExitStatus.OK


def _write_the_rest(writer: OrderedWriter) -> None:
    """Write what was found but still waits for its hashes: nothing found is dropped."""
    writer.write_ready(time.monotonic() + MAX_HASH_WAIT)
    writer.write_ready(time.monotonic(), final=True)  # still waiting: hashes unknown


def _drain(writer: OrderedWriter, stdout: StdoutSink | None) -> None:
    """After an interrupt, write the rest without letting a stalled stdout reader hold
    histstat, and without raising: the run is ending anyway."""
    if stdout is not None:
        stdout.stop_blocking()
    try:
        _write_the_rest(writer)
    except (KeyboardInterrupt, Terminated, ReaderGone, SinkError):
        pass
    finally:
        if stdout is not None:
            stdout.finish()


def main(argv: list[str] | None = None, env: Environment | None = None) -> int:
    config = parse_config(argv)
    return int(run(config, env or Environment.from_sys()))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

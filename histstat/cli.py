"""Command line: arguments into one configuration, the poll loop, signals and exit codes."""

from __future__ import annotations

import argparse
import math
import signal
import sys
import time
from dataclasses import dataclass

from histstat import __version__
from histstat.enrich import ProcessCache
from histstat.environment import Environment, reader_gone
from histstat.format import (
    format_json_row,
    format_plain_row,
    format_pretty_row,
    json_fields,
    plain_header,
    pretty_header,
    text_fields,
)
from histstat.hashing import ExecutableHasher
from histstat.pipeline import MAX_HASH_WAIT, OrderedWriter, Poller
from histstat.privileges import NOT_PRIVILEGED_NOTICE, is_privileged
from histstat.sinks import LogSink, ReaderGone, SinkError, StdoutSink
from histstat.source import PsutilSource, SourceAccessDenied
from histstat.tracker import ConnectionTracker

EXIT_OK, EXIT_RUNTIME_ERROR, EXIT_USAGE = 0, 1, 2
SLOW_POLL_NOTICE_EVERY = 60.0  # seconds between two "poll slower than interval" notices

FORMATS = {
    "plain": (format_plain_row, plain_header, text_fields),
    "pretty": (format_pretty_row, pretty_header, text_fields),
    "json": (format_json_row, None, json_fields),
}


@dataclass(frozen=True)
class Config:
    interval: float
    log: str | None
    output: str  # plain, pretty or json
    quiet: bool
    hashes: bool


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        """Usage errors in one line (exit 2), pointing at --help instead of a usage dump."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(
            f"must be a positive, finite number of seconds, not {text!r}"
        )
    return value


def get_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="histstat",
        description="History for netstat: show network connections as they occur, "
        "with when each was first seen, its process, user and full command line.",
        epilog="Text columns: proto laddr lport raddr rport status pid pname time date "
        "user command ('-' unknown, '*' no remote end); --hash adds md5 and sha256 "
        "before command. Rows hold other users' command lines: logs are created 0600. "
        "Exit status: 0 normal end (Ctrl-C, SIGTERM, closed pipe), 1 runtime error, "
        "2 usage error.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "-i",
        "--interval",
        type=positive_seconds,
        default=1.0,
        metavar="SECONDS",
        help="seconds between polls (default: 1); connections shorter than this may be missed",
    )
    parser.add_argument(
        "-l",
        "--log",
        metavar="FILE",
        help="also append every row to FILE, in the output format; created 0600, "
        "header only when empty, reopened on SIGHUP",
    )
    style = parser.add_mutually_exclusive_group()
    style.add_argument(
        "-p", "--prettify", action="store_true", help="space-aligned columns, for a terminal"
    )
    style.add_argument("-j", "--json", action="store_true", help="NDJSON: one JSON object per line")
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="nothing on stdout (needs --log)"
    )
    parser.add_argument(
        "-v",
        "--version",
        action="version",
        version=f"histstat {__version__}",
        help="print the version and exit",
    )
    parser.add_argument(
        "--hash",
        action="store_true",
        help="add md5 and sha256 of each process's executable (JSON also gets exe)",
    )
    return parser


def parse_config(argv: list | None = None) -> Config:
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.log == "":
        parser.error("argument -l/--log: needs a file name")
    if args.quiet and not args.log:
        parser.error("-q/--quiet needs a file to write to: add -l/--log FILE")
    output = "json" if args.json else "pretty" if args.prettify else "plain"
    return Config(
        interval=args.interval,
        log=args.log,
        output=output,
        quiet=args.quiet,
        hashes=args.hash,
    )


class Terminated(BaseException):
    """SIGTERM: end like Ctrl-C, quietly and with every sink closed."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


class _Hangup:
    """SIGHUP asks for the log to be reopened at the next poll (logrotate)."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum, frame) -> None:
        self.requested = True


def _install_signals(hangup: _Hangup) -> dict:
    """Our handlers in; returns the previous ones, for ``_restore_signals``."""
    wanted = {signal.SIGTERM: _raise_terminated}
    if hasattr(signal, "SIGHUP"):  # POSIX only
        wanted[signal.SIGHUP] = hangup
    return {signum: signal.signal(signum, handler) for signum, handler in wanted.items()}


def _restore_signals(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def build_sinks(config: Config, env: Environment) -> tuple:
    """(sinks in writing order, the stdout sink or None); files come first."""
    sinks: list = []
    if config.log:
        sinks.append(LogSink(config.log, env.notice))
    stdout = None
    if not config.quiet:
        if env.stdout is None:
            raise SinkError("stdout is closed: give it somewhere to go, or use -q with -l FILE")
        # NDJSON is UTF-8 whatever the terminal: jq and collectors read nothing else.
        encoding = "utf-8" if config.output == "json" else env.stdout_encoding
        stdout = StdoutSink(env.stdout, encoding)
        sinks.append(stdout)
    return sinks, stdout


def run(config: Config, env: Environment) -> int:
    format_row, header_of, fields_of = FORMATS[config.output]
    fields = fields_of(config.hashes)
    header = header_of(fields) if header_of else None
    hangup = _Hangup()
    previous_handlers = _install_signals(hangup)  # first: a SIGTERM at start-up ends quietly too
    hasher = None
    opened: list = []
    stdout = None
    try:
        sinks, stdout = build_sinks(config, env)
        writer = OrderedWriter(format_row, fields, sinks)
        for sink in sinks:
            sink.open(header)
            opened.append(sink)
        if not is_privileged():
            env.say(NOT_PRIVILEGED_NOTICE)  # netstat's own words, without our prefix
        hasher = ExecutableHasher() if config.hashes else None
        poller = Poller(PsutilSource(), ConnectionTracker(), ProcessCache(hasher))
        _poll_forever(config, env, poller, writer, sinks, stdout, hangup)
    except (KeyboardInterrupt, Terminated):
        if opened and len(opened) == len(sinks):
            _drain(writer, stdout)
    except ReaderGone:
        stdout.discard()
        _drain(writer, None)  # the log still gets what was found
    except SinkError as exc:
        env.notice(str(exc))
        return EXIT_RUNTIME_ERROR
    except SourceAccessDenied:
        env.notice("the system refused to list connections; run as root (sudo histstat)")
        return EXIT_RUNTIME_ERROR
    finally:
        if hasher is not None:
            hasher.close()
        for sink in opened:
            try:
                sink.close()
            except (SinkError, ReaderGone):
                pass
        _restore_signals(previous_handlers)
    return EXIT_OK


def _drain(writer: OrderedWriter, stdout: StdoutSink | None) -> None:
    """At the end, write what was found but still waits for its hashes, without
    letting a stalled stdout reader hold histstat."""
    if stdout is not None:
        stdout.stop_blocking()
    try:
        writer.write_ready(time.monotonic() + MAX_HASH_WAIT)
        writer.write_ready(time.monotonic(), final=True)  # still waiting: hashes unknown
    except (KeyboardInterrupt, Terminated, ReaderGone, SinkError):
        pass
    finally:
        if stdout is not None:
            stdout.finish()


def _poll_forever(config, env, poller, writer, sinks, stdout, hangup) -> None:
    last_slow_notice = -math.inf
    while True:
        if hangup.requested:
            hangup.requested = False
            for sink in sinks:
                sink.reopen()
        started = time.monotonic()
        writer.add(poller.poll())
        took = time.monotonic() - started
        if took > config.interval and started - last_slow_notice >= SLOW_POLL_NOTICE_EVERY:
            last_slow_notice = started
            env.notice(
                f"a poll took {took:.2f} s, longer than the {config.interval:g} s "
                "interval: connections that lived between polls may be missed"
            )
        next_poll = started + config.interval
        writer.write_ready(next_poll)
        if stdout is not None and reader_gone(env.stdout):
            raise ReaderGone()
        _sleep_until(next_poll, env, stdout)


def _sleep_until(deadline: float, env: Environment, stdout: StdoutSink | None) -> None:
    """Sleep in slices of at most a second, so a closed pipe ends histstat promptly even
    with a long interval (and a huge interval cannot overflow time.sleep)."""
    while True:
        pause = deadline - time.monotonic()
        if pause <= 0:
            return
        time.sleep(min(pause, 1.0))
        if stdout is not None and reader_gone(env.stdout):
            raise ReaderGone()


def main(argv: list | None = None, env: Environment | None = None) -> int:
    config = parse_config(argv)
    return run(config, env or Environment.from_sys())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Command line: arguments into one configuration, the poll loop, signals and exit codes."""

from __future__ import annotations

import argparse
import functools
import math
import os
import re
import signal
import sys
import time
from dataclasses import dataclass

from histstat import __version__
from histstat.database import SqliteSink, row_values
from histstat.enrich import ProcessCache
from histstat.environment import Environment, reader_gone
from histstat.filters import (
    STATUSES,
    FilterValueError,
    RowFilter,
    parse_names,
    parse_networks,
    parse_pids,
    parse_ports,
    parse_statuses,
    protocols,
)
from histstat.format import (
    ALL_FIELDS,
    GEO_FIELDS,
    HASH_FIELDS,
    Screen,
    csv_header,
    format_csv_row,
    format_json_row,
    format_plain_row,
    format_pretty_row,
    json_fields,
    plain_header,
    pretty_header,
    text_fields,
)
from histstat.geoip import GeoIP, GeoIPError
from histstat.hashing import ExecutableHasher
from histstat.pipeline import MAX_HASH_WAIT, OrderedWriter, Poller
from histstat.privileges import NOT_PRIVILEGED_NOTICE, is_privileged
from histstat.records import Row
from histstat.resolve import ReverseResolver
from histstat.sinks import LogSink, ReaderGone, SinkError, StdoutSink
from histstat.source import PsutilSource, SourceAccessDenied
from histstat.tracker import ConnectionTracker

EXIT_OK, EXIT_RUNTIME_ERROR, EXIT_USAGE = 0, 1, 2
SLOW_POLL_NOTICE_EVERY = 60.0  # seconds between two "poll slower than interval" notices

# output: (row formatter, header or None, default fields, line ending, takes colour)
FORMATS = {
    "plain": (format_plain_row, plain_header, text_fields, "\n", True),
    "pretty": (format_pretty_row, pretty_header, text_fields, "\n", True),
    "json": (format_json_row, None, json_fields, "\n", False),
    "csv": (format_csv_row, csv_header, text_fields, "\r\n", False),  # RFC 4180
}


@dataclass(frozen=True)
class Config:
    interval: float
    log: str | None
    output: str  # plain, pretty, json or csv
    quiet: bool
    hashes: bool
    fields: tuple = ()
    row_filter: RowFilter = RowFilter()
    sqlite: str | None = None
    arguments: tuple = ()  # the command line, for the database's runs table
    once: bool = False
    count: int | None = None
    duration: float | None = None
    color: str = "auto"
    closed: bool = False
    resolve: bool = False
    geoip: tuple = ()  # paths of MaxMind databases
    source: str = "psutil"  # psutil or linux


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


def positive_count(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) == 0:
        raise argparse.ArgumentTypeError(f"must be a whole number of rows above 0, not {text!r}")
    return int(text)


def _list_of(parse):
    """An argparse type from a filter parser: its message becomes the usage error."""

    @functools.wraps(parse)
    def parse_or_refuse(text: str):
        try:
            return parse(text)
        except FilterValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse_or_refuse


def parse_fields(text: str) -> tuple:
    fields = tuple(item.strip() for item in text.split(","))
    for field in fields:
        if field not in ALL_FIELDS:
            raise FilterValueError(f"unknown field {field!r} (choose from {', '.join(ALL_FIELDS)})")
    repeated = sorted({field for field in fields if fields.count(field) > 1})
    if repeated:
        raise FilterValueError(f"field listed twice: {', '.join(repeated)}")
    return fields


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
    style.add_argument(
        "--csv", action="store_true", help="RFC 4180 CSV with a header, safe for spreadsheets"
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="nothing on stdout (needs --log or --sqlite)"
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

    parser.add_argument(
        "--sqlite",
        metavar="FILE",
        help="also write every row into the SQLite database FILE (created 0600, WAL mode, "
        "one transaction per poll; schema in the README)",
    )

    parser.add_argument(
        "--source",
        choices=("auto", "psutil", "linux"),
        default=os.environ.get("HISTSTAT_SOURCE") or "auto",
        help="where the socket table comes from: linux reads the kernel's tables and maps "
        "sockets to processes incrementally (fast); psutil is portable (the reference); "
        "auto: linux on Linux, psutil elsewhere (default: $HISTSTAT_SOURCE, else auto)",
    )

    story = parser.add_argument_group("connection story")
    story.add_argument(
        "--closed",
        action="store_true",
        help="also write a row when a connection goes away: event close, with its "
        "duration (a '>' marks one that predates histstat)",
    )
    story.add_argument(
        "-r",
        "--resolve",
        action="store_true",
        help="reverse DNS of the remote address into rhost (sends PTR queries the remote "
        "network's owner can see; the address always stays in raddr)",
    )
    story.add_argument(
        "--geoip",
        metavar="FILE",
        action="append",
        default=[],
        help="MaxMind database for country, asn and as_org of the remote address; "
        "repeat for country and ASN files (needs: pip install 'histstat[geoip]')",
    )

    shown = parser.add_argument_group("fields and formats")
    shown.add_argument(
        "-f",
        "--fields",
        type=_list_of(parse_fields),
        metavar="LIST",
        help="columns (text, CSV) or keys (JSON) to show, in order, from: "
        + ", ".join(ALL_FIELDS)
        + "; md5 or sha256 turn hashing on",
    )
    shown.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help="colour the status column of text output (auto: on a terminal, unless "
        "NO_COLOR is set); logs never get colour",
    )

    capture = parser.add_argument_group("capture limits")
    capture.add_argument(
        "--once", action="store_true", help="print the current table once and exit"
    )
    capture.add_argument(
        "-c", "--count", type=positive_count, metavar="N", help="stop after N rows"
    )
    capture.add_argument(
        "--duration", type=positive_seconds, metavar="SECONDS", help="stop after SECONDS"
    )

    narrow = parser.add_argument_group(
        "filters",
        "LIST is comma-separated; a row must match every option given and, within one "
        "option, any item of its list",
    )
    narrow.add_argument("--tcp", action="store_true", help="TCP only (with --udp: both)")
    narrow.add_argument("--udp", action="store_true", help="UDP only (with --tcp: both)")
    narrow.add_argument("-4", dest="ipv4", action="store_true", help="IPv4 only (with -6: both)")
    narrow.add_argument("-6", dest="ipv6", action="store_true", help="IPv6 only (with -4: both)")
    ports = _list_of(parse_ports)
    narrow.add_argument(
        "--port", type=ports, metavar="LIST", help="local or remote port: 22,8000-8100"
    )
    narrow.add_argument("--lport", type=ports, metavar="LIST", help="local port")
    narrow.add_argument("--rport", type=ports, metavar="LIST", help="remote port")
    networks = _list_of(parse_networks)
    narrow.add_argument(
        "--laddr", type=networks, metavar="LIST", help="local address or CIDR network, v4 or v6"
    )
    narrow.add_argument(
        "--raddr", type=networks, metavar="LIST", help="remote address or CIDR network"
    )
    narrow.add_argument("--pid", type=_list_of(parse_pids), metavar="LIST", help="process id")
    narrow.add_argument(
        "--name", type=_list_of(parse_names), metavar="LIST",
        help="process name, exact or shell-style glob ('python*')",
    )  # fmt: skip
    narrow.add_argument("--user", type=_list_of(parse_names), metavar="LIST", help="user name")
    statuses = _list_of(parse_statuses)
    status_help = f"TCP state, any case: {', '.join(STATUSES)} (NONE: stateless UDP)"
    narrow.add_argument("--status", type=statuses, metavar="LIST", help=status_help)
    narrow.add_argument(
        "--exclude-status", type=statuses, metavar="LIST", help="leave out these states"
    )
    return parser


_NEGATIVE_NUMBER = re.compile(r"^-\.?\d")


def _refuse_negative_values(parser: argparse.ArgumentParser, argv: list) -> None:
    """With -4 and -6 defined, argparse reads '-1' as an option and says only "expected
    one argument"; check such values with the option's own type, to name them."""
    takes_value = {
        option: action
        for action in parser._actions
        if action.nargs is None and action.type is not None
        for option in action.option_strings
    }
    for option, value in zip(argv, argv[1:]):
        if option == "--":
            return
        action = takes_value.get(option)
        if action is not None and _NEGATIVE_NUMBER.match(value):
            try:
                action.type(value)
            except argparse.ArgumentTypeError as exc:
                parser.error(f"argument {'/'.join(action.option_strings)}: {exc}")


def _source_name(parser: argparse.ArgumentParser, asked: str) -> str:
    if asked not in ("auto", "psutil", "linux"):  # from $HISTSTAT_SOURCE, unchecked
        parser.error(f"HISTSTAT_SOURCE: invalid choice {asked!r} (choose from auto, psutil, linux)")
    on_linux = sys.platform.startswith("linux")
    if asked == "linux" and not on_linux:
        parser.error("argument --source: linux is only available on Linux")
    if asked == "auto":
        return "linux" if on_linux else "psutil"
    return asked


def make_source(name: str, protos: frozenset | None = None):
    """The source of snapshots, reading only the protocols' tables (--tcp, -4, ...);
    the Linux one is imported only where it can run."""
    if name == "linux":
        from histstat.source_linux import LinuxSource

        return LinuxSource(protos=protos)
    return PsutilSource(protos)


def parse_config(argv: list | None = None) -> Config:
    parser = get_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    _refuse_negative_values(parser, argv)
    args = parser.parse_args(argv)
    if args.log == "":
        parser.error("argument -l/--log: needs a file name")
    if "" in args.geoip:
        parser.error("argument --geoip: needs a file name")
    if args.fields and set(args.fields) & set(GEO_FIELDS) and not args.geoip:
        parser.error("-f asks for country, asn or as_org: add --geoip FILE")
    if args.sqlite == "":
        parser.error("argument --sqlite: needs a file name")
    if args.quiet and not (args.log or args.sqlite):
        parser.error("-q/--quiet needs a file to write to: add -l/--log FILE or --sqlite FILE")
    output = next(
        (name for name, on in (("json", args.json), ("pretty", args.prettify), ("csv", args.csv))
         if on),
        "plain",
    )  # fmt: skip
    hashes = args.hash or bool(args.fields and set(args.fields) & set(HASH_FIELDS))
    default_fields = FORMATS[output][2]
    return Config(
        interval=args.interval,
        log=args.log,
        output=output,
        quiet=args.quiet,
        hashes=hashes,
        fields=args.fields
        or default_fields(args.hash, args.closed, args.resolve, bool(args.geoip)),
        row_filter=RowFilter(
            protos=protocols(args.tcp, args.udp, args.ipv4, args.ipv6),
            ports=args.port,
            lports=args.lport,
            rports=args.rport,
            laddrs=args.laddr,
            raddrs=args.raddr,
            pids=args.pid,
            statuses=args.status,
            excluded_statuses=args.exclude_status or frozenset(),
            names=args.name,
            users=frozenset(args.user) if args.user else None,
        ),
        sqlite=args.sqlite,
        arguments=tuple(argv),
        once=args.once,
        count=args.count,
        duration=args.duration,
        color=args.color,
        closed=args.closed,
        resolve=args.resolve or bool(args.fields and "rhost" in args.fields),
        geoip=tuple(args.geoip),
        source=_source_name(parser, args.source),
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


def use_color(config: Config, env: Environment) -> bool:
    if not FORMATS[config.output][4] or config.color == "never":
        return False
    return config.color == "always" or (env.stdout_isatty and not env.no_color)


def build_outputs(config: Config, env: Environment) -> tuple:
    """([(view, sink, header)] with files first, the stdout sink or None).

    Files always get the whole line without colour; only a terminal's view is fitted
    to its width and coloured.
    """
    format_row, header_of, _, newline, _ = FORMATS[config.output]
    fields = config.fields
    plain_view = functools.partial(format_row, fields=fields)
    header = header_of(fields) if header_of else None
    outputs: list = []
    if config.log:
        outputs.append((plain_view, LogSink(config.log, env.notice, newline), header))
    if config.sqlite:
        database = SqliteSink(config.sqlite, list(config.arguments), env.notice)
        outputs.append((row_values, database, None))
    stdout = None
    if not config.quiet:
        if env.stdout is None:
            raise SinkError("stdout is closed: give it somewhere to go, or use -q with -l FILE")
        # Data formats are UTF-8 whatever the terminal: jq, collectors and spreadsheet
        # imports read nothing else; text for people follows the terminal.
        encoding = "utf-8" if config.output in ("json", "csv") else env.stdout_encoding
        stdout = StdoutSink(env.stdout, encoding, newline)
        view, stdout_header = plain_view, header
        color = use_color(config, env)
        if config.output == "pretty" and env.stdout_isatty:

            def screen() -> Screen | None:
                width = env.terminal_width()  # asked each time: terminals are resized
                return Screen(width, encoding) if width else None

            def view(row: Row) -> str:
                return format_pretty_row(row, fields, screen(), color)

            stdout_header = pretty_header(fields, screen())
        elif color:
            view = functools.partial(format_row, fields=fields, color=True)
        outputs.append((view, stdout, stdout_header))
    return outputs, stdout


def run(config: Config, env: Environment) -> int:
    hangup = _Hangup()
    previous_handlers = _install_signals(hangup)  # first: a SIGTERM at start-up ends quietly too
    hasher = resolver = geoip = None
    opened: list = []
    stdout = None
    outputs: list = []
    try:
        # Databases first: a bad one must leave no header, log or run behind.
        geoip = GeoIP(list(config.geoip)) if config.geoip else None
        outputs, stdout = build_outputs(config, env)
        writer = OrderedWriter([(view, sink) for view, sink, _ in outputs], config.count)
        for _, sink, header in outputs:
            sink.open(header)
            opened.append(sink)
        if not is_privileged():
            env.say(NOT_PRIVILEGED_NOTICE)  # netstat's own words, without our prefix
        hasher = ExecutableHasher() if config.hashes else None
        resolver = ReverseResolver() if config.resolve else None
        poller = Poller(
            make_source(config.source, config.row_filter.protos),
            ConnectionTracker(),
            ProcessCache(hasher),
            config.row_filter,
            closed=config.closed,
            resolver=resolver,
            geoip=geoip,
        )
        _poll_until_done(config, env, poller, writer, opened, stdout, hangup)
        _write_the_rest(writer)  # a normal end: the reader is expected to read on
    except (KeyboardInterrupt, Terminated):
        if opened and len(opened) == len(outputs):
            _drain(writer, stdout)
    except ReaderGone:
        stdout.discard()
        _drain(writer, None)  # the log still gets what was found
    except SinkError as exc:
        env.notice(str(exc))
        return EXIT_RUNTIME_ERROR
    except GeoIPError as exc:
        env.notice(str(exc))
        return EXIT_RUNTIME_ERROR
    except SourceAccessDenied:
        env.notice("the system refused to list connections; run as root (sudo histstat)")
        return EXIT_RUNTIME_ERROR
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
    return EXIT_OK


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


def _poll_until_done(config, env, poller, writer, sinks, stdout, hangup) -> None:
    """Poll until --once, --count or --duration says enough (or forever)."""
    ends = time.monotonic() + config.duration if config.duration else math.inf
    last_slow_notice = -math.inf
    first = True
    while True:
        if hangup.requested:
            hangup.requested = False
            for sink in sinks:
                sink.reopen()
        started = time.monotonic()
        writer.add(poller.poll())
        took = time.monotonic() - started
        if config.once:
            return
        # The first poll reads every process from cold and leaves no gap behind it:
        # only later polls can hide a connection between them.
        slow = took > config.interval and not first
        first = False
        if slow and started - last_slow_notice >= SLOW_POLL_NOTICE_EVERY:
            last_slow_notice = started
            env.notice(
                f"a poll took {took:.2f} s, longer than the {config.interval:g} s "
                "interval: connections that lived between polls may be missed"
            )
        next_poll = min(started + config.interval, ends)
        writer.write_ready(next_poll)
        if writer.done:
            return
        if stdout is not None and reader_gone(env.stdout):
            raise ReaderGone()
        _sleep_until(next_poll, env, stdout)
        if time.monotonic() >= ends:
            return


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

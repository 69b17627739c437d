"""Command line: the parser, and arguments into one immutable Config."""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any, Callable, NoReturn

from histstat import __version__
from histstat.completions import SCRIPTS, PrintCompletion, completes_files
from histstat.config import KERNEL_EVENTS, Config
from histstat.enrich import COMMAND_LIMIT, COMMAND_MARKER
from histstat.filters import (
    STATUSES,
    RowFilter,
    parse_containers,
    parse_names,
    parse_namespaces,
    parse_networks,
    parse_pids,
    parse_ports,
    parse_statuses,
    protocols,
)
from histstat.option_values import (
    byte_size,
    command_limit,
    interval_seconds,
    list_of,
    parse_fields,
    positive_count,
    positive_seconds,
)
from histstat.output import FORMATS
from histstat.output.ecs import ECS_VERSION
from histstat.output.format import ALL_FIELDS, GEO_FIELDS, HASH_FIELDS
from histstat.output.syslog import (
    DEFAULT_FACILITY,
    DEFAULT_SIZE,
    DEFAULT_SOCKET,
    FACILITIES,
    MAX_SIZE,
    MIN_SIZE,
)
from histstat.sources import SOURCE_NAMES, UnknownSource, resolve_source_name

EXIT_USAGE = 2  # argparse's own convention


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # option → (its names as argparse joins them, its type), for every option that
        # takes a typed value: values that look like negative numbers are checked with it
        self.value_types: dict[str, tuple[str, Callable[[str], Any]]] = {}

    def remember(self, action: argparse.Action) -> argparse.Action:
        if action.type is not None and callable(action.type):
            for flag in action.option_strings:
                self.value_types[flag] = ("/".join(action.option_strings), action.type)
        return action

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        return self.remember(super().add_argument(*args, **kwargs))

    def option_group(self, *args: Any, **kwargs: Any) -> _Group:
        """An argument group (argparse's own) whose options are remembered too."""
        return _Group(self, self.add_argument_group(*args, **kwargs))

    def error(self, message: str) -> NoReturn:
        """Usage errors in one line (exit 2), pointing at --help instead of a usage dump."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class _Group:
    """An argument group whose options the parser remembers, as its own."""

    def __init__(self, parser: _Parser, group: Any) -> None:
        self._parser = parser
        self._group = group

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        return self._parser.remember(self._group.add_argument(*args, **kwargs))


def get_parser() -> _Parser:
    parser = _Parser(
        prog="histstat",
        description="History for netstat: show network connections as they occur, "
        "with when each was first seen, its process, user and full command line.",
        epilog="Plain and CSV columns: proto laddr lport raddr rport status pid pname time date "
        "user command ('-' unknown, '*' no remote end); --hash adds md5 and sha256 "
        "before command. Rows hold other users' command lines: logs are created 0600. "
        "Exit status: 0 normal end (Ctrl-C, SIGTERM, closed pipe), 1 runtime error, "
        "2 usage error.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "-i",
        "--interval",
        type=interval_seconds,
        default=1.0,
        metavar="SECONDS",
        help="seconds between polls, at least 0.01 (default: 1); connections shorter than "
        "this may be missed",
    )
    log = parser.add_argument(
        "-l",
        "--log",
        metavar="FILE",
        help="also append every row to FILE, in the output format; created 0600, "
        "header only when empty, reopened on SIGHUP",
    )
    completes_files(log)
    style = parser.add_mutually_exclusive_group()
    style.add_argument(
        "-p",
        "--prettify",
        action="store_true",
        help="aligned columns for people: time proto local remote status pid pname user "
        "command, with address:port joined; on a terminal the command is cut to fit",
    )
    style.add_argument("-j", "--json", action="store_true", help="NDJSON: one JSON object per line")
    style.add_argument(
        "--csv", action="store_true", help="RFC 4180 CSV with a header, safe for spreadsheets"
    )
    style.add_argument(
        "--ecs",
        action="store_true",
        help=f"NDJSON documents in the Elastic Common Schema (ECS {ECS_VERSION}), for "
        "Elasticsearch and OpenSearch: source is the end that opened the connection, "
        "with a Community ID; not with -f (docs/ecs.md)",
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="nothing on stdout (needs --log, --sqlite or --syslog)",
    )
    parser.add_argument(
        "-v",
        "--version",
        action="version",
        version=f"histstat {__version__}",
        help="print the version and exit",
    )
    parser.add_argument(
        "--print-completion",
        action=PrintCompletion,
        choices=tuple(SCRIPTS),
        metavar="SHELL",
        help="print the completion script for SHELL (bash or zsh) and exit: "
        "source <(histstat --print-completion bash)",
    )
    parser.add_argument(
        "--hash",
        action="store_true",
        help="add md5 and sha256 of each process's executable (JSON also gets exe)",
    )

    sqlite = parser.add_argument(
        "--sqlite",
        metavar="FILE",
        help="also write every row into the SQLite database FILE (created 0600, WAL mode, "
        "committed before stdout shows its rows; schema in docs/sqlite.md)",
    )
    completes_files(sqlite)

    fleet = parser.option_group("syslog")
    syslog = fleet.add_argument(
        "--syslog",
        nargs="?",
        const=DEFAULT_SOCKET,
        metavar="PATH",
        help=f"also send every row, in the output format, to the local syslog socket "
        f"(default: {DEFAULT_SOCKET}) as syslog(3) does: one datagram, app-name histstat, "
        "severity info; a full or vanished socket drops the row for syslog only, never "
        "holding the poll back (see docs/fleet.md)",
    )
    completes_files(syslog)
    fleet.add_argument(
        "--syslog-facility",
        choices=tuple(FACILITIES),
        metavar="NAME",
        help=f"the facility of --syslog's records: {', '.join(FACILITIES)} "
        f"(default: {DEFAULT_FACILITY})",
    )
    fleet.add_argument(
        "--syslog-size",
        type=byte_size(MIN_SIZE, MAX_SIZE),
        metavar="BYTES",
        help=f"the longest --syslog record, header included, from {MIN_SIZE} to {MAX_SIZE} "
        f"(default: {DEFAULT_SIZE}, what rsyslog takes by default): a longer row's command "
        "line is shortened, with --command-limit's marker, so a JSON row stays whole",
    )

    parser.add_argument(
        "--source",
        choices=SOURCE_NAMES,
        default=os.environ.get("HISTSTAT_SOURCE") or "auto",
        help="where the socket table comes from: linux reads the kernel's tables and maps "
        "sockets to processes incrementally (fast); psutil is portable (the reference); "
        "auto: linux on Linux, psutil elsewhere (default: $HISTSTAT_SOURCE, else auto)",
    )

    parser.add_argument(
        "--kernel-events",
        choices=KERNEL_EVENTS,
        default="auto",
        help="events from the kernel beside the poll (the linux source only): destroy "
        "broadcasts tell each connection's end, and as root connect events (tracefs) "
        "attribute connections too short for any poll and show failed connects; auto: "
        "what this run can have, with a notice for what it cannot; on: exit 1 when connect "
        "events cannot be had; off: polling alone (default: auto)",
    )

    story = parser.option_group("connection story")
    story.add_argument(
        "--closed",
        action="store_true",
        help="also write one row when a connection ends: event close, with its last state, "
        "its duration (a '>' marks one that predates histstat) and, where the kernel says "
        "(Linux end events), its payload bytes",
    )
    story.add_argument(
        "--transitions",
        action="store_true",
        help="also write a row when a connection changes state: event state, with the new "
        "status (the FIN_WAIT2 and TIME_WAIT the kernel keeps after the end included)",
    )
    story.add_argument(
        "--update",
        type=positive_seconds,
        metavar="SECONDS",
        help="every SECONDS, write a row for each live TCP connection: event update, with "
        "its payload bytes so far where the source gives them (the Linux source)",
    )
    story.add_argument(
        "-r",
        "--resolve",
        action="store_true",
        help="reverse DNS of the remote address into rhost (sends PTR queries the remote "
        "network's owner can see; the address always stays in raddr)",
    )
    geoip = story.add_argument(
        "--geoip",
        metavar="FILE",
        action="append",
        default=[],
        help="MaxMind database for country, asn and as_org of the remote address; "
        "repeat for country and ASN files (needs the maxminddb package: "
        "pip install '.[geoip]' in histstat's checkout)",
    )
    completes_files(geoip)

    shown = parser.option_group("fields and formats")
    shown.add_argument(
        "-f",
        "--fields",
        type=list_of(parse_fields),
        metavar="LIST",
        help="columns (text, CSV) or keys (JSON) to show, in order, from: "
        + ", ".join(ALL_FIELDS)
        + "; md5 or sha256 turn hashing on",
    )
    shown.add_argument(
"--command-limit",
        type=command_limit,
        default=COMMAND_LIMIT,
        metavar="CHARS",
        help=f"cut command lines longer than CHARS characters (default: {COMMAND_LIMIT}; 0: "
        f"never), in every format and sink; a cut one ends with "
        f"'{COMMAND_MARKER.format(removed='N')}' (N characters left out), and "
        "command_length (JSON, SQLite, -f) gives its whole length"
    )  # fmt: skip
    shown.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help="colour the status column of text output (auto: on a terminal, unless "
        "NO_COLOR is set); logs never get colour",
    )

    capture = parser.option_group("capture limits")
    capture.add_argument(
        "--once", action="store_true", help="print the current table once and exit"
    )
    capture.add_argument(
        "-c", "--count", type=positive_count, metavar="N", help="stop after N rows"
    )
    capture.add_argument(
        "--duration", type=positive_seconds, metavar="SECONDS", help="stop after SECONDS"
    )
    capture.add_argument(
        "--skip-existing",
        action="store_true",
        help="no rows, open or close, for the connections already there at the first poll, "
        "nor for their later states: only what happens from then on (not with --once)",
    )

    narrow = parser.option_group(
        "filters",
        "LIST is comma-separated; a row must match every option given and, within one "
        "option, any item of its list",
    )
    narrow.add_argument("--tcp", action="store_true", help="TCP only (with --udp: both)")
    narrow.add_argument("--udp", action="store_true", help="UDP only (with --tcp: both)")
    narrow.add_argument("-4", dest="ipv4", action="store_true", help="IPv4 only (with -6: both)")
    narrow.add_argument("-6", dest="ipv6", action="store_true", help="IPv6 only (with -4: both)")
    ports = list_of(parse_ports)
    narrow.add_argument(
        "--port", type=ports, metavar="LIST", help="local or remote port: 22,8000-8100"
    )
    narrow.add_argument("--lport", type=ports, metavar="LIST", help="local port")
    narrow.add_argument("--rport", type=ports, metavar="LIST", help="remote port")
    networks = list_of(parse_networks)
    narrow.add_argument(
        "--laddr", type=networks, metavar="LIST", help="local address or CIDR network, v4 or v6"
    )
    narrow.add_argument(
        "--raddr", type=networks, metavar="LIST", help="remote address or CIDR network"
    )
    narrow.add_argument("--pid", type=list_of(parse_pids), metavar="LIST", help="process id")
    narrow.add_argument(
        "--name", type=list_of(parse_names), metavar="LIST",
        help="process name, exact or shell-style glob ('python*')"
    )  # fmt: skip
    narrow.add_argument("--user", type=list_of(parse_names), metavar="LIST", help="user name")
    narrow.add_argument(
        "--netns", type=list_of(parse_namespaces), metavar="LIST",
        help="network namespace inode, as readlink /proc/PID/ns/net shows it: 4026531840 or "
        "net:[4026531840] (Linux; other namespaces need the linux source)",
    )  # fmt: skip
    narrow.add_argument(
        "--container", type=list_of(parse_containers), metavar="LIST",
        help="the owning process's container (Linux): its full id, a prefix of at least 12 "
        "characters, or a machine's name (systemd-nspawn)",
    )  # fmt: skip
    statuses = list_of(parse_statuses)
    status_help = f"TCP state, any case: {', '.join(STATUSES)} (NONE: stateless UDP)"
    narrow.add_argument("--status", type=statuses, metavar="LIST", help=status_help)
    narrow.add_argument(
        "--exclude-status", type=statuses, metavar="LIST", help="leave out these states"
    )
    return parser


_NEGATIVE_NUMBER = re.compile(r"^-\.?\d")


def _refuse_negative_values(parser: _Parser, argv: list[str]) -> None:
    """With -4 and -6 defined, argparse reads '-1' as an option and says only "expected
    one argument"; check such values with the option's own type, to name them."""
    for option, value in zip(argv, argv[1:]):
        if option == "--":
            return
        known = parser.value_types.get(option)
        if known is not None and _NEGATIVE_NUMBER.match(value):
            names, check = known
            try:
                check(value)
            except argparse.ArgumentTypeError as exc:
                parser.error(f"argument {names}: {exc}")


def _source_name(parser: _Parser, asked: str, from_environment: bool) -> str:
    try:
        return resolve_source_name(asked)
    except UnknownSource as exc:
        parser.error(f"{'HISTSTAT_SOURCE' if from_environment else 'argument --source'}: {exc}")


def _story_rows(args: argparse.Namespace) -> bool:
    """Whether rows other than open rows are written: then the event column shows."""
    return bool(args.closed or args.transitions or args.update)


def _byte_rows(args: argparse.Namespace) -> bool:
    """Whether rows that carry bytes (close, update) are written."""
    return bool(args.closed or args.update)


def parse_config(argv: list[str] | None = None) -> Config:
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
    if args.syslog == "":
        parser.error("argument --syslog: needs a socket path (or none, for /dev/log)")
    if args.syslog is None and (args.syslog_facility or args.syslog_size):
        option = "--syslog-facility" if args.syslog_facility else "--syslog-size"
        parser.error(f"{option} is for --syslog: add --syslog")
    if args.quiet and not (args.log or args.sqlite or args.syslog):
        parser.error(
            "-q/--quiet needs somewhere to write to: add -l/--log FILE, --sqlite FILE or --syslog"
        )
    if args.skip_existing and args.once:
        parser.error("--skip-existing leaves out all that --once would show: use one of them")
    for option, given in (("--transitions", args.transitions), ("--update", args.update)):
        if given and args.once:
            parser.error(f"{option} shows what changes between polls, and --once polls once")
    if args.fields and args.ecs:
        parser.error("-f/--fields does not apply to --ecs: its documents have ECS's shape")
    source = _source_name(parser, args.source, args.source not in SOURCE_NAMES)
    if source == "psutil" and args.kernel_events == "on":
        parser.error("--kernel-events on needs the linux source: psutil only polls")
    chosen = (("json", args.json), ("pretty", args.prettify), ("csv", args.csv),
              ("ecs", args.ecs))  # fmt: skip
    output = next((name for name, on in chosen if on), "plain")
    hashes = args.hash or bool(args.fields and set(args.fields) & set(HASH_FIELDS))
    default_fields = FORMATS[output].default_fields
    return Config(
        interval=args.interval,
        log=args.log,
        output=output,
        quiet=args.quiet,
        hashes=hashes,
        fields=args.fields
        or default_fields(
            args.hash, _story_rows(args), args.resolve, bool(args.geoip), _byte_rows(args)
        ),
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
            namespaces=args.netns,
            containers=args.container,
        ),
        sqlite=args.sqlite,
        arguments=tuple(argv),
        once=args.once,
        count=args.count,
        duration=args.duration,
        color=args.color,
        closed=args.closed,
        transitions=args.transitions,
        update=args.update,
        skip_existing=args.skip_existing,
        resolve=args.resolve or bool(args.fields and "rhost" in args.fields),
        geoip=tuple(args.geoip),
        source=source,
        kernel_events=args.kernel_events,
        command_limit=args.command_limit,
        syslog=args.syslog,
        syslog_facility=args.syslog_facility or DEFAULT_FACILITY,
        syslog_size=args.syslog_size or DEFAULT_SIZE,
    )

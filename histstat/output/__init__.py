"""Output: the formats a row can take, and the sinks they go to, wired from a Config."""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

from histstat.config import Config
from histstat.environment import Environment
from histstat.output.base import ReaderGone, Sink, SinkError
from histstat.output.ecs import ecs_fields, format_ecs_row
from histstat.output.format import (
    csv_header,
    format_csv_row,
    format_json_row,
    format_plain_row,
    json_fields,
    plain_header,
    text_fields,
)
from histstat.output.pretty import PrettyView, format_pretty_row, pretty_fields, pretty_header
from histstat.output.sinks import LogSink, StdoutSink
from histstat.output.sqlite import SqliteSink, row_values
from histstat.output.syslog import MessageFitter, SyslogSink
from histstat.records import Row

__all__ = ["FORMATS", "Output", "OutputFormat", "ReaderGone", "Sink", "SinkError", "build_outputs"]


class OutputFormat(NamedTuple):
    """One of the formats a row can be written in. The pretty format's rows depend on
    the rows before them (its widths grow): build_outputs gives each stream its own
    ``PrettyView``, and its ``format_row`` here shows a row as a new view would."""

    format_row: Callable[..., str]  # (row, fields) -> one line
    header: Callable[..., str] | None  # (fields) -> the header line; None: no header
    default_fields: Callable[..., tuple[str, ...]]  # (hashes, closed, resolve, geoip)
    newline: str
    takes_color: bool


FORMATS = {
    "plain": OutputFormat(format_plain_row, plain_header, text_fields, "\n", True),
    "pretty": OutputFormat(format_pretty_row, pretty_header, pretty_fields, "\n", True),
    "json": OutputFormat(format_json_row, None, json_fields, "\n", False),
    "csv": OutputFormat(format_csv_row, csv_header, text_fields, "\r\n", False),  # RFC 4180
    "ecs": OutputFormat(format_ecs_row, None, ecs_fields, "\n", False),
}
# The formats programs read: UTF-8 whatever the terminal.
DATA_FORMATS = ("json", "csv", "ecs")


class Output(NamedTuple):
    """A sink, the view that turns a row into what it takes, and its header."""

    view: Callable[[Row], Any]
    sink: Sink
    header: str | None


def use_color(config: Config, env: Environment) -> bool:
    if not FORMATS[config.output].takes_color or config.color == "never":
        return False
    return config.color == "always" or (env.stdout_isatty and not env.no_color)


def build_outputs(config: Config, env: Environment) -> tuple[list[Output], StdoutSink | None]:
    """(the outputs with files first, the stdout sink or None), each file (and the
    syslog socket) checked (``Sink.check``) before the caller opens any.

    Files always get the whole line without colour; only a terminal's view is fitted
    to its width and coloured.
    """
    chosen = FORMATS[config.output]
    fields = config.fields
    pretty = config.output == "pretty"
    file_view: Callable[[Row], Any]
    header: str | None
    if pretty:
        # A pretty view remembers the widths seen so far: each stream owns one.
        file_pretty = PrettyView(fields)
        file_view, header = file_pretty.format_row, file_pretty.header()
    else:
        file_view = functools.partial(chosen.format_row, fields=fields)
        header = chosen.header(fields) if chosen.header else None
    outputs: list[Output] = []
    # The database first: it is refused for its contents only once open, and must then
    # leave no log header behind.
    if config.sqlite:
        database = SqliteSink(config.sqlite, list(config.arguments), env.notice)
        outputs.append(Output(row_values, database, None))
    if config.log:
        outputs.append(Output(file_view, LogSink(config.log, env.notice, chosen.newline), header))
    if config.syslog:
        syslog = SyslogSink(config.syslog, config.syslog_facility, config.syslog_size, env.notice)
        # The message is the row as the chosen format writes it, whatever that is; a
        # pretty row gets widths of its own, not the log's.
        row_view = PrettyView(fields).format_row if pretty else file_view
        outputs.append(Output(MessageFitter(row_view, syslog.message_budget), syslog, None))
    for output in outputs:
        output.sink.check()  # every file checked before any is made
    stdout = None
    if not config.quiet:
        if env.stdout is None:
            raise SinkError("stdout is closed: give it somewhere to go, or use -q with -l FILE")
        # Data formats are UTF-8 whatever the terminal: jq, collectors and spreadsheet
        # imports read nothing else; text for people follows the terminal.
        encoding = "utf-8" if config.output in DATA_FORMATS else env.stdout_encoding
        stdout = StdoutSink(env.stdout, encoding, chosen.newline)
        view: Callable[[Row], Any] = file_view
        stdout_header = header
        color = use_color(config, env)
        if pretty and (env.stdout_isatty or color or encoding != "utf-8"):
            stdout_pretty = PrettyView(fields, encoding)
            if env.stdout_isatty:

                def fitted(row: Row) -> str:
                    # Asked each time: terminals are resized. None: a size never set.
                    return stdout_pretty.format_row(row, env.terminal_width(), color)

                view = fitted
                stdout_header = stdout_pretty.header(env.terminal_width())
            else:
                view = functools.partial(stdout_pretty.format_row, color=color)
                stdout_header = stdout_pretty.header()
        elif color:
            view = functools.partial(chosen.format_row, fields=fields, color=True)
        outputs.append(Output(view, stdout, stdout_header))
    return outputs, stdout

"""Running the installed histstat and reading what it wrote."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable

import pytest

from support.children import SocketChild, wchan
from support.waiting import DEFAULT_TIMEOUT, STOP_TIMEOUT, wait_for

# The tests poll fast, so that what they wait for comes soon.
INTERVAL_SECONDS = 0.1
INTERVAL = ("-i", str(INTERVAL_SECONDS))


def histstat_command() -> str:
    """The installed console script next to the interpreter, else the one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "histstat")
    if os.path.isfile(beside) and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("histstat")
    if found is None:
        pytest.fail("the histstat command is not installed next to the interpreter or on PATH")
    return found


def _int_or_none(value) -> int | None:
    if value is None or value == "*":
        return None
    return int(value)


def connection_key(row: dict) -> tuple:
    """(proto, laddr, lport, raddr, rport, status) of a JSON or a parsed text row;
    None for an absent remote end (text ``*``) and for no status (text ``-``)."""
    raddr, status = row["raddr"], row["status"]
    return (
        row["proto"],
        row["laddr"],
        _int_or_none(row["lport"]),
        None if raddr in (None, "*") else raddr,
        _int_or_none(row["rport"]),
        None if status in (None, "-") else status,
    )


def output_of(args) -> str:
    if "-j" in args or "--json" in args:
        return "json"
    if "-p" in args or "--prettify" in args:
        return "pretty"
    return "plain"


# The pretty view's joined columns and the fields they hold.
ENDPOINT_COLUMNS = {"local": ("laddr", "lport"), "remote": ("raddr", "rport")}


def split_endpoint(text: str) -> tuple:
    """(address, port) of the pretty view's ``address:port``, ``[v6]:port`` or ``*:*``."""
    if text.startswith("["):
        address, _, port = text[1:].rpartition("]:")
    else:
        address, _, port = text.rpartition(":")
    return address, port


def _pretty_cells(line: str, columns: list) -> list:
    """The cells of a pretty line, one space or more apart; only the command may hold
    spaces, so the columns before it are read from the left and those after it from
    the right."""
    if "command" not in columns:
        return line.split()
    at = columns.index("command")
    cells = line.split(None, at)
    after = len(columns) - at - 1
    rest = cells.pop() if len(cells) > at else ""
    return cells + (rest.rsplit(None, after) if after else [rest])


def parse_pretty_line(line: str, columns: list) -> dict:
    """The fields of one pretty line; local and remote give back laddr, lport, raddr
    and rport (as text, ``*`` for none)."""
    row = {}
    for column, cell in zip(columns, _pretty_cells(line, columns)):
        if column in ENDPOINT_COLUMNS:
            row.update(zip(ENDPOINT_COLUMNS[column], split_endpoint(cell)))
        else:
            row[column] = cell
    return row


def parse_lines(lines: list, output: str) -> list:
    """Rows (dicts) of histstat's output lines; the text formats start with a header."""
    if output == "json":
        return [json.loads(line) for line in lines if line]
    if not lines:
        return []
    if output == "pretty":
        columns = lines[0].split()
        return [parse_pretty_line(line, columns) for line in lines[1:]]
    fields = lines[0].split("\t")
    return [dict(zip(fields, line.split("\t"))) for line in lines[1:]]


@dataclass
class Result:
    returncode: int
    stdout_bytes: bytes
    stderr: str
    output: str
    lines: list = field(init=False)

    def __post_init__(self) -> None:
        self.lines = self.stdout.splitlines()

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", "surrogateescape")

    @property
    def rows(self) -> list:
        return parse_lines(self.lines, self.output)

    def rows_of(self, pid: int) -> list:
        return [row for row in self.rows if str(row.get("pid")) == str(pid)]


def assert_clean_end(result: Result) -> None:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


# Wrappers for Histstat(prefix=...): bash closes a descriptor, then becomes histstat.
CLOSED_STDOUT = ("bash", "-c", 'exec "$0" "$@" >&-')
CLOSED_STDERR = ("bash", "-c", 'exec "$0" "$@" 2>&-')


class Histstat:
    """The installed histstat, running with its stdout and stderr read in threads."""

    def __init__(
        self,
        args,
        env: dict | None = None,
        output: str | None = None,
        prefix: tuple = (),
    ):
        """``prefix`` runs histstat through a wrapper that must exec it, such as
        ``CLOSED_STDOUT``, so that ``proc.pid`` is histstat's own."""
        self.args = [str(arg) for arg in args]
        self.output = output or output_of(self.args)
        self.proc = subprocess.Popen(
            [*prefix, histstat_command(), *self.args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self._out: list = []
        self._err: list = []
        self._readers = [
            threading.Thread(target=_collect, args=(self.proc.stdout, self._out), daemon=True),
            threading.Thread(target=_collect, args=(self.proc.stderr, self._err), daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        self.result: Result | None = None

    # What it wrote so far.
    def stdout_bytes(self) -> bytes:
        return b"".join(list(self._out))

    def stderr(self) -> str:
        return b"".join(list(self._err)).decode("utf-8", "replace")

    def lines(self) -> list:
        """Complete stdout lines so far, without their newline."""
        return [
            line[:-1].decode("utf-8", "surrogateescape")
            for line in list(self._out)
            if line.endswith(b"\n")
        ]

    def rows(self) -> list:
        return parse_lines(self.lines(), self.output)

    def rows_of(self, pid: int) -> list:
        return [row for row in self.rows() if str(row.get("pid")) == str(pid)]

    def describe(self, tail: int = 40) -> str:
        lines = self.lines()
        return (
            f"histstat {' '.join(self.args)} (exit {self.proc.poll()})\n"
            f"--- stdout, last {tail} of {len(lines)} lines:\n"
            + "\n".join(lines[-tail:])
            + f"\n--- stderr:\n{self.stderr()}"
        )

    # Waiting.
    def until(self, predicate: Callable, timeout: float = DEFAULT_TIMEOUT, what: str = ""):
        """Like ``wait_for``, but fails at once when histstat ends before ``predicate``
        comes true; the failure shows what histstat wrote."""

        def check():
            value = predicate()
            if value or self.proc.poll() is None:
                return value
            for reader in self._readers:
                reader.join(STOP_TIMEOUT)
            value = predicate()
            if not value:
                pytest.fail(
                    f"histstat ended (exit {self.proc.returncode}) before {what or predicate}"
                    f"\n{self.describe()}",
                    pytrace=False,
                )
            return value

        return wait_for(check, timeout, lambda: f"waiting for {what}\n{self.describe()}")

    def wait_for_rows(
        self, predicate: Callable, count: int = 1, timeout: float = DEFAULT_TIMEOUT
    ) -> list:
        """All rows matching ``predicate`` once there are at least ``count`` of them."""

        def matching():
            rows = [row for row in self.rows() if predicate(row)]
            return rows if len(rows) >= count else None

        return self.until(matching, timeout, f"{count} rows matching {predicate}")

    def wait_for_child(
        self, child: SocketChild, v4: bool = True, v6: bool = True, timeout=DEFAULT_TIMEOUT
    ) -> list:
        """The child's rows, once every expected connection of it was reported."""
        expected = child.connections(v4=v4, v6=v6)

        def seen():
            rows = self.rows_of(child.pid)
            return rows if expected <= {connection_key(row) for row in rows} else None

        return self.until(
            seen, timeout, f"connections of pid {child.pid}: {sorted(expected, key=str)}"
        )

    # Ending.
    def send(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = STOP_TIMEOUT) -> Result:
        """Wait for histstat to end by itself; kill it and fail if it does not."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"histstat did not end within {timeout:g} s\n{self.describe()}")
        return self._finish()

    def stop(self, timeout: float = STOP_TIMEOUT) -> Result:
        """SIGTERM, then wait (bounded) for the end; the Result holds all it wrote."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)
        self._finish()

    def _finish(self) -> Result:
        if self.result is None:
            for reader in self._readers:
                reader.join(STOP_TIMEOUT)
            self.proc.stdout.close()
            self.proc.stderr.close()
            self.result = Result(
                returncode=self.proc.returncode,
                stdout_bytes=self.stdout_bytes(),
                stderr=self.stderr(),
                output=self.output,
            )
        return self.result


def _collect(stream, into: list) -> None:
    for line in iter(stream.readline, b""):
        into.append(line)


def locale_env(lc_all: str) -> dict:
    """The current environment with only LC_ALL deciding the locale and encoding."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("LC_")
        and key not in ("LANG", "LANGUAGE", "PYTHONIOENCODING", "PYTHONUTF8")
    }
    env["LC_ALL"] = lc_all
    return env


# Logs are UTF-8; stdout follows the locale. Where the two are compared byte for byte,
# stdout is pinned to UTF-8 so that other processes' non-ASCII text reads the same.
UTF8_ENV = locale_env("C.UTF-8")


def sleeping_between_polls(pid: int) -> bool:
    """True while histstat's main thread sleeps between two polls (Linux wchan: check
    ``support.children.require_wchan`` first)."""
    return "nanosleep" in wchan(pid)


def run_once(args, timeout: float = STOP_TIMEOUT, **kwargs) -> subprocess.CompletedProcess:
    """Run histstat to its end (usage errors, -v); bounded by ``timeout``."""
    return subprocess.run(
        [histstat_command(), *[str(arg) for arg in args]],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        **kwargs,
    )

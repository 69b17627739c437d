"""Shared helpers for the end-to-end tests: the installed histstat and socket children.

Everything here runs real processes and real loopback sockets, and waits by polling with
a deadline, never by sleeping a fixed time. Fixtures end every process they started.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import pytest

# The output contract (DESIGN.md): the text columns in order, hashes just before command.
COLUMNS = (
    "proto", "laddr", "lport", "raddr", "rport", "status",
    "pid", "pname", "time", "date", "user", "command",
)  # fmt: skip
HASH_COLUMNS = COLUMNS[:-1] + ("md5", "sha256") + COLUMNS[-1:]

DEFAULT_TIMEOUT = 15.0  # seconds; every wait below is bounded by a deadline
STOP_TIMEOUT = 10.0
POLL_STEP = 0.02

# The socket child: a TCP listener on loopback, a client connected to it, the accepted
# end and a bound UDP socket, for 127.0.0.1 and (when it can be bound) ::1. It prints one
# line "lport cport uport lport6 cport6 uport6" ("-" for the IPv6 ports when ::1 is
# unavailable), then holds its sockets until its stdin reaches EOF or it is killed.
CHILD_SOURCE = """
import socket
import sys


def pair(family, host):
    server = socket.socket(family, socket.SOCK_STREAM)
    server.bind((host, 0))
    server.listen(4)
    client = socket.socket(family, socket.SOCK_STREAM)
    client.connect(server.getsockname()[:2])
    accepted, _ = server.accept()
    datagram = socket.socket(family, socket.SOCK_DGRAM)
    datagram.bind((host, 0))
    return [server, client, accepted, datagram]


def port(sock):
    return sock.getsockname()[1]


keep = pair(socket.AF_INET, "127.0.0.1")
ports = [port(keep[0]), port(keep[1]), port(keep[3])]
try:
    keep += pair(socket.AF_INET6, "::1")
    ports += [port(keep[4]), port(keep[5]), port(keep[7])]
except OSError:
    ports += ["-", "-", "-"]
print(*ports, flush=True)
sys.stdin.buffer.read()
"""
# Passed to -c as one printable line, so the child's command line holds no character that
# histstat has to escape: its expected text is exactly " ".join(argv).


def child_script(comm: str | None = None) -> str:
    """The child's -c argument; ``comm`` first renames the process (Linux /proc/PID/comm,
    at most 15 bytes), which is what psutil reports as its name."""
    source = CHILD_SOURCE
    if comm is not None:
        source = f"open('/proc/self/comm', 'w').write({comm!r})\n" + source
    encoded = base64.b64encode(source.encode()).decode()
    return f"import base64;exec(base64.b64decode('{encoded}').decode())"


CHILD_SCRIPT = child_script()


def histstat_command() -> str:
    """The installed console script next to the interpreter, else the one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "histstat")
    if os.path.isfile(beside) and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("histstat")
    if found is None:
        pytest.fail("the histstat command is not installed next to the interpreter or on PATH")
    return found


def new_marker() -> str:
    """A distinctive argument for a child's command line."""
    return f"histstat-e2e-{uuid.uuid4().hex}"


def wait_for(
    predicate: Callable,
    timeout: float = DEFAULT_TIMEOUT,
    describe: Callable[[], str] | str = "",
    step: float = POLL_STEP,
):
    """Poll ``predicate`` until it returns a true value (which is returned) or fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = describe() if callable(describe) else describe
            pytest.fail(f"condition not met within {timeout:g} s\n{detail}", pytrace=False)
        time.sleep(step)


def read_line(stream, timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """One line from a pipe, without a buffered read, bounded by a deadline."""
    deadline = time.monotonic() + timeout
    fd = stream.fileno()
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no complete line within {timeout:g} s, got {data!r}")
        readable, _, _ = select.select([fd], [], [], remaining)
        if readable:
            chunk = os.read(fd, 1)
            if not chunk:
                raise EOFError(f"pipe closed before a complete line, got {data!r}")
            data += chunk
    return data


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


# --------------------------------------------------------------------------- children


class SocketChild:
    """A child process that holds a loopback listener and both ends of a connection."""

    def __init__(self, argv: list, env: dict | None = None, timeout: float = 10.0):
        self.argv = list(argv)
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.pid = self.proc.pid
        try:
            line = read_line(self.proc.stdout, timeout).decode()
        except (TimeoutError, EOFError) as exc:
            self.stop()
            err = self.proc.stderr.read().decode(errors="replace")
            pytest.fail(f"socket child {self.argv!r} did not get ready: {exc}\n{err}")
        ports = [None if port == "-" else int(port) for port in line.split()]
        self.lport, self.cport, self.uport, self.lport6, self.cport6, self.uport6 = ports

    @property
    def has_v6(self) -> bool:
        return self.lport6 is not None

    @property
    def command(self) -> str:
        """The command line as the kernel holds it, decoded like Python decodes argv."""
        return " ".join(os.fsdecode(arg) for arg in self.argv)

    def connections(self, v4: bool = True, v6: bool = True) -> set:
        """The connection keys histstat must report for this child."""
        found = set()
        if v4:
            found |= _socket_keys("", "127.0.0.1", self.lport, self.cport, self.uport)
        if v6 and self.has_v6:
            found |= _socket_keys("6", "::1", self.lport6, self.cport6, self.uport6)
        return found

    def stop(self, timeout: float = 5.0) -> None:
        end_child(self.proc, timeout)


def end_child(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """End a child that runs until its stdin closes (killed if it does not), and close
    its pipes."""
    if proc.poll() is None:
        try:
            proc.stdin.close()
            proc.wait(timeout)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait(timeout)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None and not stream.closed:
            stream.close()


def _socket_keys(version: str, host: str, lport: int, cport: int, uport: int) -> set:
    tcp, udp = "tcp" + version, "udp" + version
    return {
        (tcp, host, lport, None, None, "LISTEN"),
        (tcp, host, cport, host, lport, "ESTABLISHED"),
        (tcp, host, lport, host, cport, "ESTABLISHED"),
        (udp, host, uport, None, None, None),  # UDP has no status
    }


def child_argv(*extra, executable: str | None = None, comm: str | None = None) -> list:
    """argv of a socket child: interpreter, -c, the script, a marker and ``extra``."""
    return [executable or sys.executable, "-c", child_script(comm), new_marker(), *extra]


@pytest.fixture
def spawn_child():
    """Start socket children: ``spawn_child(*extra_args, executable=None, env=None,
    comm=None)``; extra arguments may be bytes (POSIX), ``comm`` renames the process."""
    children: list = []

    def spawn(
        *extra, executable: str | None = None, env: dict | None = None, comm: str | None = None
    ):
        child = SocketChild(child_argv(*extra, executable=executable, comm=comm), env=env)
        children.append(child)
        return child

    yield spawn
    for child in children:
        child.stop()


def wchan(pid: int) -> str:
    """Where the kernel says a process sleeps (Linux /proc/PID/wchan); "0" while it runs."""
    with open(f"/proc/{pid}/wchan") as handle:
        return handle.read().strip()


def require_wchan(child: SocketChild, timeout: float = 3.0) -> None:
    """Skip unless the kernel names where processes sleep; ``child`` soon blocks reading
    its stdin, so a kernel that shows wchan shows it for the child."""
    deadline = time.monotonic() + timeout
    while wchan(child.pid) in ("", "0"):
        if time.monotonic() > deadline:
            pytest.skip("this kernel does not show where a process sleeps (wchan)")
        time.sleep(POLL_STEP)


# --------------------------------------------------------------------------- histstat


def output_of(args) -> str:
    if "-j" in args or "--json" in args:
        return "json"
    if "-p" in args or "--prettify" in args:
        return "pretty"
    return "plain"


def parse_lines(lines: list, output: str) -> list:
    """Rows (dicts) of histstat's output lines; the text formats start with a header."""
    if output == "json":
        return [json.loads(line) for line in lines if line]
    if not lines:
        return []
    fields = lines[0].split("\t") if output == "plain" else lines[0].split()
    rows = []
    for line in lines[1:]:
        if output == "plain":
            cells = line.split("\t")
        else:  # pretty: the command is last and may hold spaces
            cells = line.split(None, len(fields) - 1)
        rows.append(dict(zip(fields, cells)))
    return rows


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


@pytest.fixture
def run_histstat():
    """Start the installed histstat: ``run_histstat(*args, env=None, output=None,
    prefix=())``."""
    started: list = []

    def start(
        *args, env: dict | None = None, output: str | None = None, prefix: tuple = ()
    ) -> Histstat:
        histstat = Histstat(args, env=env, output=output, prefix=prefix)
        started.append(histstat)
        return histstat

    yield start
    for histstat in started:
        if histstat.proc.poll() is None:
            histstat.proc.send_signal(signal.SIGTERM)
            try:
                histstat.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        histstat.kill()


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


def run_once(args, timeout: float = STOP_TIMEOUT, **kwargs) -> subprocess.CompletedProcess:
    """Run histstat to its end (usage errors, -v); bounded by ``timeout``."""
    return subprocess.run(
        [histstat_command(), *[str(arg) for arg in args]],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        **kwargs,
    )

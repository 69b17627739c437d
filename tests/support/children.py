"""Child processes that hold real loopback sockets, and how to end them."""

from __future__ import annotations

import base64
import os
import pwd
import select
import subprocess
import sys
import sysconfig
import time
import uuid

import pytest

from support.waiting import DEFAULT_TIMEOUT, END_TIMEOUT, POLL_STEP, read_line

USER = pwd.getpwuid(os.geteuid()).pw_name  # whom the tests' children run as

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


def renaming(comm: str | bytes) -> str:
    """Python source that renames its process (Linux /proc/PID/comm, at most 15 bytes),
    which is what psutil reports as its name; bytes that are not UTF-8 and an empty name
    too."""
    raw = comm if isinstance(comm, bytes) else comm.encode()
    return (
        "import os as _os\n"
        "_fd = _os.open('/proc/self/comm', _os.O_WRONLY)\n"
        f"_os.write(_fd, {raw!r})\n"
        "_os.close(_fd)\n"
    )


def one_line_script(source: str, comm: str | bytes | None = None) -> str:
    """``source`` as one printable line for ``python -c``, so that the child's command
    line holds no character that histstat has to escape: its expected text is exactly
    " ".join(argv). ``comm`` first renames the process (see ``renaming``)."""
    if comm is not None:
        source = renaming(comm) + source
    encoded = base64.b64encode(source.encode()).decode()
    return f"import base64;exec(base64.b64decode('{encoded}').decode())"


def child_script(comm: str | bytes | None = None) -> str:
    """The socket child's -c argument, renamed to ``comm`` when given."""
    return one_line_script(CHILD_SOURCE, comm)


def new_marker() -> str:
    """A distinctive argument for a child's command line."""
    return f"histstat-e2e-{uuid.uuid4().hex}"


def new_tag() -> str:
    """A short distinctive part for the process names (comm) of one test's children,
    which the tests then select with a --name glob."""
    return uuid.uuid4().hex[:6]


class SocketChild:
    """A child process that holds a loopback listener and both ends of a connection."""

    def __init__(self, argv: list, env: dict | None = None, timeout: float = DEFAULT_TIMEOUT):
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

    def stop(self, timeout: float = END_TIMEOUT) -> None:
        end_child(self.proc, timeout)


def end_child(proc: subprocess.Popen, timeout: float = END_TIMEOUT) -> None:
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


def child_argv(*extra, executable: str | None = None, comm: str | bytes | None = None) -> list:
    """argv of a socket child: interpreter, -c, the script, a marker and ``extra``."""
    return [executable or sys.executable, "-c", child_script(comm), new_marker(), *extra]


def wchan(pid: int) -> str:
    """Where the kernel says a process sleeps (Linux /proc/PID/wchan); "0" while it runs."""
    with open(f"/proc/{pid}/wchan") as handle:
        return handle.read().strip()


def waits_on_full_pipe(pid: int, write_end: int) -> bool:
    """True while ``pid`` waits to write into a pipe that has no room left: ``write_end``
    is a descriptor of the pipe's writing end (a duplicate the caller keeps), and ``pid``
    sleeps in poll() for room, or in a blocking pipe write."""
    room = select.poll()
    room.register(write_end, select.POLLOUT)
    if room.poll(0):
        return False
    where = wchan(pid)
    return "poll" in where or "pipe_write" in where


def require_wchan(child: SocketChild, timeout: float = 3.0) -> None:
    """Skip unless the kernel names where processes sleep; ``child`` soon blocks reading
    its stdin, so a kernel that shows wchan shows it for the child."""
    deadline = time.monotonic() + timeout
    while wchan(child.pid) in ("", "0"):
        if time.monotonic() > deadline:
            pytest.skip("this kernel does not show where a process sleeps (wchan)")
        time.sleep(POLL_STEP)


# A child that holds PAIRS loopback connections (both ends, one listener), each end
# closed with RST so nothing lingers in TIME_WAIT. With CHURN above 0 it replaces its
# oldest connection every CHURN seconds, so every poll finds new connections of it. It
# prints "ready LISTENER_PORT", then runs until its stdin reaches EOF.
HOLDER_SOURCE = """
import collections, resource, socket, struct, sys, threading, time

pairs, churn = int(sys.argv[1]), float(sys.argv[2])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft < 2 * pairs + 64:
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 2 * pairs + 64), hard))
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(128)
held = collections.deque()

def connect():
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    for end in (client, accepted):
        end.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    held.append((client, accepted))

for _ in range(pairs):
    connect()
print("ready", listener.getsockname()[1], flush=True)
ended = threading.Event()
threading.Thread(target=lambda: (sys.stdin.buffer.read(), ended.set()), daemon=True).start()
while not ended.wait(churn if churn > 0 else None):
    for end in held.popleft():
        end.close()
    connect()
"""


class HoldingChild:
    """A child holding ``pairs`` loopback connections, with ``extra`` arguments on its
    command line (bytes allowed) and the name ``comm``; ``churn`` replaces one connection
    every that many seconds."""

    def __init__(
        self, pairs: int, *extra, comm: str | bytes | None = None, churn: float = 0.0,
        timeout: float = 30.0,
    ):  # fmt: skip
        script = one_line_script(HOLDER_SOURCE, comm)
        self.argv = [sys.executable, "-c", script, str(pairs), str(churn), *extra]
        self.pairs = pairs
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.pid = self.proc.pid
        try:
            words = read_line(self.proc.stdout, timeout).split()
        except (TimeoutError, EOFError) as exc:
            self.stop()
            err = self.proc.stderr.read().decode(errors="replace")
            pytest.fail(f"holding child did not get ready: {exc}\n{err}")
        self.port = int(words[1])

    @property
    def command(self) -> str:
        """The command line as the kernel holds it, decoded as histstat decodes it."""
        return " ".join(
            arg.decode("utf-8", "surrogateescape") if isinstance(arg, bytes) else arg
            for arg in self.argv
        )

    def stop(self, timeout: float = 5.0) -> None:
        end_child(self.proc, timeout)


# The attacker of issue 14: a name with a byte that is not UTF-8, and a command line of
# 9 arguments of 120,000 control characters (about 1 MB).
ATTACKER_COMM = b"\xffsshd"
ATTACKER_ARGUMENTS = [b"\x01" * 120_000] * 9


def copied_interpreter_env() -> dict:
    """The environment in which a copy of this interpreter, placed elsewhere, still finds
    its standard library and shared library."""
    env = dict(os.environ)
    env["PYTHONHOME"] = sys.base_prefix
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            filter(None, [libdir, os.environ.get("LD_LIBRARY_PATH")])
        )
    return env

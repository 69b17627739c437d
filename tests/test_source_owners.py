"""Every process holding a socket is among its owners, the likeliest opener first."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys

import psutil
import pytest

from support.children import end_child
from support.waiting import DEFAULT_TIMEOUT, END_TIMEOUT, read_line, wait_for

if not sys.platform.startswith("linux"):
    pytest.skip("the Linux source reads Linux's /proc and netlink", allow_module_level=True)

from histstat.sources.psutil_source import PsutilSource  # noqa: E402


def started_order(pids) -> tuple:
    """``pids`` by psutil's create time, then pid: the order the rule gives."""
    return tuple(sorted(pids, key=lambda pid: (psutil.Process(pid).create_time(), pid)))


def ss_pids(lport: int, rport: int) -> set:
    """The pids ``ss -tnp`` names for the TCP socket 127.0.0.1:lport → 127.0.0.1:rport."""
    result = subprocess.run(
        ["ss", "-tnpH", "src", f"127.0.0.1:{lport}", "dst", f"127.0.0.1:{rport}"],
        capture_output=True,
        timeout=DEFAULT_TIMEOUT,
        check=True,
    )
    return {int(pid) for pid in re.findall(r"pid=(\d+)", result.stdout.decode(errors="replace"))}


def the_connection(source, lport: int, rport: int):
    """The source's record of 127.0.0.1:lport → 127.0.0.1:rport, None when absent."""
    found = [
        conn
        for conn in source.snapshot()
        if conn.proto == "tcp" and conn.lport == lport and conn.rport == rport
    ]
    assert len(found) <= 1, found
    return found[0] if found else None


def owners_of(source, lport: int, rport: int) -> tuple:
    conn = the_connection(source, lport, rport)
    return () if conn is None else conn.owners


@pytest.fixture
def listener():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        sock.settimeout(DEFAULT_TIMEOUT)
        yield sock


@pytest.fixture
def reverse_shell(listener):
    """bash -c 'exec 3<>/dev/tcp/…; sleep 15 <&3 & sleep 15' connected to ``listener``:
    (bash's pid, the client port, the listener's port)."""
    port = listener.getsockname()[1]
    script = f"exec 3<>/dev/tcp/127.0.0.1/{port}; sleep 15 <&3 & sleep 15"
    shell = subprocess.Popen(["bash", "-c", script], start_new_session=True)
    try:
        accepted, (_, client_port) = listener.accept()
        with accepted:
            yield shell, client_port, port
    finally:
        os.killpg(shell.pid, signal.SIGKILL)
        shell.wait(END_TIMEOUT)


def children_of(pid: int, count: int) -> list:
    """The ``count`` children of ``pid``, waited for."""
    return wait_for(
        lambda: (kids := psutil.Process(pid).children()) and len(kids) == count and kids,
        describe=f"{pid} did not get {count} children",
    )


def test_the_reverse_shell_lists_bash_and_both_sleeps_with_bash_first(reverse_shell, live_source):
    shell, client_port, port = reverse_shell
    sleeps = [child.pid for child in children_of(shell.pid, 2)]
    holders = {shell.pid, *sleeps}
    source = live_source()

    def complete():
        conn = the_connection(source, client_port, port)
        return conn if conn is not None and set(conn.owners) == holders else None

    conn = wait_for(complete, describe=lambda: repr(the_connection(source, client_port, port)))
    assert conn.owners == started_order(holders)
    assert conn.owners[0] == conn.pid == shell.pid  # bash started first: the opener
    assert ss_pids(client_port, port) == holders


def test_a_reverse_shell_that_connects_while_watched_lists_bash_first_at_first_sight(
    listener, live_source
):
    # bash is an old process by the time it connects (read at two snapshots before), its
    # two sleeps are new ones, read first: bash must still be found in the same snapshot.
    port = listener.getsockname()[1]
    script = f"read -r; exec 3<>/dev/tcp/127.0.0.1/{port}; sleep 15 <&3 & sleep 15"
    shell = subprocess.Popen(["bash", "-c", script], stdin=subprocess.PIPE, start_new_session=True)
    try:
        source = live_source()
        for _ in range(3):
            assert all(shell.pid not in conn.owners for conn in source.snapshot())
        shell.stdin.write(b"go\n")
        shell.stdin.close()
        accepted, (_, client_port) = listener.accept()
        with accepted:
            sleeps = [child.pid for child in children_of(shell.pid, 2)]
            holders = {shell.pid, *sleeps}
            # Both sleeps hold the socket (forked after the connect) before the snapshot.
            wait_for(lambda: ss_pids(client_port, port) == holders)
            conn = the_connection(source, client_port, port)
            assert conn is not None
            assert conn.owners == started_order(holders)
            assert conn.owners[0] == conn.pid == shell.pid
    finally:
        os.killpg(shell.pid, signal.SIGKILL)
        shell.wait(END_TIMEOUT)


def test_a_holder_that_exits_leaves_owners_at_the_next_snapshot(reverse_shell, live_source):
    shell, client_port, port = reverse_shell
    sleeps = [child.pid for child in children_of(shell.pid, 2)]
    source = live_source()
    wait_for(lambda: len(owners_of(source, client_port, port)) == 3)
    os.kill(sleeps[0], signal.SIGKILL)
    # Gone, or a zombie until bash reaps it: either way it holds no descriptor.
    wait_for(lambda: not psutil.pid_exists(sleeps[0]) or is_zombie(sleeps[0]))
    conn = the_connection(source, client_port, port)
    assert conn.owners == started_order({shell.pid, sleeps[1]})
    assert conn.pid == shell.pid


def is_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_the_psutil_source_lists_the_one_holder_psutil_names_on_linux(reverse_shell):
    shell, client_port, port = reverse_shell
    holders = {shell.pid, *(child.pid for child in children_of(shell.pid, 2))}
    conn = wait_for(lambda: the_connection(PsutilSource(), client_port, port))
    assert conn.pid in holders
    assert conn.owners == (conn.pid,)


# Connects to the port in argv[1] and prints its local port; at a line on stdin forks a
# child that keeps the connection and prints the child's pid; both end at stdin's EOF.
FORKER = """
import os, socket, sys
conn = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print(conn.getsockname()[1], flush=True)
line = b""
while not line.endswith(b"\\n"):
    line += os.read(0, 1)
child = os.fork()
if child:
    print(child, flush=True)
while os.read(0, 4096):
    pass
if child:
    os.waitpid(child, 0)
os._exit(0)
"""


def test_a_child_forked_after_the_first_sight_is_an_owner_at_the_next_snapshot(
    listener, live_source
):
    port = listener.getsockname()[1]
    parent = python_child(FORKER, port)
    try:
        client_port = int(read_line(parent.stdout))
        accepted, _ = listener.accept()
        source = live_source()
        assert owners_of(source, client_port, port) == (parent.pid,)
        assert owners_of(source, client_port, port) == (parent.pid,)
        tell(parent)
        child = int(read_line(parent.stdout))
        conn = the_connection(source, client_port, port)
        assert conn.owners == (parent.pid, child) and conn.pid == parent.pid
        accepted.close()
    finally:
        end_child(parent)


# The opener: connects to the port in argv[2], prints its local port, and on each line
# of stdin passes the connection over the Unix socket of descriptor argv[1], then closes
# its own copy, then exits.
OPENER = """
import socket, sys
unix = socket.socket(fileno=int(sys.argv[1]))
conn = socket.create_connection(("127.0.0.1", int(sys.argv[2])))
print(conn.getsockname()[1], flush=True)
sys.stdin.readline()
socket.send_fds(unix, [b"x"], [conn.fileno()])
sys.stdin.readline()
conn.close()
print("closed", flush=True)
sys.stdin.readline()
"""
# The receiver: says it is ready, takes one descriptor from the Unix socket of
# descriptor argv[1], says so, and keeps it until stdin reaches EOF.
RECEIVER = """
import socket, sys
unix = socket.socket(fileno=int(sys.argv[1]))
print("ready", flush=True)
message, fds, flags, address = socket.recv_fds(unix, 16, 1)
print("received", flush=True)
sys.stdin.read()
"""


def python_child(source: str, *args, pass_fds=()) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", source, *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        pass_fds=pass_fds,
    )


def tell(child: subprocess.Popen) -> None:
    child.stdin.write(b"go\n")
    child.stdin.flush()


def test_a_socket_passed_to_a_running_process_lists_both_and_then_the_receiver(
    listener, live_source
):
    port = listener.getsockname()[1]
    ours, theirs = socket.socketpair()
    opener = receiver = None
    try:
        opener = python_child(OPENER, ours.fileno(), port, pass_fds=(ours.fileno(),))
        client_port = int(read_line(opener.stdout))
        accepted, _ = listener.accept()
        # Started after the opener, and no descendant of it.
        receiver = python_child(RECEIVER, theirs.fileno(), pass_fds=(theirs.fileno(),))
        assert read_line(receiver.stdout) == b"ready\n"
        ours.close()
        theirs.close()
        source = live_source()
        source.owners.SWEEP_SECONDS = 1.0  # the sweep finds it; let it pass sooner
        for _ in range(3):  # past the polls that read new processes
            assert owners_of(source, client_port, port) == (opener.pid,)
        tell(opener)
        assert read_line(receiver.stdout) == b"received\n"
        both = (opener.pid, receiver.pid)

        wait_for(
            lambda: owners_of(source, client_port, port) == both,
            describe=lambda: repr(the_connection(source, client_port, port)),
        )
        assert ss_pids(client_port, port) == set(both)
        assert the_connection(source, client_port, port).pid == opener.pid

        # The opener closes its copy: the sweep lets it go. Then it exits.
        tell(opener)
        assert read_line(opener.stdout) == b"closed\n"
        alone = (receiver.pid,)
        wait_for(lambda: owners_of(source, client_port, port) == alone)
        end_child(opener)
        conn = the_connection(source, client_port, port)
        assert conn.owners == alone and conn.pid == receiver.pid
        accepted.close()
    finally:
        ours.close()
        theirs.close()
        for child in (opener, receiver):
            if child is not None:
                end_child(child)

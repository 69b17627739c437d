"""The Linux source reads every network namespace: dumps and destroy broadcasts through
sockets created inside each, netns on every Connection and End, and the sockets closed
once no process holds a namespace; as root, on namespaces the tests make and remove."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from support.children import end_child
from support.namespaces import (
    as_nobody,
    descriptor_count,
    need_root,
    need_tools,
    netns_child_argv,
    netns_inode,
    netns_inode_if_entered,
    thread_count,
)
from support.waiting import END_TIMEOUT, read_line, wait_for

if not sys.platform.startswith("linux"):
    pytest.skip("the Linux source runs on Linux only", allow_module_level=True)

from histstat.sources.linux import LinuxSource  # noqa: E402
from histstat.sources.namespaces import UNPRIVILEGED_REASON  # noqa: E402

OWN = netns_inode("self")


@pytest.fixture
def source():
    """A live LinuxSource, closed at the end."""
    need_root("reading other network namespaces")
    made = LinuxSource()
    yield made
    made.close()


def keys(conns) -> set:
    return {conn[:6] for conn in conns}


def test_a_childs_connection_in_its_namespace_has_its_netns_and_owner(source, netns_children):
    child = netns_children()
    inode = netns_inode(child.pid)
    assert inode != OWN
    snapshot = source.snapshot()
    theirs = {conn for conn in snapshot if conn.netns == inode}
    # The namespace holds the child's sockets alone, both ends of its connection too.
    assert keys(theirs) == child.connections()
    # Socket inodes are global: the owners found across namespaces are the child.
    assert {(conn.pid, conn.owners) for conn in theirs} == {(child.pid, (child.pid,))}
    assert all(source.uid_of(conn) == 0 for conn in theirs)
    assert inode in source.namespaces
    # None of the child's sockets is shown in another namespace.
    assert {conn for conn in snapshot if child.pid in conn.owners} == theirs
    assert {conn.netns for conn in snapshot} <= {OWN, *source.namespaces}


# A child in a new namespace that makes the connection asked for: a listener on
# 127.0.0.1:LPORT, a client bound to 127.0.0.1:CPORT connected to it, the accepted end.
SAME_PORTS_SOURCE = (
    "import socket, sys\n"
    "lport, cport = int(sys.argv[1]), int(sys.argv[2])\n"
    "server = socket.socket()\n"
    "server.bind(('127.0.0.1', lport))\n"
    "server.listen()\n"
    "client = socket.socket()\n"
    "client.bind(('127.0.0.1', cport))\n"
    "client.connect(('127.0.0.1', lport))\n"
    "accepted, _ = server.accept()\n"
    "print('ready', flush=True)\n"
    "sys.stdin.read()\n"
)


def test_the_same_five_tuple_in_two_namespaces_is_two_connections(source):
    need_tools("unshare", "ip")
    with socket.socket() as server, socket.socket() as client:
        server.bind(("127.0.0.1", 0))
        server.listen()
        client.connect(server.getsockname())
        accepted, _ = server.accept()
        lport, cport = server.getsockname()[1], client.getsockname()[1]
        argv = netns_child_argv(str(lport), str(cport))
        argv[argv.index(sys.executable) + 2] = SAME_PORTS_SOURCE  # python -c SCRIPT
        child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert read_line(child.stdout) == b"ready\n"
            inode = netns_inode(child.pid)
            tuple_ = ("tcp", "127.0.0.1", cport, "127.0.0.1", lport, "ESTABLISHED")
            both = {(conn.netns, conn.pid) for conn in source.snapshot() if conn[:6] == tuple_}
            assert both == {(OWN, os.getpid()), (inode, child.pid)}
        finally:
            accepted.close()
            end_child(child)


def test_a_connection_closed_inside_a_namespace_ends_with_its_netns(source, netns_children):
    child = netns_children()
    inode = netns_inode(child.pid)
    ends_seen = []
    # The first snapshot joins the namespace's broadcasts before it dumps it.
    cookies = {
        conn.cookie: conn[:6]
        for conn in source.snapshot()
        if conn.netns == inode and conn.proto == "tcp" and conn.raddr is not None
    }
    assert len(cookies) == 2 and source.watches_ends()
    child.stop()  # its sockets close, and its namespace ends with it

    def ended() -> bool:
        source.snapshot()
        ends_seen.extend(source.ends().ends)
        return cookies.keys() <= {end.cookie for end in ends_seen}

    wait_for(ended, describe=lambda: f"ends {ends_seen} for {cookies}")
    for end in ends_seen:
        if end.cookie in cookies:
            assert end.netns == inode
            assert end[:5] == cookies[end.cookie][:5]
    wait_for(lambda: source.snapshot() is not None and inode not in source.namespaces)


def test_own_namespace_ends_carry_its_netns(source):
    source.snapshot()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
    seen: list = []

    def ended() -> bool:
        seen.extend(end for end in source.ends().ends if end.lport == port)
        return bool(seen)

    wait_for(ended, describe=f"the listener on port {port} gave no end")
    assert {end.netns for end in seen} == {OWN}


def test_a_namespace_gone_between_discovery_and_dump_loses_no_other_row(source, netns_children):
    """The scan names a namespace whose only process ended since: entering it fails,
    quietly, and the snapshot of the others is whole."""
    child = netns_children()
    pid, inode = child.pid, netns_inode(child.pid)
    child.stop()
    readers = source._readers
    real_scan = readers.discovery.scan

    def stale_scan():
        held = dict(real_scan())
        held[inode] = pid  # as the scan had it a moment before
        return held

    readers.discovery.scan = stale_scan
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        snapshot = source.snapshot()
    assert {conn.netns for conn in snapshot if conn.lport == port} == {OWN}
    assert inode not in source.namespaces
    assert not [conn for conn in snapshot if conn.netns == inode]


def test_a_failed_dump_in_a_namespace_is_read_again(source, netns_children):
    """A dump cut short closes the namespace's dump socket (its SockDiag owns it): the
    next dump enters the namespace again through its representative."""
    child = netns_children()
    inode = netns_inode(child.pid)
    first = {conn[:6] for conn in source.snapshot() if conn.netns == inode}
    diag = source._readers.held[inode].diag
    diag._sock.close()  # the next dump on it fails: EBADF
    again = {conn[:6] for conn in source.snapshot() if conn.netns == inode}
    assert again == first == child.connections()
    reopened = {conn[:6] for conn in source.snapshot() if conn.netns == inode}
    assert reopened == first
    assert diag._sock is not None and diag._sock.fileno() != -1


def test_a_namespace_read_through_a_pid_gone_elsewhere_keeps_its_last_rows(source, netns_children):
    """A failed dump falls back to the namespace's files through its representative: a
    representative now in another namespace (a reused pid) gives no rows of its own to
    this namespace, whose last rows stand in for the poll: nothing of it ends."""
    child = netns_children()
    inode = netns_inode(child.pid)
    first = {conn[:6] for conn in source.snapshot() if conn.netns == inode}
    readers = source._readers
    real_scan = readers.discovery.scan

    def reused():
        held = dict(real_scan())
        held[inode] = os.getpid()  # as if its pid were now ours, in histstat's namespace
        return held

    readers.discovery.scan = reused
    readers.held[inode].diag._sock.close()  # the next dump fails: the files are read
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        snapshot = source.snapshot()
    assert first == child.connections()
    assert {conn[:6] for conn in snapshot if conn.netns == inode} == first
    assert {conn.netns for conn in snapshot if conn.lport == port} == {OWN}


def link_exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


def test_fifty_namespaces_come_and_go_without_leaks(source):
    """50 namespaces appear while the source polls and all go: its descriptors and
    threads return to their starting count, and no socket of its keeps a namespace
    alive (a veth into one of them goes with it)."""
    need_tools("unshare", "ip")
    source.snapshot()  # the reader thread and the own namespace's sockets
    fds, threads = descriptor_count(), thread_count()
    children: list[subprocess.Popen] = []
    host_end = f"hsv{os.urandom(4).hex()}"
    try:
        for _ in range(50):
            children.append(subprocess.Popen(["unshare", "--net", "cat"], stdin=subprocess.PIPE))
        inodes = {
            wait_for(lambda child=child: netns_inode_if_entered(child.pid, OWN))
            for child in children
        }
        made = subprocess.run(
            ["ip", "link", "add", host_end, "type", "veth", "peer", "name", "inside", "netns"]
            + [str(children[0].pid)],
            capture_output=True,
        )
        assert made.returncode == 0, made.stderr.decode(errors="replace")

        def all_read() -> bool:
            source.snapshot()
            return inodes <= source.namespaces and inodes <= source._watcher.namespaces

        wait_for(all_read, describe=lambda: f"{len(inodes - source.namespaces)} not read")
        for child in children:
            end_child(child)

        def all_gone() -> bool:
            source.snapshot()
            return not inodes & (source.namespaces | source._watcher.namespaces)

        wait_for(all_gone, describe=lambda: f"{len(inodes & source.namespaces)} still read")
        # The reader thread closes the broadcast sockets it was told to leave.
        wait_for(lambda: descriptor_count() == fds, END_TIMEOUT, "descriptors left open")
        wait_for(lambda: not link_exists(host_end), END_TIMEOUT, f"{host_end} outlived it")
        assert thread_count() == threads
    finally:
        for child in children:
            end_child(child)
        if link_exists(host_end):
            subprocess.run(["ip", "link", "del", host_end], capture_output=True)


def test_close_lets_go_of_every_namespace(netns_children):
    need_root("reading other network namespaces")
    child = netns_children()
    inode = netns_inode(child.pid)
    fds, threads = descriptor_count(), thread_count()
    source = LinuxSource()
    try:
        source.snapshot()
        assert inode in source.namespaces
        assert inode in source._watcher.namespaces
    finally:
        source.close()
    assert source.namespaces == frozenset()
    assert descriptor_count() == fds
    wait_for(lambda: thread_count() == threads, END_TIMEOUT, "threads left running")


def test_unprivileged_source_reads_its_own_namespace_and_says_why_once(netns_children):
    """Dropped to nobody in a forked child: the child's namespace is not read, the
    reason is told once over several snapshots, and the own namespace's rows carry its
    netns."""
    child = netns_children()
    inode = netns_inode(child.pid)

    def source_as_nobody() -> dict:
        notes: list[str] = []
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen()
            port = server.getsockname()[1]
            source = LinuxSource(notice=notes.append)
            try:
                snapshots = [source.snapshot() for _ in range(3)]
                return {
                    "notes": notes,
                    "namespaces": sorted(source.namespaces),
                    "mine": sorted({c.netns for s in snapshots for c in s if c.lport == port}),
                    "child": sum(1 for s in snapshots for c in s if c.netns == inode),
                }
            finally:
                source.close()

    seen = as_nobody(source_as_nobody)
    assert seen == {"notes": [UNPRIVILEGED_REASON], "namespaces": [], "mine": [OWN], "child": 0}


def test_root_source_says_nothing(source, netns_children):
    notes: list[str] = []
    netns_children()
    quiet = LinuxSource(notice=notes.append)
    try:
        quiet.snapshot()
        quiet.snapshot()
        assert quiet.namespaces
    finally:
        quiet.close()
    assert notes == []


def test_proc_net_source_stamps_its_own_namespace(source):
    files = LinuxSource(netlink=False)
    try:
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen()
            port = server.getsockname()[1]
            snapshot = files.snapshot()
        assert {conn.netns for conn in snapshot if conn.lport == port} == {OWN}
        assert files.namespaces == frozenset()
    finally:
        files.close()


# A child alone in a new namespace, idle until it reads a line; then it listens on
# 127.0.0.1 and prints the port.
LISTEN_LATER_SOURCE = (
    "import socket, sys\n"
    "print('ready', flush=True)\n"
    "sys.stdin.readline()\n"
    "server = socket.socket()\n"
    "server.bind(('127.0.0.1', 0))\n"
    "server.listen()\n"
    "print(server.getsockname()[1], flush=True)\n"
    "sys.stdin.read()\n"
)


class CountedDumps:
    """Counts the dumps of one namespace's SockDiag."""

    def __init__(self, diag) -> None:
        self.calls = 0
        real = diag.dump

        def dump(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        diag.dump = dump


def test_an_idle_namespace_is_not_dumped_until_it_counts_a_socket(source):
    need_tools("unshare", "ip")
    argv = netns_child_argv()
    argv[argv.index(sys.executable) + 2] = LISTEN_LATER_SOURCE
    child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert read_line(child.stdout) == b"ready\n"
        inode = netns_inode(child.pid)

        def entered() -> bool:
            source.snapshot()
            return inode in source.namespaces

        wait_for(entered, describe="the child's namespace is not read")
        dumps = CountedDumps(source._readers.held[inode].diag)
        assert not [conn for conn in source.snapshot() if conn.netns == inode]
        assert dumps.calls == 0  # its counters said it was empty
        child.stdin.write(b"go\n")
        child.stdin.flush()
        port = int(read_line(child.stdout))
        listening = ("tcp", "127.0.0.1", port, None, None, "LISTEN")
        assert {conn[:6] for conn in source.snapshot() if conn.netns == inode} == {listening}
        assert dumps.calls > 0
    finally:
        end_child(child)


def test_a_namespace_whose_last_dump_had_rows_is_dumped_whatever_its_counters(
    source, netns_children, monkeypatch
):
    """A count read low (the kernel sums per-CPU counters unlocked) must not hide a
    socket a poll has shown: that would end its story and start another."""
    from histstat.sources import linux

    child = netns_children()
    inode = netns_inode(child.pid)
    assert {c[:6] for c in source.snapshot() if c.netns == inode} == child.connections()
    monkeypatch.setattr(linux, "holds_no_socket", lambda net: True)
    assert {c[:6] for c in source.snapshot() if c.netns == inode} == child.connections()


def test_the_counters_of_an_empty_namespace_and_of_a_busy_one(netns_children):
    from histstat.sources.linux import holds_no_socket

    need_tools("unshare")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()  # our namespace holds a socket, at least this one
        assert not holds_no_socket("/proc/self/net")
    assert not holds_no_socket(f"/proc/{netns_children().pid}/net")
    empty = subprocess.Popen(["unshare", "--net", "cat"], stdin=subprocess.PIPE)
    try:
        wait_for(lambda: netns_inode_if_entered(empty.pid, OWN))
        assert holds_no_socket(f"/proc/{empty.pid}/net")
    finally:
        end_child(empty)
    assert not holds_no_socket("/nonexistent")  # unreadable: dump


def test_the_runner_says_why_once_on_stderr(monkeypatch):
    """In-process: the source's notice reaches stderr through the runner, once over
    several polls, with histstat's prefix; the rows go on."""
    import io

    from histstat import runner
    from histstat.environment import Environment
    from histstat.sources.namespaces import NamespaceDiscovery

    need_root("a run as root whose discovery is told some namespaces were refused")
    polls = []

    def sleep_until(loop, deadline):
        polls.append(deadline)
        if len(polls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(NamespaceDiscovery, "reason", property(lambda self: UNPRIVILEGED_REASON))
    monkeypatch.setattr(runner.PollLoop, "_sleep_until", sleep_until)
    stdout, stderr = io.BytesIO(), io.StringIO()
    env = Environment(stdout=stdout, stderr=stderr, stdout_encoding="utf-8", stdout_isatty=False)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        argv = ["-j", "--source", "linux", "--kernel-events", "off", "--port", str(port)]
        assert runner.main(argv, env=env) == 0
    assert len(polls) == 3
    assert stderr.getvalue().splitlines() == ["histstat: " + UNPRIVILEGED_REASON]
    rows = [json.loads(line) for line in stdout.getvalue().splitlines()]
    assert [row["lport"] for row in rows if row["pid"] == os.getpid()] == [port]

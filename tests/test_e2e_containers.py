"""End to end, as root: connections inside other network namespaces, in cgroups named like
containers', seen by the installed histstat with the Linux source, labelled with their
namespace and container, filtered by them, and followed as namespaces come and go.

Every namespace and cgroup here is the test's own, made for its children and removed
afterwards, even after a failure; all traffic stays on each namespace's loopback."""

from __future__ import annotations

import collections
import contextlib
import datetime
import os
import subprocess
import sys
import time

import pytest

from histstat.sources.tracefs import TracefsUnavailable, locate_tracefs
from support.children import SocketChild, child_script, end_child, new_tag, one_line_script
from support.histstat import assert_clean_end, connection_key, sleeping_between_polls
from support.namespaces import docker_like_cgroup, need_root, need_tools, netns_inode
from support.tracing import BEACON, instances_of, ready
from support.waiting import DEFAULT_TIMEOUT, read_line, wait_for

LINUX = ("--source", "linux")
FAST = ("-i", "0.1")

# The shell of a new network namespace brings its loopback up, then becomes the command
# that follows (unshare and sh exec, so the command's pid is the Popen's).
IN_NEW_NETNS = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$0" "$@"']
# The shell joins the cgroup directory given as $0, then becomes the command after it.
IN_CGROUP = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"']

# A child holding one TCP connection on 127.0.0.1 between the ports given (listener
# port, then client port): prints them as the socket child does (no UDP, no IPv6), then
# holds them until its stdin closes. Two such children in two namespaces hold the very
# same 5-tuples.
FIXED_PORTS = """
import socket, sys
lport, cport = int(sys.argv[1]), int(sys.argv[2])
listener = socket.socket()
listener.bind(("127.0.0.1", lport))
listener.listen(4)
client = socket.socket()
client.bind(("127.0.0.1", cport))
client.connect(("127.0.0.1", lport))
accepted, _ = listener.accept()
print(lport, cport, "- - - -", flush=True)
sys.stdin.buffer.read()
"""


def need_namespaces() -> None:
    need_root("children in network namespaces and cgroups of their own")
    need_tools("unshare", "ip")


@pytest.fixture
def children():
    """Start socket children (support.children.SocketChild) from argv lists: each is
    stopped at the end, before the cgroups they may be in are removed."""
    started: list[SocketChild] = []
    cgroups = contextlib.ExitStack()

    class Spawner:
        @staticmethod
        def start(argv: list) -> SocketChild:
            child = SocketChild(argv)
            started.append(child)
            return child

        @staticmethod
        def container() -> tuple[list, str]:
            """A Docker-like cgroup: (the argv prefix that runs a command in it and in a
            new network namespace, the container id its cgroup names)."""
            scope, container = cgroups.enter_context(docker_like_cgroup())
            return [*IN_CGROUP, scope, *IN_NEW_NETNS], container

        @staticmethod
        def in_container(argv: list) -> tuple[SocketChild, str]:
            """A child in a new network namespace and a Docker-like cgroup: (child, the
            container id its cgroup names)."""
            prefix, container = Spawner.container()
            return Spawner.start([*prefix, *argv]), container

    need_namespaces()
    with cgroups:
        try:
            yield Spawner
        finally:
            for child in started:
                child.stop()


@pytest.fixture
def histstat(run_histstat):
    """Start the installed histstat: ``histstat(*args, prefix=())``; ended at the end by
    SIGTERM first, so that its tracefs instance goes with it even when a test fails."""
    return run_histstat


def socket_child_argv(comm: str | None = None) -> list:
    return [sys.executable, "-c", child_script(comm)]


def when(row: dict) -> float:
    return datetime.datetime.fromisoformat(row["timestamp"]).timestamp()


def test_both_ends_in_a_container_are_attributed_with_its_netns_and_container(children, histstat):
    """A connection that only the container's own socket table holds: histstat reads the
    namespace, attributes both ends (and the listener, the UDP socket) to the child, and
    labels every row with the namespace's inode and the container id."""
    child, container = children.in_container(socket_child_argv())
    netns = netns_inode(child.pid)
    assert netns != netns_inode("self")
    js = histstat("-j", *LINUX, *FAST, "--pid", child.pid)
    rows = js.wait_for_child(child)
    for row in rows:
        assert row["pid"] == child.pid, row
        assert row["attribution"] == "socket", row
        assert row["netns"] == netns, row
        assert row["container"] == container, row
    assert_clean_end(js.stop())


def test_the_same_five_tuple_in_two_namespaces_is_two_connections(children, histstat):
    """Two children in two namespaces hold identical 5-tuples: two stories, each with its
    own open rows, process and namespace, none merged into the other."""
    lport, cport = 20000 + os.getpid() % 20000, 40000 + os.getpid() % 20000
    argv = [sys.executable, "-c", one_line_script(FIXED_PORTS), str(lport), str(cport)]
    first = children.start([*IN_NEW_NETNS, *argv])
    second = children.start([*IN_NEW_NETNS, *argv])
    keys = {
        ("tcp", "127.0.0.1", lport, None, None, "LISTEN"),
        ("tcp", "127.0.0.1", cport, "127.0.0.1", lport, "ESTABLISHED"),
        ("tcp", "127.0.0.1", lport, "127.0.0.1", cport, "ESTABLISHED"),
    }
    js = histstat("-j", *LINUX, *FAST, "--port", lport)

    def both_seen():
        seen = {pid: js.rows_of(pid) for pid in (first.pid, second.pid)}
        found = [{connection_key(row) for row in rows} for rows in seen.values()]
        return seen if all(keys <= each for each in found) else None

    seen = js.until(both_seen, what=f"both children's connections {sorted(keys, key=str)}")
    assert_clean_end(js.stop())
    for child in (first, second):
        rows = [row for row in js.result.rows if row["pid"] == child.pid]
        assert collections.Counter(map(connection_key, rows)) == dict.fromkeys(keys, 1), rows
        assert {row["netns"] for row in rows} == {netns_inode(child.pid)}, rows
    children_rows = [row for row in js.result.rows if row["pid"] in (first.pid, second.pid)]
    assert len(children_rows) == 2 * len(keys), children_rows
    assert seen[first.pid] and seen[second.pid]


def test_container_and_netns_filters_keep_only_that_containers_rows(children, histstat):
    """--container (by a 12-character prefix) and --netns keep the container's rows and
    drop those of a child in histstat's own namespace, which an unfiltered run shows."""
    inside, container = children.in_container(socket_child_argv())
    outside = children.start(socket_child_argv())
    netns = netns_inode(inside.pid)
    # Each run looks at the two children alone (a busy host's other rows stay out).
    both = ("--pid", f"{inside.pid},{outside.pid}")
    by_container = histstat("-j", *LINUX, *FAST, *both, "--container", container[:12])
    by_netns = histstat("-j", *LINUX, *FAST, *both, "--netns", netns)
    own_netns = histstat("-j", *LINUX, *FAST, *both, "--netns", netns_inode("self"))
    unfiltered = histstat("-j", *LINUX, *FAST, *both)
    unfiltered.wait_for_child(inside)
    unfiltered.wait_for_child(outside)
    for run in (by_container, by_netns):
        run.wait_for_child(inside)
    own_netns.wait_for_child(outside)
    for run in (by_container, by_netns, own_netns, unfiltered):
        assert_clean_end(run.stop())
    for run in (by_container, by_netns):
        assert not [row for row in run.result.rows if row["pid"] == outside.pid]
        assert {row["container"] for row in run.result.rows} == {container}
        assert {row["netns"] for row in run.result.rows} == {netns}
    assert not [row for row in own_netns.result.rows if row["netns"] == netns]
    assert not [row for row in own_netns.result.rows if row["pid"] == inside.pid]


def test_ends_inside_a_namespace_arrive_as_they_happen(children, histstat):
    """The namespace's destroy broadcasts: at a long interval, the close rows of a
    container child's sockets carry the time the child exited, not the next poll's."""
    child, container = children.in_container(socket_child_argv())
    netns = netns_inode(child.pid)
    js = histstat("-j", "--closed", *LINUX, "-i", "8", "--pid", child.pid)
    js.wait_for_child(child)
    before = time.time()
    child.stop()
    after = time.time()
    # A close row keeps the last state seen: its key is compared without the status.
    wanted = {key[:5] for key in child.connections() if key[0].startswith("tcp")}

    def closes():
        rows = [row for row in js.rows() if row["event"] == "close"]
        return rows if wanted <= {connection_key(row)[:5] for row in rows} else None

    rows = js.until(closes, what=f"close rows of {sorted(wanted, key=str)}")
    assert_clean_end(js.stop())
    for row in rows:
        assert row["netns"] == netns and row["container"] == container, row
        assert before - 0.05 <= when(row) <= after + 1.0, (before, after, row)


def test_fifty_namespaces_come_and_go_without_leaks_or_repeats(children, histstat):
    """50 namespaces, each with a child holding connections, made and removed in batches
    while histstat runs: every connection is reported once, and histstat's descriptors
    and threads come back to where they were (no socket keeps a namespace alive)."""
    tag = f"ns{new_tag()}"
    js = histstat("-j", *LINUX, "-i", "0.2", "--name", f"{tag}*")
    hpid = js.proc.pid
    own = netns_inode("self")

    def settled():
        return sleeping_between_polls(hpid)

    # Its own descriptors once it runs: two polls in, between polls.
    js.until(settled, what="a first sleep between polls")
    js.until(lambda: not settled(), what="a second poll")
    js.until(settled, what="a second sleep between polls")
    descriptors = len(os.listdir(f"/proc/{hpid}/fd"))
    threads = len(os.listdir(f"/proc/{hpid}/task"))

    seen: dict[int, int] = {}
    for batch in range(5):
        batch_children = [
            children.start([*IN_NEW_NETNS, *socket_child_argv(f"{tag}{batch}{index}")])
            for index in range(10)
        ]
        for child in batch_children:
            js.wait_for_child(child, timeout=DEFAULT_TIMEOUT)
            seen[child.pid] = netns_inode(child.pid)
        # Ten namespaces at once; the kernel reuses a freed namespace's inode later.
        assert len({seen[child.pid] for child in batch_children} - {own}) == 10
        for child in batch_children:
            child.stop()

    def back() -> bool:
        return (
            len(os.listdir(f"/proc/{hpid}/fd")) <= descriptors
            and len(os.listdir(f"/proc/{hpid}/task")) <= threads
        )

    wait_for(
        back,
        DEFAULT_TIMEOUT,
        lambda: (
            f"histstat's fds {os.listdir(f'/proc/{hpid}/fd')} (were {descriptors}), "
            f"threads {len(os.listdir(f'/proc/{hpid}/task'))} (were {threads})"
        ),
    )
    assert_clean_end(js.stop())
    opened = collections.Counter(
        (row["pid"], row["netns"], connection_key(row)[:5])
        for row in js.result.rows
        if row["event"] == "open"
    )
    repeated = {key: count for key, count in opened.items() if count > 1}
    assert not repeated, repeated
    assert {row["pid"] for row in js.result.rows} == set(seen)
    for row in js.result.rows:
        assert row["netns"] == seen[row["pid"]], row


def test_connect_events_inside_a_container_carry_its_netns_and_container(children, histstat):
    """The tracepoint sees every namespace without naming it: each short connection a
    container's process makes, too short for any poll, is attributed at its connect,
    and takes the namespace and container of the process that connected."""
    try:
        root = locate_tracefs(environ={}).root
    except TracefsUnavailable as exc:
        pytest.fail(f"kernel connect events cannot be had here: {exc}")
    prefix, container = children.container()
    beacons = 10
    argv = [sys.executable, "-c", one_line_script(BEACON), str(beacons), "0.3", "stay"]
    child = subprocess.Popen([*prefix, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        port = int(read_line(child.stdout).decode(errors="replace"))
        netns = netns_inode(child.pid)
        js = histstat("-j", *LINUX, "--kernel-events", "on", "--port", port)
        ready(js, root)
        js.wait_for_rows(lambda row: row["status"] == "LISTEN")
        child.stdin.write(b"go\n")
        child.stdin.flush()
        ports = {int(p) for p in read_line(child.stdout, DEFAULT_TIMEOUT).decode().split()}
        assert len(ports) == beacons

        def opens():
            rows = {
                row["lport"]: row
                for row in js.rows()
                if row["event"] == "open" and row["rport"] == port
            }
            return rows if ports <= set(rows) else None

        rows = js.until(opens, what="an open row of every connection")
        assert_clean_end(js.stop())
        assert instances_of(root, js.proc.pid) == []
    finally:
        end_child(child)
    for client_port in ports:
        row = rows[client_port]
        assert (row["pid"], row["netns"], row["container"]) == (child.pid, netns, container), row
        assert row["attribution"] in ("connect", "socket"), row
    # At the default interval nearly none can be seen owned: the events did it.
    assert sum(rows[p]["attribution"] == "connect" for p in ports) >= beacons - 2


def test_namespaces_beyond_the_descriptor_limit_are_said_and_rows_keep_their_owners(
    children, histstat
):
    """Under a low ulimit -n, the namespaces whose sockets would leave histstat short of
    descriptors are not read, said once on stderr: the rows of its own namespace keep
    their process (any user may make namespaces, through a user namespace)."""
    own = netns_inode("self")
    sleepers = [
        subprocess.Popen(["unshare", "--net", "sleep", "60"], stdin=subprocess.DEVNULL)
        for _ in range(30)
    ]
    try:
        wait_for(
            lambda: all(netns_inode(sleeper.pid) != own for sleeper in sleepers),
            DEFAULT_TIMEOUT,
            "30 namespaces",
        )
        child = children.start(socket_child_argv())
        low = ("bash", "-c", 'ulimit -n 300 && exec "$0" "$@"')
        js = histstat("-j", *LINUX, *FAST, "--pid", child.pid, prefix=low)
        rows = js.wait_for_child(child)
        assert {row["pid"] for row in rows} == {child.pid}
        js.until(lambda: "not read" in js.stderr(), what="the notice of unread namespaces")
        result = js.stop()
    finally:
        for sleeper in sleepers:
            sleeper.kill()
            sleeper.wait(DEFAULT_TIMEOUT)
    said = [line for line in result.stderr.splitlines() if "not read" in line]
    assert len(said) == 1 and "ulimit -n is 300" in said[0], result.stderr
    assert result.returncode == 0, result.stderr

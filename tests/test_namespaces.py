"""Network namespaces: discovery from /proc, sockets created inside them, and the
registry that follows them; on a fake /proc, and as root on real namespaces the tests
make for their children."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import threading
import time

import pytest

from histstat.sources import namespaces
from histstat.sources.namespaces import (
    UNPRIVILEGED_REASON,
    NamespaceDiscovery,
    NamespaceGone,
    NamespaceSockets,
    process_start_time,
    socket_in_namespace,
)
from support.children import end_child
from support.namespaces import (
    as_nobody,
    descriptor_count,
    need_root,
    need_tools,
    netns_inode,
    netns_inode_if_entered,
    socket_inodes,
    tcp_sockets,
    thread_count,
)
from support.waiting import END_TIMEOUT, wait_for

SIOCGSKNS = 0x894C  # linux/sockios.h: an fd of the socket's network namespace


def socket_namespace(sock: socket.socket) -> int:
    """The inode of the network namespace a socket belongs to, asked of the kernel."""
    fd = fcntl.ioctl(sock.fileno(), SIOCGSKNS)
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def main_thread_namespace() -> int:
    assert threading.current_thread() is threading.main_thread()
    return os.stat("/proc/thread-self/ns/net").st_ino


# A fake /proc: <pid>/stat with a start time, <pid>/ns/net a link to "net:[INODE]".
def fake_process(proc, pid, start: int, netns: int) -> None:
    directory = proc / str(pid)
    (directory / "ns").mkdir(parents=True, exist_ok=True)
    fields = ["S"] + ["0"] * 18 + [str(start)] + ["0"] * 10
    (directory / "stat").write_text(f"{pid} (odd) name) " + " ".join(fields) + "\n")
    link = directory / "ns" / "net"
    if link.is_symlink():
        link.unlink()
    os.symlink(f"net:[{netns}]", link)


def fake_exit(proc, pid) -> None:
    directory = proc / str(pid)
    (directory / "ns" / "net").unlink()
    (directory / "ns").rmdir()
    (directory / "stat").unlink()
    directory.rmdir()


@pytest.fixture
def fake_proc(tmp_path):
    proc = tmp_path / "proc"
    fake_process(proc, "self", 1, 1)
    return proc


class Ticking:
    """A clock that advances a sixteenth of the sweep's pass at each reading."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += NamespaceDiscovery.SWEEP_SECONDS / 16
        return self.now


class CountingDiscovery(NamespaceDiscovery):
    """Counts the ns links it reads, and refuses those of the pids in ``refused``."""

    def __init__(self, proc, refused=(), clock=time.monotonic) -> None:
        super().__init__(str(proc), clock)
        self.reads: list[int] = []
        self.refused = set(refused)

    def read_link(self, pid: int) -> int | None:
        self.reads.append(pid)
        if pid in self.refused:
            raise PermissionError(13, "Permission denied")
        return super().read_link(pid)


def test_process_start_time_is_field_22_after_an_odd_name(fake_proc):
    fake_process(fake_proc, 10, 4242, 7)
    assert process_start_time(10, str(fake_proc)) == 4242
    assert process_start_time(11, str(fake_proc)) is None


def test_discovery_keeps_one_live_representative_per_namespace(fake_proc):
    fake_process(fake_proc, 10, 100, 1)
    fake_process(fake_proc, 11, 100, 2)
    fake_process(fake_proc, 12, 100, 2)
    discovery = NamespaceDiscovery(str(fake_proc))
    assert discovery.own == 1
    assert dict(discovery.scan()) == {1: 10, 2: 11}
    fake_exit(fake_proc, 11)
    assert dict(discovery.scan()) == {1: 10, 2: 12}
    fake_exit(fake_proc, 12)
    assert dict(discovery.scan()) == {1: 10}
    assert discovery.members(2) == frozenset()


def test_reused_pid_is_not_kept_as_representative(fake_proc):
    fake_process(fake_proc, 10, 100, 1)
    fake_process(fake_proc, 11, 100, 2)
    fake_process(fake_proc, 12, 100, 2)
    discovery = NamespaceDiscovery(str(fake_proc))
    assert dict(discovery.scan()) == {1: 10, 2: 11}
    # Between two scans pid 11 ended and a process in another namespace got its pid.
    fake_process(fake_proc, 11, 900, 3)
    assert dict(discovery.scan()) == {1: 10, 2: 12, 3: 11}
    fake_process(fake_proc, 12, 950, 1)
    assert dict(discovery.scan()) == {1: 10, 3: 11}


def test_unchanged_scan_reads_only_the_sweep_share_and_the_representatives(fake_proc):
    for pid in range(100, 164):
        fake_process(fake_proc, pid, 5, 1 if pid < 150 else 2)
    discovery = CountingDiscovery(fake_proc, clock=Ticking())
    assert dict(discovery.scan()) == {1: 100, 2: 150}
    discovery.scan()  # reads the pids new at the first call once more
    discovery.reads.clear()
    discovery.scan()
    # 64 processes, a sixteenth of the pass's time gone: 4 swept, then both representatives.
    assert len(discovery.reads) == 64 // 16 + 2
    assert {100, 150} <= set(discovery.reads)


def test_process_that_changes_namespace_is_found_within_the_sweep(fake_proc):
    for pid in range(100, 164):
        fake_process(fake_proc, pid, 5, 1)
    discovery = NamespaceDiscovery(str(fake_proc), Ticking())
    assert dict(discovery.scan()) == {1: 100}
    fake_process(fake_proc, 130, 5, 9)  # same process, unshare()d
    for _ in range(16):  # one pass of the sweep
        if 9 in discovery.scan():
            break
    assert dict(discovery.scan()) == {1: 100, 9: 130}


def test_new_process_that_changes_namespace_is_found_at_the_next_scan(fake_proc):
    for pid in range(100, 164):
        fake_process(fake_proc, pid, 5, 1)
    discovery = NamespaceDiscovery(str(fake_proc))
    discovery.scan()
    discovery.scan()
    fake_process(fake_proc, 170, 6, 1)  # forked, not yet unshare()d
    assert dict(discovery.scan()) == {1: 100}
    fake_process(fake_proc, 170, 6, 9)
    assert dict(discovery.scan()) == {1: 100, 9: 170}


def test_refused_namespaces_give_the_reason_and_the_others_stay(fake_proc):
    fake_process(fake_proc, 10, 100, 1)
    fake_process(fake_proc, 11, 100, 2)
    discovery = CountingDiscovery(fake_proc, refused={11})
    assert discovery.reason is None
    assert dict(discovery.scan()) == {1: 10}
    assert (discovery.denied, discovery.reason) == (1, UNPRIVILEGED_REASON)
    fake_exit(fake_proc, 11)
    discovery.scan()
    assert (discovery.denied, discovery.reason) == (0, None)


class FakeSockets(NamespaceSockets):
    """A registry over a fake /proc whose sockets are plain ones, and whose opening
    fails as ``failures`` says for a namespace."""

    def __init__(self, proc, failures=None) -> None:
        super().__init__(NamespaceDiscovery(str(proc)))
        self.failures = failures if failures is not None else {}
        self.attempts: list[int] = []

    def open_socket(self, pid: int, inode: int) -> socket.socket:
        self.attempts.append(inode)
        failure = self.failures.get(inode)
        if failure is not None:
            raise failure
        return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)


def test_registry_opens_for_new_namespaces_and_closes_for_gone_ones(fake_proc):
    fake_process(fake_proc, 10, 100, 1)
    fake_process(fake_proc, 11, 100, 2)
    with FakeSockets(fake_proc) as registry:
        assert registry.update() == ((2,), ())  # histstat's own namespace has none
        opened = registry.sockets[2]
        assert registry.update() == ((), ())
        fake_process(fake_proc, 12, 100, 3)
        fake_exit(fake_proc, 11)
        assert registry.update() == ((3,), (2,))
        assert opened.fileno() == -1  # closed
        assert list(registry.sockets) == [3]
        kept = registry.sockets[3]
    assert kept.fileno() == -1
    assert dict(registry.sockets) == {}


def test_registry_keeps_descriptors_for_the_rest_and_opens_once_they_are_spare(
    fake_proc, monkeypatch
):
    """Namespaces that would leave fewer than RESERVED_DESCRIPTORS spare are left unread,
    without an attempt, and read once descriptors are free again."""
    for pid, inode in ((10, 1), (11, 2), (12, 3), (13, 4)):
        fake_process(fake_proc, pid, 100, inode)
    spare = [namespaces.RESERVED_DESCRIPTORS + 2 * NamespaceSockets.DESCRIPTORS]
    monkeypatch.setattr(namespaces, "spare_descriptors", lambda: spare[0])
    with FakeSockets(fake_proc) as registry:
        assert len(registry.update().opened) == 2
        assert (registry.unread, len(registry.attempts)) == (1, 2)
        spare[0] = namespaces.RESERVED_DESCRIPTORS + NamespaceSockets.DESCRIPTORS
        assert len(registry.update().opened) == 1
        assert (registry.unread, len(registry.attempts), len(registry.sockets)) == (0, 3, 3)


def test_registry_retries_a_gone_representative_but_not_a_refusal(fake_proc):
    fake_process(fake_proc, 10, 100, 1)
    fake_process(fake_proc, 11, 100, 2)
    fake_process(fake_proc, 12, 100, 3)
    failures = {2: NamespaceGone(0, "reused"), 3: PermissionError(1, "not permitted")}
    with FakeSockets(fake_proc, failures) as registry:
        assert registry.update() == ((), ())
        assert registry.reason == UNPRIVILEGED_REASON
        registry.attempts.clear()
        del failures[2]
        assert registry.update() == ((2,), ())
        assert registry.attempts == [2]  # the refused namespace is not tried again


# As root, on real namespaces.


def test_discovery_finds_the_childs_namespace_with_the_child_as_representative(netns_children):
    child = netns_children()
    inode = netns_inode(child.pid)
    discovery = NamespaceDiscovery()
    assert discovery.own == netns_inode("self") != inode
    held = discovery.scan()
    assert held[inode] == child.pid  # alone in its namespace
    assert discovery.namespace_of(held[discovery.own]) == discovery.own
    child.stop()
    wait_for(lambda: inode not in discovery.scan(), describe="the ended namespace stays listed")


def test_socket_in_namespace_belongs_to_it_and_the_main_thread_stays(netns_children):
    child = netns_children()
    inode = netns_inode(child.pid)
    before = main_thread_namespace()
    with socket_in_namespace(child.pid, inode) as sock:
        assert socket_namespace(sock) == inode
        assert main_thread_namespace() == before
    with socket_in_namespace(child.pid, inode, socket.AF_INET, socket.SOCK_STREAM, 0) as tcp:
        assert socket_namespace(tcp) == inode
    assert main_thread_namespace() == before
    assert not [t for t in threading.enumerate() if t.name.startswith("histstat-netns")]


def test_dump_through_the_namespace_socket_sees_the_childs_connection(netns_children):
    child = netns_children()
    inode = netns_inode(child.pid)
    held = socket_inodes(child.pid)
    with NamespaceSockets() as registry:
        changes = registry.update()
        assert inode in changes.opened
        inside = tcp_sockets(registry.sockets[inode])
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 4) as own:
        outside = tcp_sockets(own)
    mine = {ends for sock_inode, ends in inside.items() if sock_inode in held}
    host = "127.0.0.1"
    assert {
        (host, child.lport, "0.0.0.0", 0, 10),  # LISTEN
        (host, child.cport, host, child.lport, 1),  # ESTABLISHED, both ends
        (host, child.lport, host, child.cport, 1),
    } == mine
    assert not held & outside.keys()  # histstat's own namespace does not have them


def test_ended_representative_is_never_entered(netns_children):
    child = netns_children()
    pid, inode = child.pid, netns_inode(child.pid)
    child.stop()  # ended and reaped: its pid may be anyone's now
    with pytest.raises(NamespaceGone):
        socket_in_namespace(pid, inode)


def test_live_pid_in_another_namespace_is_never_entered(netns_children):
    child = netns_children()
    inode = netns_inode(child.pid)
    before = main_thread_namespace()
    # As if the representative's pid had been reused by a process in the host namespace.
    with pytest.raises(NamespaceGone, match=f"not {inode}"):
        socket_in_namespace(os.getpid(), inode)
    assert main_thread_namespace() == before


def test_registry_follows_fifty_namespaces_without_leaks():
    need_root("namespaces of the test's own")
    need_tools("unshare")
    main_namespace = main_thread_namespace()
    fds, threads = descriptor_count(), thread_count()
    children: list[subprocess.Popen] = []

    def start(count: int) -> list[subprocess.Popen]:
        started = [
            subprocess.Popen(["unshare", "--net", "cat"], stdin=subprocess.PIPE)
            for _ in range(count)
        ]
        children.extend(started)
        return started

    def namespaces(group) -> set[int]:
        return {
            wait_for(lambda child=child: netns_inode_if_entered(child.pid, main_namespace))
            for child in group
        }

    try:
        with NamespaceSockets() as registry:
            registry.update()
            first = namespaces(start(25))
            assert first <= set(registry.update().opened)
            second = namespaces(start(25))
            for child in children[:25]:
                end_child(child)
            changes = registry.update()
            assert second <= set(changes.opened)
            assert first <= set(changes.closed)
            for child in children[25:]:
                end_child(child)
            changes = registry.update()
            assert second <= set(changes.closed)
            assert not (first | second) & registry.sockets.keys()
            assert main_thread_namespace() == main_namespace
    finally:
        for child in children:
            end_child(child)
    assert descriptor_count() == fds
    wait_for(lambda: thread_count() == threads, END_TIMEOUT, "worker threads left running")


def test_unprivileged_registry_watches_none_and_says_why(netns_children):
    child = netns_children()
    inode = netns_inode(child.pid)

    def registry_as_nobody() -> dict:
        with NamespaceSockets() as registry:
            changes = registry.update()
            return {
                "opened": list(changes.opened),
                "listed": inode in registry.discovery.scan(),
                "own": registry.own,
                "reason": registry.reason,
            }

    seen = as_nobody(registry_as_nobody)
    assert seen == {
        "opened": [],
        "listed": False,
        "own": netns_inode("self"),
        "reason": UNPRIVILEGED_REASON,
    }


def test_socket_finished_after_the_caller_gave_up_is_closed(monkeypatch):
    """Entering histstat's own namespace (through its own pid) needs no root: the worker
    is held inside setns until the caller has timed out, then finishes its socket."""
    release = threading.Event()
    done = threading.Event()
    created: list[socket.socket] = []
    real_socket = socket.socket

    def held_setns(fd: int, nstype: int) -> None:
        release.wait(END_TIMEOUT)

    def recorded_socket(*args):
        created.append(real_socket(*args))
        done.set()
        return created[-1]

    monkeypatch.setattr(namespaces, "_setns", held_setns)
    monkeypatch.setattr(namespaces.socket, "socket", recorded_socket)
    fds = descriptor_count()
    own = netns_inode("self")
    with pytest.raises(TimeoutError):
        socket_in_namespace(os.getpid(), own, socket.AF_INET, socket.SOCK_DGRAM, 0, timeout=0.05)
    release.set()
    wait_for(done.is_set, END_TIMEOUT, "the worker did not finish")
    wait_for(lambda: created[0].fileno() == -1, END_TIMEOUT, "the late socket stayed open")
    assert descriptor_count() == fds


def test_registries_sharing_a_discovery_follow_one_scan(fake_proc):
    fake_process(fake_proc, 10, 100, 1)
    fake_process(fake_proc, 11, 100, 2)
    first = FakeSockets(fake_proc)
    second = FakeSockets(fake_proc)
    second.discovery = first.discovery
    with first, second:
        held = first.discovery.scan()
        assert first.update(held) == second.update(held) == ((2,), ())
        fake_exit(fake_proc, 11)
        held = first.discovery.scan()
        assert first.update(held) == second.update(held) == ((), (2,))


def link_exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


def test_closing_a_gone_namespaces_socket_frees_the_namespace_and_its_veth(netns_children):
    """A veth pair between the host and the child's namespace lives as long as that
    namespace: it outlives the child while the registry's socket holds the namespace,
    and goes once the registry has closed it."""
    child = netns_children()
    host_end = f"hsv{os.urandom(4).hex()}"
    made = subprocess.run(
        ["ip", "link", "add", host_end, "type", "veth", "peer", "name", "inside", "netns"]
        + [str(child.pid)],
        capture_output=True,
    )
    try:
        assert made.returncode == 0, made.stderr.decode(errors="replace")
        inode = netns_inode(child.pid)
        with NamespaceSockets() as registry:
            assert inode in registry.update().opened
            child.stop()
            wait_for(
                lambda: inode not in registry.discovery.scan(), describe="the child's namespace"
            )
            # Kept alive by the registry's socket alone.
            assert socket_namespace(registry.sockets[inode]) == inode
            assert link_exists(host_end)
            assert inode in registry.update().closed
            wait_for(lambda: not link_exists(host_end), describe=f"{host_end} outlived it")
    finally:
        if link_exists(host_end):
            subprocess.run(["ip", "link", "del", host_end], capture_output=True)


def test_a_refused_process_in_histstats_own_namespace_is_filed_there(fake_proc):
    """Its ns link is refused, yet its /proc/PID/net files are histstat's own: it is in
    histstat's namespace, and nothing is missing."""
    for pid in ("self", 10, 11):
        (fake_proc / str(pid) / "net").mkdir(parents=True, exist_ok=True)
    fake_process(fake_proc, 10, 100, 1)
    fake_process(fake_proc, 11, 100, 2)
    (fake_proc / "self" / "net" / "dev").write_text("own")
    os.link(fake_proc / "self" / "net" / "dev", fake_proc / "10" / "net" / "dev")
    (fake_proc / "11" / "net" / "dev").write_text("another namespace's")
    discovery = CountingDiscovery(fake_proc, refused={10, 11})
    assert dict(discovery.scan()) == {1: 10}
    assert discovery.members(1) == {10}
    assert (discovery.denied, discovery.reason) == (1, UNPRIVILEGED_REASON)  # pid 11 alone
    (fake_proc / "11" / "net" / "dev").unlink()
    (fake_proc / "11" / "net").rmdir()
    fake_exit(fake_proc, 11)
    discovery.scan()
    assert (discovery.denied, discovery.reason) == (0, None)

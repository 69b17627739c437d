"""The Linux source reads the kernel's socket tables and finds their owners like psutil."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from support.children import end_child
from support.waiting import DEFAULT_TIMEOUT, POLL_STEP, read_line

if not sys.platform.startswith("linux"):
    pytest.skip("the Linux source reads Linux's /proc and netlink", allow_module_level=True)

from histstat.records import Connection  # noqa: E402
from histstat.sources.linux import LinuxSource, parse_proc_net  # noqa: E402
from histstat.sources.owners import SocketOwners  # noqa: E402
from histstat.sources.psutil_source import PsutilSource  # noqa: E402

HEADER = (
    b"  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt"
    b"   uid  timeout inode\n"
)


def proc_net(*lines: str) -> bytes:
    return HEADER + b"".join(line.encode() + b"\n" for line in lines)


def parsed(data: bytes, proto: str) -> list:
    """parse_proc_net's rows without their cookie and counters, which /proc/net lacks."""
    rows = parse_proc_net(data, proto)
    assert all(row[8:] == (None, None) for row in rows)
    return [row[:8] for row in rows]


# --------------------------------------------------------------------------- parsing


def test_ipv4_tcp_lines_become_rows_like_psutil():
    data = proc_net(
        "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000"
        "        0 4242 1 0000000000000000 100 0 0 10 0",
        "   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000  1000"
        "        0 4243 1 0000000000000000 20 4 30 10 -1",
        "   2: 0100007F:C893 0100007F:9A94 06 00000000:00000000 03:000014DF 00000000     0"
        "        0 0 3 00000000e15db370",
        "   3: 00000000:0000 00000000:0000 07 00000000:00000000 00:00000000 00000000  1000"
        "        0 4244 1 0000000000000000 100 0 0 10 0",
    )
    assert parsed(data, "tcp") == [
        ("tcp", "127.0.0.1", 8080, None, None, "LISTEN", 4242, 1000),
        ("tcp", "127.0.0.1", 8080, "127.0.0.1", 54321, "ESTABLISHED", 4243, 1000),
        # TIME_WAIT: no socket left, so inode 0 and uid 0.
        ("tcp", "127.0.0.1", 51347, "127.0.0.1", 39572, "TIME_WAIT", 0, 0),
        # The unbound socket (port 0) is left out, as psutil leaves it out.
    ]


def test_ipv6_loopback_and_ipv4_mapped_addresses_are_written_like_inet_ntop():
    data = proc_net(
        "   0: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000"
        " 0A 00000000:00000000 00:00000000 00000000     0        0 5000 1 0 100 0 0 10 0",
        "   1: 0000000000000000FFFF00000100007F:0050 0000000000000000FFFF00000100007F:9E49"
        " 08 00000000:00000000 00:00000000 00000000    33        0 5001 1 0 20 4 30 10 -1",
        "   2: 000080FE00000000FF005452C7D2A5FE:0016 000080FE00000000FF005452010000FE:C001"
        " 0B 00000000:00000000 00:00000000 00000000     0        0 5002 1 0 20 4 30 10 -1",
    )
    assert parsed(data, "tcp6") == [
        ("tcp6", "::1", 80, None, None, "LISTEN", 5000, 0),
        ("tcp6", "::ffff:127.0.0.1", 80, "::ffff:127.0.0.1", 40521, "CLOSE_WAIT", 5001, 33),
        ("tcp6", "fe80::5254:ff:fea5:d2c7", 22, "fe80::5254:ff:fe00:1", 49153, "CLOSING", 5002, 0),
    ]


def test_udp_has_no_status_and_a_remote_end_only_when_connected():
    data = proc_net(
        "  120: 3500007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000   101"
        "        0 6000 2 0000000000000000 0",
        "  121: 0100007F:A001 0100007F:0035 01 00000000:00000000 00:00000000 00000000  1000"
        "        0 6001 2 0000000000000000 0",
    )
    assert parsed(data, "udp") == [
        ("udp", "127.0.0.53", 53, None, None, None, 6000, 101),
        ("udp", "127.0.0.1", 40961, "127.0.0.1", 53, None, 6001, 1000),
    ]
    data6 = proc_net(
        "  7: 00000000000000000000000000000000:14E9 00000000000000000000000000000000:0000"
        " 07 00000000:00000000 00:00000000 00000000     0        0 6002 2 0 0",
    )
    assert parsed(data6, "udp6") == [("udp6", "::", 5353, None, None, None, 6002, 0)]


def test_an_address_cache_gives_the_same_rows():
    data = proc_net(
        "   0: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000  1000"
        "        0 4243 1 0000000000000000 20 4 30 10 -1",
    )
    cache: dict = {}
    first = parse_proc_net(data, "tcp", cache)
    assert cache
    assert parse_proc_net(data, "tcp", cache) == first == parse_proc_net(data, "tcp")


# --------------------------------------------------------------------------- a fake /proc


class FakeProc:
    """A /proc tree in a directory: processes with a start time and socket descriptors,
    and the /proc/net tables."""

    def __init__(self, root) -> None:
        self.root = root
        (root / "net").mkdir()
        self.set_table([])

    def process(self, pid: int, start: int, fds: dict, state: str = "S", ppid: int = 0) -> None:
        """(Re)create process ``pid``, child of ``ppid``; ``fds`` maps fd numbers to link
        targets, an int meaning that socket inode."""
        self.remove(pid)
        base = self.root / str(pid)
        (base / "fd").mkdir(parents=True)
        later = " ".join([state, str(ppid)] + ["0"] * 17 + [str(start)] + ["0"] * 30)
        (base / "stat").write_text(f"{pid} (a (weird) name) {later}\n")
        for fd, target in fds.items():
            link = f"socket:[{target}]" if isinstance(target, int) else target
            os.symlink(link, base / "fd" / str(fd))

    def remove(self, pid: int) -> None:
        base = self.root / str(pid)
        if base.exists():
            for entry in (base / "fd").iterdir():
                entry.unlink()
            (base / "fd").rmdir()
            (base / "stat").unlink()
            base.rmdir()

    def set_table(self, sockets: list) -> None:
        """tcp sockets as (lport, inode) ESTABLISHED to 127.0.0.1:80; the others empty."""
        lines = [
            f"{n:4}: 0100007F:{lport:04X} 0100007F:0050 01 00000000:00000000 00:00000000"
            f" 00000000  1000        0 {inode} 1 0000000000000000 20 4 30 10 -1"
            for n, (lport, inode) in enumerate(sockets)
        ]
        (self.root / "net" / "tcp").write_bytes(proc_net(*lines))
        for name in ("tcp6", "udp", "udp6"):
            (self.root / "net" / name).write_bytes(HEADER)


class CountingOwners(SocketOwners):
    """SocketOwners that records which processes' descriptors it read, on a clock the
    test moves (``clock``, in seconds), so the sweep reads only what the test lets it."""

    def __init__(self, proc) -> None:
        super().__init__(str(proc))
        self.scanned: list = []
        self.clock = 0.0

    def now(self) -> float:
        return self.clock

    def socket_inodes(self, pid: int):
        self.scanned.append(pid)
        return super().socket_inodes(pid)

    def scan(self, inodes, after: float = 0.0) -> dict:
        """One poll, ``after`` seconds after the previous one."""
        self.clock += after
        self.scanned = []
        return dict(self.owners(inodes))


@pytest.fixture
def fake_proc(tmp_path):
    return FakeProc(tmp_path)


def test_a_poll_of_known_inodes_reads_no_descriptors(fake_proc):
    fake_proc.process(100, start=10, fds={3: 1001, 4: 1002})
    owners = CountingOwners(fake_proc.root)
    assert owners.scan({1001, 1002}) == {1001: (100,), 1002: (100,)}
    assert owners.scanned == [100]
    assert owners.scan({1001, 1002}) == {1001: (100,), 1002: (100,)}
    assert owners.scanned == []
    assert owners.scan({1001}) == {1001: (100,)}  # a socket closed: still nothing to read
    assert owners.scanned == []


def test_the_first_poll_reads_every_process_and_finds_every_holder(fake_proc):
    fake_proc.process(100, start=10, fds={3: 1001})
    fake_proc.process(200, start=20, fds={3: 2001, 4: 1001})
    fake_proc.process(300, start=30, fds={0: "/dev/null", 1: "pipe:[77]", 3: 3001, 7: 1001})
    owners = CountingOwners(fake_proc.root)
    assert owners.scan({1001, 2001}) == {1001: (100, 200, 300), 2001: (200,)}
    assert owners.scanned == [300, 200, 100]  # newest first


def test_holders_are_ordered_by_start_time_then_pid(fake_proc):
    # pid 50 is a later process than 400 (pids wrap): start time, not pid, comes first.
    fake_proc.process(400, start=10, fds={3: 1001})
    fake_proc.process(50, start=30, fds={3: 1001})
    fake_proc.process(300, start=20, fds={3: 1001})
    fake_proc.process(200, start=20, fds={5: 1001})  # the same tick as 300
    owners = CountingOwners(fake_proc.root)
    assert owners.scan({1001}) == {1001: (400, 200, 300, 50)}


def test_a_new_socket_is_found_in_its_recent_owner_first_and_the_scan_stops_there(fake_proc):
    fake_proc.process(100, start=10, fds={3: 1001})
    fake_proc.process(200, start=20, fds={3: 2001})
    fake_proc.process(300, start=30, fds={3: 3001})
    owners = CountingOwners(fake_proc.root)
    assert owners.scan({1001}) == {1001: (100,)}

    fake_proc.process(100, start=10, fds={3: 1001, 5: 1005})
    assert owners.scan({1001, 1005}) == {1001: (100,), 1005: (100,)}
    assert owners.scanned == [100]

    # 300 held 3001 before it was in the table: it is looked for from the newest pid.
    assert owners.scan({1001, 1005, 3001}) == {1001: (100,), 1005: (100,), 3001: (300,)}
    assert owners.scanned == [100, 300]


def test_a_process_forked_after_the_first_sight_is_found_at_the_next_poll(fake_proc):
    fake_proc.process(100, start=10, fds={3: 1001})
    fake_proc.process(200, start=20, fds={3: 2001})
    owners = CountingOwners(fake_proc.root)
    assert owners.scan({1001}) == {1001: (100,)}
    fake_proc.process(150, start=40, fds={3: 1001, 4: 1501})  # a child, with a new pid
    assert owners.scan({1001, 1501}) == {1001: (100, 150), 1501: (150,)}
    assert owners.scanned == [150]
    # A child is read once more at the next poll: it may close what it inherited (at
    # exec, or like a server's worker that drops the listener).
    fake_proc.process(150, start=40, fds={4: 1501})
    assert owners.scan({1001, 1501}) == {1001: (100,), 1501: (150,)}
    assert owners.scanned == [150]
    assert owners.scan({1001, 1501}) == {1001: (100,), 1501: (150,)}
    assert owners.scanned == []


def test_a_new_socket_first_found_in_new_children_is_found_in_their_parent_too(fake_proc):
    fake_proc.process(1, start=1, fds={3: 101})
    fake_proc.process(100, start=10, fds={0: "/dev/null"}, ppid=1)  # bash, read long ago
    owners = CountingOwners(fake_proc.root)
    assert owners.scan({101}) == {101: (1,)}
    assert owners.scan({101}) == {101: (1,)}
    # bash opens 5001 and forks two sleeps that share it: new processes, read first.
    fake_proc.process(100, start=10, fds={3: 5001}, ppid=1)
    fake_proc.process(200, start=20, fds={3: 5001}, ppid=100)
    fake_proc.process(201, start=21, fds={3: 5001}, ppid=100)
    assert owners.scan({101, 5001}) == {101: (1,), 5001: (100, 200, 201)}
    # Up from the first sleep while each parent holds it (pid 1 does not: the climb
    # stops there); the second sleep's parent was read already.
    assert owners.scanned == [201, 100, 1, 200]
    # A known socket in a new child reads no parent.
    fake_proc.process(202, start=22, fds={3: 5001}, ppid=100)
    assert owners.scan({101, 5001}) == {101: (1,), 5001: (100, 200, 201, 202)}
    assert owners.scanned == [202, 201, 200]  # 201 and 200: read a second time


def test_the_climb_through_parents_is_bounded(fake_proc):
    chain = range(100, 100 + SocketOwners.ANCESTORS + 3)
    for pid in chain:
        fake_proc.process(pid, start=pid, fds={3: 5001}, ppid=pid - 1)
    owners = CountingOwners(fake_proc.root)
    assert owners.scan(set()) == {}
    newest = chain[-1] + 1
    fake_proc.process(newest, start=newest, fds={3: 5001}, ppid=newest - 1)
    climbed = list(range(newest - 1, newest - 1 - SocketOwners.ANCESTORS, -1))
    assert owners.scan({5001}) == {5001: tuple(sorted(climbed)) + (newest,)}
    assert owners.scanned == [newest, *climbed]  # the oldest are left to the sweep


def test_the_sweep_finds_a_passed_socket_and_a_closed_copy_within_a_pass(fake_proc):
    for pid in range(100, 110):
        fake_proc.process(pid, start=pid, fds={3: pid * 10})
    owners = CountingOwners(fake_proc.root)
    table = {pid * 10 for pid in range(100, 110)}
    assert owners.scan(table)[1000] == (100,)
    # 100 and 101 pass their sockets to 109 and 108, processes that already ran: neither
    # is a new process nor a new socket.
    fake_proc.process(109, start=109, fds={3: 1090, 4: 1000})
    fake_proc.process(108, start=108, fds={3: 1080, 4: 1010})
    assert owners.scan(table, after=0.05)[1000] == (100,)
    assert owners.scanned == []  # too soon for even one process of the sweep
    seen = owners.scan(table, after=owners.SWEEP_SECONDS / 2)
    assert owners.scanned == [100, 101, 102, 103, 104]  # half the processes, in order
    assert seen[1000] == (100,)
    seen = owners.scan(table, after=owners.SWEEP_SECONDS / 2)
    assert owners.scanned == [105, 106, 107, 108, 109]
    assert seen[1000] == (100, 109)
    assert seen[1010] == (101, 108)
    fake_proc.process(108, start=108, fds={3: 1080})  # 108 closes its copy
    owners.scan(table, after=3 * owners.SWEEP_SECONDS)  # a whole pass at most, in one poll
    assert owners.scanned == list(range(100, 110))
    assert owners.scan(table)[1010] == (101,)


def test_an_inode_no_process_owns_stops_causing_scans_until_it_leaves_the_table(fake_proc):
    fake_proc.process(100, start=10, fds={3: 1001})
    owners = CountingOwners(fake_proc.root)
    assert owners.scan({1001, 9999}) == {1001: (100,)}
    assert owners.scanned == [100]
    # One more look, for a socket caught before its descriptor was installed.
    assert owners.scan({1001, 9999}) == {1001: (100,)}
    assert owners.scanned == [100]
    for _ in range(3):
        assert owners.scan({1001, 9999}) == {1001: (100,)}
        assert owners.scanned == []
    # Gone from the table, it is forgotten: the same inode number again is looked for.
    owners.scan({1001})
    fake_proc.process(200, start=20, fds={3: 9999})
    assert owners.scan({1001, 9999}) == {1001: (100,), 9999: (200,)}


def test_a_socket_found_on_its_second_look_gets_its_owner(fake_proc):
    owners = CountingOwners(fake_proc.root)
    assert owners.scan({1001}) == {}
    fake_proc.process(100, start=10, fds={3: 1001})
    assert owners.scan({1001}) == {1001: (100,)}


def test_a_reused_pid_never_keeps_the_old_processes_sockets(fake_proc):
    fake_proc.process(100, start=10, fds={3: 1001})
    owners = CountingOwners(fake_proc.root)
    assert owners.scan({1001}) == {1001: (100,)}
    # The parent exits and its pid goes to an unrelated process; a child holds 1001.
    fake_proc.process(100, start=99, fds={3: 5555})
    fake_proc.process(200, start=20, fds={3: 1001})
    assert owners.scan({1001}) == {1001: (200,)}
    # Had nobody else held it, it would have no owner rather than the wrong one.
    fake_proc.process(100, start=10, fds={3: 1002})
    assert owners.scan({1002}) == {1002: (100,)}
    fake_proc.process(100, start=11, fds={})
    assert owners.scan({1002}).get(1002) is None


def test_a_holder_that_exits_leaves_the_others(fake_proc):
    fake_proc.process(100, start=10, fds={3: 1001})
    fake_proc.process(200, start=20, fds={3: 1001})
    owners = CountingOwners(fake_proc.root)
    assert owners.scan({1001}) == {1001: (100, 200)}
    fake_proc.remove(100)
    assert owners.scan({1001}) == {1001: (200,)}
    assert owners.scanned == []  # gone from the list of pids: no read needed


def test_a_zombie_holds_nothing(fake_proc):
    fake_proc.process(100, start=10, fds={3: 1001})
    fake_proc.process(200, start=20, fds={3: 1001})
    owners = CountingOwners(fake_proc.root)
    assert owners.scan({1001}) == {1001: (100, 200)}
    # An exited process its parent has not reaped yet keeps its pid and start time,
    # but the kernel has closed its descriptors.
    fake_proc.process(200, start=20, fds={3: 1001}, state="Z")
    assert owners.scan({1001}) == {1001: (100,)}


def test_a_reused_descriptor_number_moves_the_socket_it_held_to_its_other_owner(fake_proc):
    fake_proc.process(100, start=10, fds={3: 1001})
    fake_proc.process(200, start=20, fds={3: 1001})
    owners = CountingOwners(fake_proc.root)
    assert owners.scan({1001}) == {1001: (100, 200)}
    # 100 closes its copy and its next socket gets the same descriptor number: looking
    # for the new socket in 100 shows that it let go of the other.
    fake_proc.process(100, start=10, fds={3: 2002})
    assert owners.scan({1001, 2002}) == {1001: (200,), 2002: (100,)}
    assert owners.scanned == [100]


def test_vanished_and_unreadable_processes_are_skipped(fake_proc, tmp_path):
    fake_proc.process(100, start=10, fds={3: 1001})
    owners = CountingOwners(fake_proc.root)
    # A pid listed but gone before its turn, one whose fd directory cannot be opened,
    # one whose stat is unreadable.
    (tmp_path / "250").mkdir()
    (tmp_path / "240").mkdir()
    (tmp_path / "240" / "fd").write_text("not a directory")
    (tmp_path / "240" / "stat").write_text("240 (x) S " + "0 " * 40)
    original = owners.pids
    owners.pids = lambda: original() + [300]
    assert owners.scan({1001}) == {1001: (100,)}
    assert owners.start_time(300) is None
    assert owners.socket_inodes(300) is None
    assert owners.socket_inodes(240) is None


def test_an_unlistable_proc_keeps_what_is_known_and_still_checks_start_times(fake_proc):
    fake_proc.process(100, start=10, fds={3: 1001})
    owners = CountingOwners(fake_proc.root)
    assert owners.scan({1001}) == {1001: (100,)}
    owners.pids = lambda: None  # /proc could not be listed (no descriptor left)
    assert owners.scan({1001}, after=owners.SWEEP_SECONDS) == {1001: (100,)}
    assert owners.scanned == []
    fake_proc.process(100, start=11, fds={})  # the pid of another process now
    assert owners.scan({1001}) == {}


def test_the_source_reads_a_proc_tree_and_reports_the_kernels_uid(fake_proc):
    fake_proc.process(100, start=10, fds={3: 1001})
    fake_proc.set_table([(40000, 1001), (40001, 0), (40002, 4242)])
    source = LinuxSource(proc=str(fake_proc.root))
    conns = source.snapshot()
    assert conns == {
        Connection("tcp", "127.0.0.1", 40000, "127.0.0.1", 80, "ESTABLISHED", 100, owners=(100,)),
        Connection("tcp", "127.0.0.1", 40001, "127.0.0.1", 80, "ESTABLISHED", None),
        Connection("tcp", "127.0.0.1", 40002, "127.0.0.1", 80, "ESTABLISHED", None),
    }
    assert {source.uid_of(conn) for conn in conns} == {1000}
    assert source.uid_of(Connection("tcp", "127.0.0.1", 1, None, None, "LISTEN", None)) is None


def test_the_socket_inodes_of_a_real_process_are_its_sockets():
    with socket.socket() as sock:
        inode = os.fstat(sock.fileno()).st_ino
        assert inode in SocketOwners().socket_inodes(os.getpid())
        assert SocketOwners().start_time(os.getpid()) is not None


# --------------------------------------------------------------------------- real sockets

# Each child holds GROUPS × (listener, client, accepted, UDP) on 127.0.0.1 and on ::1 when
# it can, and where IPv6 works an IPv4 connection to a dual-stack listener, whose tcp6
# ends the kernel shows as IPv4-mapped addresses. It prints its local ports as JSON and
# keeps every socket, plus any inherited descriptor, until its stdin reaches EOF.
HOLDER = """
import json, socket, sys
keep, ports = [], []
def hold(sock):
    keep.append(sock)
    ports.append(sock.getsockname()[1])
def groups(family, host, count):
    for _ in range(count):
        server = socket.socket(family, socket.SOCK_STREAM)
        server.bind((host, 0))
        server.listen(8)
        hold(server)
        client = socket.socket(family, socket.SOCK_STREAM)
        client.connect(server.getsockname()[:2])
        hold(client)
        keep.append(server.accept()[0])
        datagram = socket.socket(family, socket.SOCK_DGRAM)
        datagram.bind((host, 0))
        hold(datagram)
count = int(sys.argv[1])
groups(socket.AF_INET, "127.0.0.1", count)
try:
    groups(socket.AF_INET6, "::1", count)
    server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    server.bind(("::ffff:127.0.0.1", 0))
    server.listen(8)
    hold(server)
    client = socket.create_connection(("127.0.0.1", server.getsockname()[1]))
    hold(client)
    keep.append(server.accept()[0])
except OSError:
    pass
print(json.dumps(ports), flush=True)
sys.stdin.buffer.read()
"""
GROUPS = 12  # per family: about 100 sockets per child with IPv6


@pytest.fixture
def holders():
    """Three children holding loopback sockets; the first two also share one listener."""
    children: list = []
    shared = socket.socket()
    shared.bind(("127.0.0.1", 0))
    shared.listen(1)
    shared_port = shared.getsockname()[1]
    try:
        for index in range(3):
            pass_fds = (shared.fileno(),) if index < 2 else ()
            child = subprocess.Popen(
                [sys.executable, "-c", HOLDER, str(GROUPS)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                pass_fds=pass_fds,
            )
            children.append(child)
            child.ports = json.loads(read_line(child.stdout, DEFAULT_TIMEOUT))
        shared.close()
        yield children, shared_port
    finally:
        shared.close()
        for child in children:
            end_child(child, DEFAULT_TIMEOUT)


def _by_key(conns, ports: set) -> dict:
    """(proto, laddr, lport, raddr, rport, status) → pids, for the given local ports, in
    this process's network namespace (psutil reads no other)."""
    own = os.stat("/proc/self/ns/net").st_ino
    found: dict = {}
    for conn in conns:
        if conn.lport in ports and conn.netns == own:
            found.setdefault(conn[:6], set()).add(conn.pid)
    return found


def _differences(linux: dict, reference: dict, pids: set, sharers: set, shared: int) -> list:
    """How the two sources disagree on the sockets either gives to one of ``pids``
    (another process's socket may have one of the children's port numbers)."""
    problems = []
    for key in linux.keys() | reference.keys():
        mine, theirs = linux.get(key, set()), reference.get(key, set())
        if not (mine | theirs) & pids:
            continue
        if key[2] == shared and key[5] == "LISTEN":
            if len(mine) != 1 or not mine <= sharers or not theirs:
                problems.append(f"shared {key}: linux {mine}, psutil {theirs}, owners {sharers}")
        elif mine != theirs:
            problems.append(f"{key}: linux pids {mine}, psutil {theirs}")
    return problems


def test_the_linux_source_agrees_with_psutil_on_real_sockets(holders, live_source):
    children, shared_port = holders
    ports = {port for child in children for port in child.ports} | {shared_port}
    pids = {child.pid for child in children}
    sharers = {children[0].pid, children[1].pid}
    source = live_source()
    deadline = time.monotonic() + DEFAULT_TIMEOUT
    while True:
        linux = _by_key(source.snapshot(), ports)
        reference = _by_key(PsutilSource().snapshot(), ports)
        problems = _differences(linux, reference, pids, sharers, shared_port)
        # A socket can change between the two reads (a neighbour's connection closing):
        # compare again until the deadline.
        if not problems or time.monotonic() > deadline:
            break
        time.sleep(POLL_STEP)
    assert not problems, "\n".join(sorted(problems))
    ours = {key: owners for key, owners in linux.items() if owners & pids}
    # Per child and family: GROUPS × (listener, two connected ends, UDP).
    assert len(ours) >= 3 * 4 * GROUPS + 1
    assert set().union(*ours.values()) == pids
    assert {key[5] for key in ours} == {"LISTEN", "ESTABLISHED", None}
    if any(key[0] == "tcp6" for key in ours):
        assert any(key[1] == "::ffff:127.0.0.1" == key[3] for key in ours)
    for conn in source.snapshot():
        if conn.pid in pids:
            assert source.uid_of(conn) == os.getuid()


def test_netlink_and_proc_net_read_the_same_table(holders, live_source):
    children, shared_port = holders
    ports = {port for child in children for port in child.ports} | {shared_port}
    netlink, files = live_source(netlink=True), live_source(netlink=False)
    deadline = time.monotonic() + DEFAULT_TIMEOUT
    while True:
        from_netlink = {row[:8] for row in netlink.table() if row[2] in ports}
        from_files = {row[:8] for row in files.table() if row[2] in ports}
        if from_netlink == from_files or time.monotonic() > deadline:
            break
        time.sleep(POLL_STEP)
    assert from_netlink == from_files
    assert len(from_files) >= 3 * 4 * GROUPS + 1


def test_a_socket_opened_between_polls_gets_its_owner_on_the_next_poll(holders, live_source):
    source = live_source()
    source.snapshot()
    with socket.socket() as mine:
        mine.bind(("127.0.0.1", 0))
        mine.listen(1)
        port = mine.getsockname()[1]
        found = [conn for conn in source.snapshot() if conn[:3] == ("tcp", "127.0.0.1", port)]
    me = os.getpid()
    assert [(conn[:7], conn.owners) for conn in found] == [
        (("tcp", "127.0.0.1", port, None, None, "LISTEN", me), (me,))
    ]

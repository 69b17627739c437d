"""Benchmarks of the Linux source's cookies, byte counters and destroy broadcasts.

Run from the repository root, with the Python of a venv where histstat is installed:

    python benchmarks/events.py                       # all four parts (~2 min)
    python benchmarks/events.py --before /tmp/base    # also the dump of the code in
                                                      # /tmp/base (a checkout to compare)
    python benchmarks/events.py --parts dump --pairs 5000

Parts:

* dump: CPU per table() call (the netlink dumps and their parsing, no owners) with
  PAIRS loopback connections held by a helper process, for this code with and without
  counters and, with --before, for another checkout's code; each measured in its own
  process, alternating, ROUNDS times (the median is printed).
* parse: the Python side of a dump alone: one recorded IPv4 TCP dump (PAIRS connections
  held) replayed through a fake socket to this code's dump loop and, with --before, to
  the other checkout's, ROUNDS times each, alternating.
* cost: CPU of the destroy reader thread (its own CPU clock) while a helper makes
  CONNECTIONS loopback connections (each closed normally, both ends) in about 2 s, per
  event received; and whether every one of the helper's sockets ended exactly once.
* stall: a reader stalled (by its clock) while a helper makes CONNECTIONS connections
  closed with RST; then released: how many of the events survive with the kernel's
  default receive buffer, SO_RCVBUF (capped by net.core.rmem_max) and SO_RCVBUFFORCE.

It needs root for SO_RCVBUFFORCE only. Other programs' sockets count in the dump and
other programs' ends arrive too: run it on an otherwise quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench  # noqa: E402  (its helper processes: hold, serve)

from histstat.sources.destroy import RECEIVE_BUFFER, DestroyWatcher  # noqa: E402
from histstat.sources.linux import LinuxSource  # noqa: E402
from histstat.sources.sock_diag import NETLINK_SOCK_DIAG, parse_destroys  # noqa: E402

SO_COOKIE = 57
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in a fresh process per measurement, with PYTHONPATH naming the checkout measured.
DUMP_PROBE = """
import json, sys, time
from histstat.sources.linux import LinuxSource
try:
    source = LinuxSource(watch_ends=False)
except TypeError:  # code from before the destroy watcher
    source = LinuxSource()
counters = sys.argv[1] == "counters"
call = (lambda: source.table(counters=True)) if counters else source.table
rows = len(call())
calls, start = 0, time.process_time()
while time.process_time() - start < float(sys.argv[2]) or calls < 5:
    call()
    calls += 1
print(json.dumps({"ms": 1000 * (time.process_time() - start) / calls, "rows": rows}))
"""

# The Python side of a dump alone: the same recorded datagrams (argv[1], a JSON list of
# hex strings) parsed again and again by the checkout's dump loop through a fake socket.
PARSE_PROBE = """
import json, socket, sys, time
datagrams = [bytes.fromhex(h) for h in json.load(open(sys.argv[1]))]
try:
    from histstat.sources.sock_diag import SockDiag
    diag = SockDiag()
    run = lambda sock, cache: diag._dump(sock, "tcp", 2, 6, {}, cache, False)
except ImportError:  # the code before sources/sock_diag.py
    from histstat.sources.linux import _SockDiag
    diag = _SockDiag()
    run = lambda sock, cache: diag._dump(sock, "tcp", 2, 6, True, cache)
class Replay:
    def __init__(self):
        self.left = list(datagrams)
    def send(self, data):
        pass
    def recv_into(self, buffer, size):
        data = self.left.pop(0)
        buffer[: len(data)] = data
        return len(data)
cache = {}
rows = 0
calls, start = 0, time.process_time()
while time.process_time() - start < float(sys.argv[2]) or calls < 5:
    diag._seq = 0  # the recording answered sequence number 1
    rows = len(run(Replay(), cache))
    calls += 1
print(json.dumps({"ms": 1000 * (time.process_time() - start) / calls, "rows": rows}))
"""

# A client making COUNT connections to PORT in about SECONDS, closing each normally
# (FIN) after the server's end has accepted it; it prints the cookies of its sockets.
CHURN = """
import json, socket, struct, sys, time
port, count, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
listener = socket.socket()
listener.bind(("127.0.0.1", port))
listener.listen(4096)
cookies = []
rst = len(sys.argv) > 4
start = time.monotonic()
for index in range(count):
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    for sock in (client, accepted):
        cookies.append(struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, 57, 8))[0])
        if rst:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    accepted.close()
    wait = start + seconds * (index + 1) / count - time.monotonic()
    if wait > 0:
        time.sleep(wait)
print(json.dumps(cookies))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def churn(count: int, seconds: float, rst: bool = False) -> list:
    """Run the churn client; the cookies of every socket it made."""
    args = [sys.executable, "-c", CHURN, str(free_port()), str(count), str(seconds)]
    done = subprocess.run(args + (["rst"] if rst else []), capture_output=True, check=True)
    return json.loads(done.stdout)


def measure_dump(root: str, counters: bool, seconds: float) -> dict:
    env = dict(os.environ, PYTHONPATH=root)
    mode = "counters" if counters else "plain"
    done = subprocess.run(
        [sys.executable, "-c", DUMP_PROBE, mode, str(seconds)],
        env=env,
        capture_output=True,
        check=True,
        cwd="/",
    )
    return json.loads(done.stdout)


def record_dump(path: str) -> int:
    """Record the datagrams of one IPv4 TCP dump (sequence number 1) into ``path``."""
    from histstat.sources.sock_diag import _DIAG_REQUEST, _NLM_F_REQUEST_DUMP, NLMSG_HEADER

    request = _DIAG_REQUEST.pack(socket.AF_INET, socket.IPPROTO_TCP, 0, 0, 0xFFE)
    header = NLMSG_HEADER.pack(NLMSG_HEADER.size + len(request), 20, _NLM_F_REQUEST_DUMP, 1, 0)
    datagrams = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as sock:
        sock.send(header + request)
        while True:
            data = sock.recv(1 << 16)
            datagrams.append(data.hex())
            if NLMSG_HEADER.unpack_from(data, len(data) - NLMSG_HEADER.size - 4)[1] == 3:
                break
    with open(path, "w") as handle:
        json.dump(datagrams, handle)
    return len(datagrams)


def parse_part(args) -> None:
    procs = bench.Processes()
    path = os.path.join(tempfile.mkdtemp(), "dump.json")
    try:
        holder = procs.helper("hold", args.pairs)
        bench.read_line(holder, 120)
        record_dump(path)
        variants = [("this code", ROOT)]
        if args.before:
            variants.insert(0, ("before", args.before))
        results: dict = {name: [] for name, _ in variants}
        rows: dict = {}
        for _ in range(args.rounds):
            for name, root in variants:
                done = subprocess.run(
                    [sys.executable, "-c", PARSE_PROBE, path, str(args.seconds)],
                    env=dict(os.environ, PYTHONPATH=root),
                    capture_output=True,
                    check=True,
                    cwd="/",
                )
                measured = json.loads(done.stdout)
                results[name].append(measured["ms"])
                rows[name] = measured["rows"]
        print(f"\n#### Parse: one recorded IPv4 TCP dump replayed, {args.pairs} connections\n")
        print("| code | rows | ms per dump: median | min | / first (median, min) |")
        print("|---|---|---|---|---|")
        first = results[variants[0][0]]
        for name, _ in variants:
            median, least = statistics.median(results[name]), min(results[name])
            ratios = f"{median / statistics.median(first):.2f}×, {least / min(first):.2f}×"
            print(f"| {name} | {rows[name]:,} | {median:.2f} | {least:.2f} | {ratios} |")
    finally:
        procs.stop_all()
        with contextlib.suppress(OSError):
            os.remove(path)
            os.rmdir(os.path.dirname(path))


def dump_part(args) -> None:
    procs = bench.Processes()
    try:
        holder = procs.helper("hold", args.pairs)
        bench.read_line(holder, 120)
        variants = [("this code", ROOT, False), ("this code, counters=True", ROOT, True)]
        if args.before:
            variants.insert(0, ("before", args.before, False))
        results: dict = {name: [] for name, _, _ in variants}
        rows: dict = {}
        for _ in range(args.rounds):
            for name, root, counters in variants:
                measured = measure_dump(root, counters, args.seconds)
                results[name].append(measured["ms"])
                rows[name] = measured["rows"]
        print(f"\n#### Dump: table() CPU per call, {args.pairs} connections held\n")
        print("| code | rows | ms per call: median | min | / first (median, min) | all rounds |")
        print("|---|---|---|---|---|---|")
        first = results[variants[0][0]]
        for name, _, _ in variants:
            median, least = statistics.median(results[name]), min(results[name])
            rounds = ", ".join(f"{ms:.2f}" for ms in results[name])
            ratios = f"{median / statistics.median(first):.2f}×, {least / min(first):.2f}×"
            print(f"| {name} | {rows[name]:,} | {median:.2f} | {least:.2f} | {ratios} | {rounds} |")
    finally:
        procs.stop_all()


def cost_part(args) -> None:
    source = LinuxSource(protos=frozenset({"tcp"}))
    try:
        source.snapshot()
        watcher = source._watcher
        assert watcher is not None and watcher.watching, watcher and watcher.error
        thread = watcher._thread
        assert thread is not None and thread.ident is not None
        clock = time.pthread_getcpuclockid(thread.ident)
        before = time.clock_gettime(clock)
        start = time.monotonic()
        cookies = churn(args.connections, 2.0)
        seen: dict = {}
        lost = False
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ends = source.ends()
            lost |= ends.lost
            for end in ends.ends:
                seen[end.cookie] = seen.get(end.cookie, 0) + 1
            if all(cookie in seen for cookie in cookies):
                break
            time.sleep(0.05)
        took = time.monotonic() - start
        cpu = time.clock_gettime(clock) - before
        events = sum(seen.values())
        ours = [seen.get(cookie, 0) for cookie in cookies]
        print(f"\n#### Cost: {args.connections} connections in about 2 s (normal closes)\n")
        print(
            "| sockets made | their ends received | exactly once | all events | lost |"
            " reader CPU (s) | per event (µs) | wall (s) |"
        )
        print("|---|---|---|---|---|---|---|---|")
        print(
            f"| {len(cookies)} | {sum(1 for n in ours if n)} | {sum(1 for n in ours if n == 1)}"
            f" | {events} | {lost} | {cpu:.3f} | {1e6 * cpu / max(events, 1):.1f} | {took:.1f} |"
        )
    finally:
        source.close()


class Witness:
    """A second reader of the TCP destroy group, with a large buffer, read at once."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
        self.sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE (root)
        self.sock.bind((0, 1))
        self.sock.settimeout(1.0)
        self.seen: set = set()

    def wait_for(self, cookies: set, limit: float = 30.0) -> None:
        buffer = bytearray(1 << 16)
        deadline = time.monotonic() + limit
        while not cookies <= self.seen and time.monotonic() < deadline:
            try:
                size = self.sock.recv_into(buffer)
            except TimeoutError:
                break
            self.seen.update(end.cookie for end in parse_destroys(buffer, size, 0.0))

    def close(self) -> None:
        self.sock.close()


def stall_once(count: int, buffer: int | None, force: bool) -> dict:
    release = threading.Event()

    def stalled() -> float:
        release.wait(120)
        return time.time()

    watcher = DestroyWatcher(["tcp"], receive_buffer=buffer, force_buffer=force, clock=stalled)
    witness = Witness()
    try:
        assert watcher.start(), watcher.error
        cookies = set(churn(count, 0.0, rst=True))
        # The kernel sends the broadcasts from a workqueue, which may lag behind the
        # churn: the reader stays stalled until an unstalled witness has had them all.
        witness.wait_for(cookies)
        release.set()
        got: set = set()
        lost = False
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 1.0:
            ends = watcher.ends()
            lost |= ends.lost
            fresh = {end.cookie for end in ends.ends} & cookies
            if fresh - got:
                quiet_since = time.monotonic()
            got |= fresh
            time.sleep(0.05)
        return {
            "buffer": watcher.buffer_size,
            "forced": watcher.buffer_forced,
            "sockets": len(cookies),
            "survived": len(got),
            "lost": lost,
        }
    finally:
        release.set()
        watcher.close()
        witness.close()


def stall_part(args) -> None:
    with open("/proc/sys/net/core/rmem_max") as handle:
        rmem_max = int(handle.read())
    with open("/proc/sys/net/core/rmem_default") as handle:
        rmem_default = int(handle.read())
    print(
        f"\n#### Stall: {args.connections} connections closed with RST while the reader"
        f" stalls (rmem_default {rmem_default:,}, rmem_max {rmem_max:,})\n"
    )
    print("| receive buffer | SO_RCVBUF read back | events sent | survived | lost |")
    print("|---|---|---|---|---|")
    for label, buffer, force in (
        ("kernel default", None, False),
        (f"SO_RCVBUF {RECEIVE_BUFFER:,}", RECEIVE_BUFFER, False),
        (f"SO_RCVBUFFORCE {RECEIVE_BUFFER:,}", RECEIVE_BUFFER, True),
    ):
        result = stall_once(args.connections, buffer, force)
        if force and not result["forced"]:
            label += " (refused: not root)"
        print(
            f"| {label} | {result['buffer']:,} | {result['sockets']:,} |"
            f" {result['survived']:,} | {result['lost']} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="dump,parse,cost,stall")
    parser.add_argument("--before", help="root of a checkout whose dump to compare")
    parser.add_argument("--pairs", type=int, default=5000, help="held connections (dump)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="CPU per measurement")
    parser.add_argument("--connections", type=int, default=2000)
    args = parser.parse_args()
    with open("/proc/loadavg") as handle:
        load = handle.read().split()[:3]
    print(
        f"- machine: {os.cpu_count()} cores, Linux {platform.release()}, Python"
        f" {platform.python_version()}, load average {', '.join(load)}, uid {os.getuid()}"
    )
    census = subprocess.run(["ss", "-s"], capture_output=True).stdout.decode(errors="replace")
    print("- ss -s: " + " / ".join(line.strip() for line in census.splitlines()[:2]))
    parts = args.parts.split(",")
    if "dump" in parts:
        dump_part(args)
    if "parse" in parts:
        parse_part(args)
    if "cost" in parts:
        cost_part(args)
    if "stall" in parts:
        stall_part(args)


if __name__ == "__main__":
    main()

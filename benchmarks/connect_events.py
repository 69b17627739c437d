"""Connect events through tracefs: how many short connections the reader attributes to
the right pid, and the reader's CPU share.

Run as root from the repository root, with the Python of a venv where histstat is
installed (it mounts tracefs at /sys/kernel/tracing when it is not mounted, and
unmounts it again at the end):

    python benchmarks/connect_events.py            # 200 connections of 50 ms, 50 processes
    python benchmarks/connect_events.py --quick    # 50 and 10

Workloads, each on 127.0.0.1, to a listener in another process that accepts and drains:

* One client: a process opening one connection after another, each held 50 ms, 20 ms
  apart.
* Back to back: one process opening connections without a pause (a scanner).
* Short-lived processes: a spawner starting one process after another, each making one
  50 ms connection and exiting at once (the hard case: the kernel's tgid and name caches
  are filled at a context switch after the event, and /proc is gone after the exit).

Each runs twice: with the reader woken by each event (``read(timeout)`` in a loop), and
reading once a second (histstat's default poll interval). An event counts as attributed
when its CLOSE→SYN_SENT transition to the listener's port gives the connecting process's
pid: from the event's tgid, or, when the kernel printed none, from /proc/<tid>/status at
once (as the caller is meant to do). The reader's CPU share is its process CPU time over
the wall time of the workload. No other tracefs reader or TCP traffic is expected: run it
on a quiet machine, which the header describes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import socket
import subprocess
import sys
import threading
import time

from histstat.sources.trace_lines import ConnectEvent
from histstat.sources.tracefs import (
    ConnectEventReader,
    TracefsUnavailable,
    locate_tracefs,
    unmount_tracefs,
)

LOOPBACK = "127.0.0.1"
HOLD = 0.05  # seconds each connection stays open
GAP = 0.02  # seconds between two connections


# ---------------------------------------------------------------------------------------
# Helper processes (this file, run as: connect_events.py _helper KIND ARGS...)
# ---------------------------------------------------------------------------------------


def _listener() -> None:
    """Accept and drain connections until stdin closes; print the port first."""
    server = socket.socket()
    server.bind((LOOPBACK, 0))
    server.listen(128)
    print(server.getsockname()[1], flush=True)

    def drain(conn: socket.socket) -> None:
        with conn:
            while conn.recv(4096):
                pass

    def accept() -> None:
        while True:
            conn, _ = server.accept()
            threading.Thread(target=drain, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    sys.stdin.buffer.read()
    os._exit(0)


def _client(port: int, count: int, pause: bool = True) -> None:
    """``count`` connections one after another, each held HOLD seconds, or back to
    back without a pause (a scanner, which rarely leaves the CPU)."""
    for _ in range(count):
        with socket.create_connection((LOOPBACK, port)):
            if pause:
                time.sleep(HOLD)
        if pause:
            time.sleep(GAP)


def _spawner(port: int, count: int) -> None:
    """``count`` processes one after another, each making one connection; prints their
    pids at the end."""
    pids = []
    for _ in range(count):
        child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "_helper",
                                  "client", str(port), "1"])  # fmt: skip
        pids.append(child.pid)
        child.wait()
    print(*pids, flush=True)


# ---------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------


def _helper(kind: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "_helper", kind, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )


def _thread_group(tid: int) -> int | None:
    try:
        with open(f"/proc/{tid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(root: str, kind: str, count: int, batched: bool) -> dict:
    """Run one workload under a fresh reader; return its figures."""
    listener = _helper("listener")
    port = int(listener.stdout.readline())
    connects: list[tuple[ConnectEvent, int | None]] = []  # (event, tgid from /proc)
    with ConnectEventReader(root) as reader:
        workload = _helper(kind, str(port), str(count))
        wall, cpu = time.monotonic(), _cpu()
        lost = 0
        while True:
            finished = workload.poll() is not None
            if batched:
                time.sleep(1.0)
            events = reader.read(0.0 if batched else 0.5)
            for event in events:
                if event.dport == port and event.oldstate == "CLOSE":
                    looked_up = _thread_group(event.tid) if event.tgid is None else None
                    connects.append((event, looked_up))
            lost += reader.lost_events()
            if finished and not events:
                break
        wall, cpu = time.monotonic() - wall, _cpu() - cpu
    output = workload.stdout.read().split()
    pids = [int(pid) for pid in output] if kind == "spawner" else [workload.pid] * count
    listener.stdin.close()
    listener.wait()
    expected = set(pids)
    by_tgid = sum(1 for event, _ in connects if event.tgid in expected)
    by_proc = sum(1 for event, looked in connects if event.tgid is None and looked in expected)
    return {
        "connections": count,
        "events": len(connects),
        "by_tgid": by_tgid,
        "by_proc": by_proc,
        "unknown": sum(1 for event, _ in connects if event.tgid is None),
        "attributed": by_tgid + by_proc,
        "cpu_share": cpu / wall,
        "lost": lost,
        "wall": wall,
    }


def machine() -> str:
    with open("/proc/net/sockstat") as sockstat:
        sockets = " ".join(sockstat.read().split("\n")[:2])
    return (
        f"- machine: {os.cpu_count()} cores, {platform.system()} {platform.release()} "
        f"{platform.machine()}, Python {platform.python_version()}\n"
        f"- load average {' '.join(f'{load:.2f}' for load in os.getloadavg())}; "
        f"{sockets}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="50 connections, 10 processes")
    options = parser.parse_args()
    try:
        found = locate_tracefs()
    except TracefsUnavailable as exc:
        sys.exit(f"connect_events: {exc}")
    client_count, process_count = (50, 10) if options.quick else (200, 50)
    print(f"# connect events benchmark{' (--quick)' if options.quick else ''}\n")
    print(machine() + "\n")
    print("| workload | reading | connects seen | attributed (tgid + /proc) "
          "| tgid unknown | lost | reader CPU |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    try:
        for kind, count, label in (
            ("client", client_count, f"{client_count} × 50 ms, one client"),
            ("spawner", process_count, f"{process_count} short-lived processes"),
            ("burst", client_count, f"{client_count} back to back, one client"),
        ):
            for batched in (False, True):
                r = measure(found.root, kind, count, batched)
                print(
                    f"| {label} | {'every 1 s' if batched else 'on each event'} "
                    f"| {r['events']}/{r['connections']} "
                    f"| {r['attributed']}/{r['connections']} ({r['by_tgid']} + {r['by_proc']}) "
                    f"| {r['unknown']} | {r['lost']} | {100 * r['cpu_share']:.2f}% |",
                    flush=True,
                )
    finally:
        if found.mounted:
            with contextlib.suppress(OSError):
                unmount_tracefs(found.root)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_helper":
        kind, arguments = sys.argv[2], sys.argv[3:]
        if kind == "listener":
            _listener()
        elif kind in ("client", "burst"):
            _client(int(arguments[0]), int(arguments[1]), pause=kind == "client")
        else:
            _spawner(int(arguments[0]), int(arguments[1]))
    else:
        main()

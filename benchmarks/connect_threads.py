"""Where histstat's CPU goes over the 200 x 50 ms workload of histstat_connects.py, per
thread: the main thread (polls, tracker, rows, output) and the reader threads (connect
events, destroy events), with --kernel-events auto and off in turns.

Run as root from the repository root, with the Python of a venv where histstat is
installed:

    python benchmarks/connect_threads.py            # two turns of each
    python benchmarks/connect_threads.py --turns 4
    python benchmarks/connect_threads.py --settle   # each run after the TIME_WAITs expired

Python does not name its threads to the kernel: the main thread is the one whose id is
the pid, the others are listed by their CPU, largest first (with auto: the connect
reader, then the destroy reader, as their work says; --kernel-events off has neither).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from histstat_connects import CLIENT, histstat_command, machine  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of ``pid``."""
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found[int(tid)] = (int(fields[11]) + int(fields[12])) / TICKS
    return found


def time_wait_sockets() -> int:
    """The TIME_WAIT sockets of the machine's own namespace (/proc/net/sockstat's tw)."""
    with open("/proc/net/sockstat") as sockstat:
        for line in sockstat:
            if line.startswith("TCP:"):
                fields = line.split()
                return int(fields[fields.index("tw") + 1])
    return 0


def settle(most: int = 10, limit: float = 70.0) -> None:
    """Wait until at most ``most`` TIME_WAIT sockets are left (Linux keeps each 60 s)."""
    deadline = time.monotonic() + limit
    while time_wait_sockets() > most and time.monotonic() < deadline:
        time.sleep(1.0)


def turn(events: str) -> tuple[float, list[float], int, float]:
    """(main thread %, other threads' % largest first, rows, wall seconds) of one run."""
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, "200", "0.05", "0.02", "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    port = client.stdout.readline().decode().strip()
    proc = subprocess.Popen(
        [histstat_command(), "-j", "--source", "linux", "--kernel-events", events,
         "--port", port],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    lines: list[bytes] = []
    reading = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reading.start()
    time.sleep(2.0)  # its first poll (and the instance) is done
    before, started = thread_cpu(proc.pid), time.monotonic()
    client.stdin.write(b"go\n")
    client.stdin.flush()
    client.stdout.readline()
    client.wait(30)
    time.sleep(2.5)  # two more polls
    after, wall = thread_cpu(proc.pid), time.monotonic() - started
    proc.terminate()
    proc.wait(30)
    reading.join(30)
    used = {tid: cpu - before.get(tid, 0.0) for tid, cpu in after.items()}
    main = 100 * used.pop(proc.pid, 0.0) / wall
    others = sorted((100 * cpu / wall for cpu in used.values()), reverse=True)
    return main, others, len(lines), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument(
        "--settle",
        action="store_true",
        help="before each run, wait (at most 70 s) for the TIME_WAIT sockets of the runs "
        "before to expire, so that each run dumps only its own",
    )
    options = parser.parse_args()
    print(machine())
    print("| --kernel-events | main thread | other threads | histstat in all | rows |")
    print("|---|---|---|---|---|")
    for _ in range(options.turns):
        for events in ("auto", "off"):
            if options.settle:
                settle()
            main_cpu, others, rows, _ = turn(events)
            shown = ", ".join(f"{cpu:.2f}%" for cpu in others if cpu >= 0.005) or "-"
            total = main_cpu + sum(others)
            print(f"| {events} | {main_cpu:.2f}% | {shown} | {total:.2f}% | {rows} |")


if __name__ == "__main__":
    main()

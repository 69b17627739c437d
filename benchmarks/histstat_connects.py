"""The real histstat against short connections: how many it shows, how many it attributes
to the right pid, and its CPU share, with --kernel-events auto (connect events) and off
(polling alone), side by side in one run.

Run as root from the repository root, with the Python of a venv where histstat is
installed:

    python benchmarks/histstat_connects.py            # 200 × 50 ms, and a 10 s beacon
    python benchmarks/histstat_connects.py --quick    # 50 × 50 ms, and a 3 s beacon

Workloads, on 127.0.0.1, each made by one client process with a listener of its own:
* 200 connections, each held 50 ms, 20 ms apart;
* a beacon: a 1 ms connection every 0.3 s.
histstat runs at its default interval (-i 1), as `histstat -j --source linux --port P`,
with --kernel-events auto; auto without connect events (HISTSTAT_TEST_TRACEFS at an empty
directory: destroy events alone); and off.
A connection counts as seen when an open row has its client port, and as attributed when
that row's pid is the client's. CPU: histstat's user + system time over the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

CLIENT = """
import socket, sys, time
count, hold, pause = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(256)
print(listener.getsockname()[1], flush=True)
sys.stdin.readline()
ports = []
for _ in range(count):
    client = socket.create_connection(listener.getsockname())
    ports.append(client.getsockname()[1])
    accepted, _ = listener.accept()
    time.sleep(hold)
    client.close()
    accepted.close()
    time.sleep(pause)
print(*ports, flush=True)
"""


def histstat_command() -> str:
    return os.path.join(os.path.dirname(sys.executable), "histstat")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(events: str, count: int, hold: float, pause: float, tracefs: str | None = None) -> dict:
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, str(count), str(hold), str(pause)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    port = client.stdout.readline().decode().strip()
    histstat = subprocess.Popen(
        [histstat_command(), "-j", "--source", "linux", "--kernel-events", events,
         "--port", port],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "HISTSTAT_TEST_TRACEFS": tracefs} if tracefs else None,
    )  # fmt: skip
    lines: list[bytes] = []
    reading = threading.Thread(target=lambda: lines.extend(histstat.stdout), daemon=True)
    reading.start()  # a reader that keeps up, as a terminal or a pipe's would
    time.sleep(2.0)  # its first poll (and the instance) is done
    cpu_before, started = cpu_seconds(histstat.pid), time.monotonic()
    client.stdin.write(b"go\n")
    client.stdin.flush()
    ports = {int(p) for p in client.stdout.readline().split()}
    time.sleep(2.5)  # two more polls
    cpu = cpu_seconds(histstat.pid) - cpu_before
    wall = time.monotonic() - started
    histstat.terminate()
    histstat.wait(10)
    reading.join(10)
    err = histstat.stderr.read()
    client.wait(10)
    rows = [json.loads(line) for line in lines]
    opened = {row["lport"]: row for row in rows if row["event"] == "open"}
    seen = [p for p in ports if p in opened]
    right = [p for p in seen if opened[p]["pid"] == client.pid]
    with_command = [p for p in right if opened[p]["command"]]
    return {
        "seen": len(seen),
        "attributed": len(right),
        "with_command": len(with_command),
        "total": len(ports),
        "cpu": 100 * cpu / wall,
        "stderr": err.decode(errors="replace").strip(),
    }


def machine() -> str:
    load = os.getloadavg()
    return (
        f"{os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()}, "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    quick = parser.parse_args().quick
    if os.geteuid() != 0:
        sys.exit("run as root: connect events need it")
    print(machine())
    workloads = [
        (f"{50 if quick else 200} × 50 ms, 20 ms apart", 50 if quick else 200, 0.05, 0.02),
        (f"beacon: 1 ms every 0.3 s for {3 if quick else 10} s", 10 if quick else 34, 0.001, 0.3),
    ]
    # auto with a directory that is no tracefs: the destroy events without connect events
    empty = tempfile.mkdtemp(prefix="histstat-no-tracefs-")
    modes = [
        ("auto", "auto", None),
        ("auto", "auto, no tracefs (ends only)", empty),
        ("off", "off", None),
    ]
    print("| workload | --kernel-events | seen | attributed (right pid) | with command line "
          "| histstat CPU |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    try:
        for name, count, hold, pause in workloads:
            for events, label, tracefs in modes:
                got = measure(events, count, hold, pause, tracefs)
                total = got["total"]
                print(
                    f"| {name} | {label} | {got['seen']}/{total} | {got['attributed']}/{total} "
                    f"| {got['with_command']}/{total} | {got['cpu']:.2f}% |"
                )
                if got["stderr"] and not tracefs:
                    print(f"  (stderr: {got['stderr']})")
    finally:
        os.rmdir(empty)


if __name__ == "__main__":
    main()

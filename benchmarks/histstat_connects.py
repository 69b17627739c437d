"""The real histstat against short connections: how many it shows, how many it attributes
to the right pid (with a command line), how many joins it left ambiguous, and its CPU
share, with --kernel-events auto (connect events) and off (polling alone) side by side
in one run.

Run as root from the repository root, with the Python of a venv where histstat is
installed:

    python benchmarks/histstat_connects.py            # the whole table (about 3 minutes)
    python benchmarks/histstat_connects.py --quick    # smaller workloads (about 1 minute)
    python benchmarks/histstat_connects.py --unprivileged-histstat /tmp/venv/bin/histstat

Workloads, on 127.0.0.1, each made by client processes with a listener of their own:
* 200 connections, each held 50 ms, 20 ms apart;
* a beacon: a 1 ms connection every 0.3 s for 10 s;
* 1,000 connections a second for 30 s, each closed at once;
* five connects to a closed port (refused);
* two processes connecting to one listener at once, 500 connections each, back to back:
  the joins the connect events cannot tell apart (see docs/kernel-events.md) are counted
  by histstat at its end, and shown here;
* the 200 × 50 ms again with histstat run as the user nobody (setpriv): no connect events
  there, destroy events and the poll alone. The user nobody must be able to run the
  histstat given by --unprivileged-histstat (a venv under a 0700 /root is not): the row
  says so when it cannot.
histstat runs at its default interval (-i 1), as `histstat -j --source linux --port P`.
Each workload runs with --kernel-events auto and off (the reference, measured in the same
run); the 200 × 50 ms also with auto and HISTSTAT_TEST_TRACEFS at an empty directory (the
destroy events without connect events). A connection counts as seen when an open row has
its client port (ports the kernel used again count as often as they were used), and as
attributed when that row's pid is the process that made it. CPU: histstat's user +
system time over the workload's wall time (from the start of the workload to 2.5 s after
its end), in % of one core.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

# One process: a listener, then on "go" `count` connections, each held `hold` seconds,
# `pause` seconds apart (`rate` > 0: started `1/rate` apart instead, each closed at
# once); prints "pid:port" of each connection made.
CLIENT = """
import os, socket, sys, time
count = int(sys.argv[1])
hold, pause, rate = (float(value) for value in sys.argv[2:5])
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(1024)
print(listener.getsockname()[1], flush=True)
sys.stdin.readline()
used = []
start = time.monotonic()
for number in range(count):
    if rate:
        delay = start + number / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    client = socket.create_connection(listener.getsockname())
    used.append(client.getsockname()[1])
    accepted, _ = listener.accept()
    if hold:
        time.sleep(hold)
    client.close()
    accepted.close()
    if pause:
        time.sleep(pause)
print(" ".join(f"{os.getpid()}:{port}" for port in used), flush=True)
"""

# A listener, and `workers` processes forked on "go" that each connect `count` times to
# it, back to back, at once; prints "pid:port" of each connection made.
RIVALS = """
import os, socket, sys, threading
workers, count = int(sys.argv[1]), int(sys.argv[2])
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(4096)
address = listener.getsockname()
print(address[1], flush=True)
sys.stdin.readline()
def accept(total):
    for _ in range(total):
        listener.accept()[0].close()
acceptor = threading.Thread(target=accept, args=(workers * count,))
acceptor.start()
pipes = []
for _ in range(workers):
    read, write = os.pipe()
    if os.fork() == 0:
        os.close(read)
        used = []
        for _ in range(count):
            client = socket.create_connection(address)
            used.append(client.getsockname()[1])
            client.close()
        os.write(write, " ".join(f"{os.getpid()}:{p}" for p in used).encode())
        os._exit(0)
    os.close(write)
    pipes.append(read)
made = []
for read in pipes:
    chunks = []
    while True:
        chunk = os.read(read, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    made.append(b"".join(chunks).decode())
    os.wait()
acceptor.join()
print(" ".join(made), flush=True)
"""

# A closed port (bound, then closed: nothing listens), then on "go" five connects to it,
# each refused; prints "pid:port" with the closed port (refused connects are counted by
# their remote port).
REFUSED = """
import os, socket, sys
probe = socket.socket()
probe.bind(("127.0.0.1", 0))
port = probe.getsockname()[1]
probe.close()
print(port, flush=True)
sys.stdin.readline()
made = []
for _ in range(5):
    client = socket.socket()
    try:
        client.connect(("127.0.0.1", port))
    except ConnectionRefusedError:
        made.append(f"{os.getpid()}:{port}")
    client.close()
print(" ".join(made), flush=True)
"""

AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
AMBIGUOUS = re.compile(r"histstat: (\d+) connects? (?:was|were) left unattributed")


def histstat_command() -> str:
    return os.path.join(os.path.dirname(sys.executable), "histstat")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tcp_sockets() -> int:
    """TCP sockets on the machine (this network namespace), from /proc/net/tcp{,6}."""
    total = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name, "rb") as table:
                total += sum(1 for _ in table) - 1
        except OSError:
            pass
    return total


class Workload:
    def __init__(self, name: str, script: str, args: list, match: str = "lport") -> None:
        self.name = name
        self.script = script
        self.args = [str(arg) for arg in args]
        self.match = match  # the row field that holds a connection's port


def measure(work: Workload, events: str, histstat: str, env: dict | None = None,
            as_user: list | None = None) -> dict:  # fmt: skip
    client = subprocess.Popen(
        [sys.executable, "-c", work.script, *work.args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    port = client.stdout.readline().decode().strip()
    proc = subprocess.Popen(
        [*(as_user or []), histstat, "-j", "--source", "linux", "--kernel-events", events,
         "--port", port],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **env} if env else None,
    )  # fmt: skip
    lines: list[bytes] = []
    reading = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reading.start()  # a reader that keeps up, as a terminal or a pipe's would
    time.sleep(2.0)  # its first poll (and the instance) is done
    cpu_before, started = cpu_seconds(proc.pid), time.monotonic()
    client.stdin.write(b"go\n")
    client.stdin.flush()
    made = [pair.split(":") for pair in client.stdout.readline().decode().split()]
    client.wait(30)  # reaped at once, as a shell reaps its commands: no zombie to read
    time.sleep(2.5)  # two more polls
    cpu = cpu_seconds(proc.pid) - cpu_before
    wall = time.monotonic() - started
    proc.terminate()
    proc.wait(30)
    reading.join(30)
    err = proc.stderr.read().decode(errors="replace").strip()
    # How often each port was used, by which pid; and the open rows of each port.
    used = collections.Counter((int(port), int(pid)) for pid, port in made)
    rows = [json.loads(line) for line in lines]
    opened: dict[int, list] = collections.defaultdict(list)
    for row in rows:
        if row["event"] == "open" and row[work.match] is not None:
            opened[row[work.match]].append(row)
    seen = attributed = with_command = 0
    for (port, pid), times in used.items():
        shown = opened.get(port, [])
        seen += min(times, len(shown))
        right = [row for row in shown if row["pid"] == pid]
        attributed += min(times, len(right))
        with_command += min(times, sum(1 for row in right if row["command"]))
    ambiguous = sum(int(found) for found in AMBIGUOUS.findall(err))
    return {
        "seen": seen,
        "attributed": attributed,
        "with_command": with_command,
        "total": sum(used.values()),
        "ambiguous": ambiguous,
        "cpu": 100 * cpu / wall,
        "stderr": err,
    }


def machine() -> str:
    load = os.getloadavg()
    return (
        f"{os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()},"
        f" load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f},"
        f" {tcp_sockets()} TCP sockets on the machine"
    )


def nobody_runs(histstat: str) -> str | None:
    """Why the user nobody cannot run ``histstat``, or None when it can."""
    if shutil.which("setpriv") is None:
        return "no setpriv"
    try:
        result = subprocess.run([*AS_NOBODY, histstat, "--version"], capture_output=True,
                                timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if result.returncode != 0:
        return result.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["fails"]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--unprivileged-histstat",
        default=histstat_command(),
        help="a histstat the user nobody can run (default: this venv's)",
    )
    options = parser.parse_args()
    quick = options.quick
    if os.geteuid() != 0:
        sys.exit("run as root: connect events need it")
    print(machine())
    burst = 50 if quick else 200
    beacons = 10 if quick else 34
    seconds = 5 if quick else 30
    rivals = 100 if quick else 500
    burst_work = Workload(f"{burst} × 50 ms, 20 ms apart", CLIENT, [burst, 0.05, 0.02, 0])
    workloads = [
        burst_work,
        Workload(
            f"beacon: 1 ms every 0.3 s for {beacons * 0.3:.0f} s", CLIENT, [beacons, 0.001, 0.3, 0]
        ),  # fmt: skip
        Workload(f"1,000 a second for {seconds} s", CLIENT, [1000 * seconds, 0, 0, 1000]),
        Workload("5 connects to a closed port", REFUSED, [], match="rport"),
        Workload(f"2 processes × {rivals}, at once, to one listener", RIVALS, [2, rivals]),
    ]
    # auto with a directory that is no tracefs: the destroy events without connect events
    empty = tempfile.mkdtemp(prefix="histstat-no-tracefs-")
    print(
        "| workload | --kernel-events | seen | attributed (right pid) | with command line "
        "| ambiguous joins | histstat CPU |"
    )
    print("|---|---|---|---|---|---|---|")

    def report(work: Workload, label: str, got: dict) -> None:
        total = got["total"]
        print(
            f"| {work.name} | {label} | {got['seen']}/{total} | {got['attributed']}/{total} "
            f"| {got['with_command']}/{total} | {got['ambiguous']} | {got['cpu']:.2f}% |",
            flush=True,
        )
        if got["stderr"] and "no kernel connect events" not in got["stderr"]:
            print(f"  (stderr: {got['stderr']})", flush=True)

    try:
        for work in workloads:
            report(work, "auto", measure(work, "auto", histstat_command()))
            if work is burst_work:
                no_tracefs = {"HISTSTAT_TEST_TRACEFS": empty}
                got = measure(work, "auto", histstat_command(), no_tracefs)
                report(work, "auto, no tracefs (ends only)", got)
            report(work, "off", measure(work, "off", histstat_command()))
        unprivileged = options.unprivileged_histstat
        why_not = nobody_runs(unprivileged)
        if why_not is not None:
            print(f"| {burst_work.name}, as nobody | auto | not measured: nobody cannot run "
                  f"{unprivileged} ({why_not}) | | | | |")  # fmt: skip
        else:
            for events in ("auto", "off"):
                got = measure(burst_work, events, unprivileged, as_user=AS_NOBODY)
                report(burst_work, f"{events}, as nobody", got)
    finally:
        os.rmdir(empty)
    print(machine())


if __name__ == "__main__":
    main()

"""The connect-event reader thread alone (ConnectWatcher over a ConnectEventReader): its
CPU per connection over N connections of 50 ms each, 20 ms apart (one about every 70 ms,
the 200 × 50 ms workload of histstat_connects.py), optionally in turns against another
checkout of histstat measured in the same run.

Run as root from the repository root, with the Python of a venv where this checkout is
installed (tracefs is mounted if it is not):

    python benchmarks/connect_reader.py                 # 3 turns of 200 connections
    python benchmarks/connect_reader.py --turns 5 --connections 300
    python benchmarks/connect_reader.py --reference ../reference

``--reference ROOT`` alternates each turn with a run of the same measurement under
ROOT/.venv/bin/python (a venv where that checkout is installed), so both sides see the
same machine; the histstat each side imported is printed.

Each turn runs in a fresh process: a ConnectWatcher reading a private tracefs instance
(the transitions histstat asks for), and a client process (a listener of its own, then
the connections on "go"). The thread's CPU is read from its CPU clock
(pthread_getcpuclockid, nanoseconds) from just before "go" to 0.5 s after the client's
last connection; "wakes" are the thread's voluntary context switches over that time (a
sleep in poll() that ended); "events" the connects the thread joined to an outcome, the
machine's other TCP connects included (tracefs sees every connect of the kernel), which
is why a busy machine's figures are higher: a turn where they were more than a tenth is
run again (at most 5 times, then marked). Per connection: the thread's CPU / N.

By default the benchmark narrows the instance's kernel filter to the client's listener
port (``dport == P``, added to histstat's own filter), so other work on the machine does
not reach the thread and the figure is that of a quiet machine; ``--all-connects`` keeps
histstat's filter as it is (then the harness-style figure, other work included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

# One process: a listener, then on "go" `count` connections, each held `hold` seconds,
# `pause` seconds apart; prints a line when done.
CLIENT = """
import socket, sys, time
count = int(sys.argv[1])
hold, pause = float(sys.argv[2]), float(sys.argv[3])
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(1024)
print(listener.getsockname()[1], flush=True)
sys.stdin.readline()
for _ in range(count):
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    time.sleep(hold)
    client.close()
    accepted.close()
    time.sleep(pause)
print("done", flush=True)
"""
RETRIES = 5


def voluntary_switches(native_id: int) -> int:
    with open(f"/proc/self/task/{native_id}/status", "rb") as status:
        for line in status:
            if line.startswith(b"voluntary_ctxt_switches:"):
                return int(line.split()[1])
    return 0


def one_turn(connections: int, only_own: bool) -> dict[str, object]:
    """Measure the reader thread of the histstat this Python imports, in this process."""
    import histstat
    from histstat.connects import CONNECT_OUTCOMES, ConnectWatcher
    from histstat.sources.tracefs import (
        EVENT,
        ConnectEventReader,
        connect_filter,
        locate_tracefs,
    )

    reader = ConnectEventReader(locate_tracefs().root, transitions=CONNECT_OUTCOMES)
    watcher = ConnectWatcher(reader)
    thread = watcher._thread
    assert thread.ident is not None and thread.native_id is not None
    clock = time.pthread_getcpuclockid(thread.ident)
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, str(connections), "0.05", "0.02"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert client.stdin is not None and client.stdout is not None
        port = int(client.stdout.readline())  # listening
        if only_own:  # the kernel drops the machine's other connects before the reader
            event_filter = os.path.join(reader.directory, "events", EVENT, "filter")
            with open(event_filter, "w") as kernel_filter:
                kernel_filter.write(f"{connect_filter(CONNECT_OUTCOMES)} && dport == {port}")
        time.sleep(0.3)  # the thread's first read is done
        joined_before = len(watcher._joiner._connects)
        cpu_before = time.clock_gettime_ns(clock)
        wakes_before = voluntary_switches(thread.native_id)
        client.stdin.write(b"go\n")
        client.stdin.flush()
        client.stdout.readline()
        client.wait(60)
        time.sleep(0.5)  # the thread reads the last connection
        cpu = time.clock_gettime_ns(clock) - cpu_before
        wakes = voluntary_switches(thread.native_id) - wakes_before
        joined = len(watcher._joiner._connects) - joined_before
    finally:
        if client.poll() is None:
            client.kill()
        client.wait()
        watcher.close()
    return {
        "histstat": os.path.dirname(os.path.dirname(histstat.__file__)),
        "us_per_connection": cpu / 1000 / connections,
        "wakes": wakes,
        "events": joined,
    }


def run_turn(python: str, root: str, connections: int, only_own: bool) -> dict[str, object]:
    """One turn in a fresh process of ``python`` (whose histstat is measured), run again
    (at most RETRIES times) while the machine's other connects were more than a tenth of
    the events the thread joined."""
    for _ in range(RETRIES):
        turn = measure(python, root, connections, only_own)
        if int(turn["events"]) <= connections * 1.1:  # type: ignore[call-overload]
            return turn
    turn["noisy"] = True
    return turn


def measure(python: str, root: str, connections: int, only_own: bool) -> dict[str, object]:
    result = subprocess.run(
        [
            python,
            os.path.abspath(__file__),
            "--one-turn",
            "--connections",
            str(connections),
            *([] if only_own else ["--all-connects"]),
        ],  # fmt: skip
        cwd=root,
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        sys.exit(f"a turn under {python} failed:\n{result.stderr.decode(errors='replace')}")
    return json.loads(result.stdout.decode().strip().splitlines()[-1])


def machine() -> str:
    load = os.getloadavg()
    with open("/proc/net/tcp", "rb") as v4, open("/proc/net/tcp6", "rb") as v6:
        sockets = len(v4.readlines()) + len(v6.readlines()) - 2
    return (
        f"{os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()},"
        f" load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f},"
        f" {sockets} TCP sockets in this namespace"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--reference", metavar="ROOT", help="a checkout with its own .venv")
    parser.add_argument(
        "--all-connects",
        action="store_true",
        help="read the machine's other connects too, as histstat does (noisy when busy)",
    )
    parser.add_argument("--one-turn", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.one_turn:
        print(json.dumps(one_turn(options.connections, not options.all_connects)))
        return
    if os.geteuid() != 0:
        sys.exit("connect events need root")
    sides = [("this", sys.executable, os.getcwd())]
    if options.reference:
        root = os.path.abspath(options.reference)
        sides.append(("reference", os.path.join(root, ".venv", "bin", "python"), root))
    print(machine())
    print(
        f"{options.connections} connections of 50 ms, 20 ms apart; the reader thread's CPU"
        + ("; the machine's other connects too" if options.all_connects else "")
    )
    print("| turn | side | histstat | µs per connection | wakes | events |")
    print("|---|---|---|---|---|---|")
    figures: dict[str, list[float]] = {name: [] for name, _, _ in sides}
    for number in range(1, options.turns + 1):
        for name, python, root in sides:
            turn = run_turn(python, root, options.connections, not options.all_connects)
            per_connection = float(turn["us_per_connection"])  # type: ignore[arg-type]
            figures[name].append(per_connection)
            busy = " (busy machine)" if turn.get("noisy") else ""
            print(
                f"| {number} | {name} | {turn['histstat']} | {per_connection:.0f} |"
                f" {turn['wakes']} | {turn['events']}{busy} |",
                flush=True,
            )
    for name, values in figures.items():
        print(f"{name}: median {statistics.median(values):.0f} µs per connection "
              f"({', '.join(f'{value:.0f}' for value in values)})")  # fmt: skip
    if options.reference:
        ratio = statistics.median(figures["this"]) / statistics.median(figures["reference"])
        print(f"this / reference (medians): {ratio:.2f}")
    print(machine())


if __name__ == "__main__":
    main()

"""The main thread's work after the snapshot (tracker, filters, process facts, rows, JSON)
on issue 11's workload, replayed from synthetic snapshots, against another checkout's
histstat in the same run.

Run from the repository root, with the Python of a venv where histstat is installed;
``--against`` names the Python of another venv (a reference checkout), measured in turns
with this one:

    python benchmarks/poll_rows.py
    python benchmarks/poll_rows.py --against ../reference/.venv/bin/python --turns 5

The workload is what ``histstat -j --port PORT`` sees at -i 1 of 200 connections of 50 ms,
one every 70 ms (benchmarks/histstat_connects.py's), with the source and the kernel's
event readers stood in for: every poll, the listener, each connection's client end in
TIME_WAIT (no owner: its connect event names this process) for 60 s, and each server end
as a destroy event (its owner: the listener's); plus ``--others`` sockets of other ports
(the rest of a host), 1% of them replaced each poll, that --port filters out. Records are
made anew each poll, as the Linux source makes them. The processes are two children (the
server, the client), read through the real process cache (/proc), as histstat reads them.

It prints the thread CPU (time.thread_time) per poll of Poller.poll plus formatting every
row as NDJSON, the median of each turn's polls, and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

PORT = 47123
CONNECTIONS = 200
GAP = 0.07  # seconds between two connects
TIME_WAIT = 60.0
NETNS = 4026531840


def measure(polls: int, others: int) -> list[float]:
    """The CPU seconds of each poll (and its rows' JSON), in this process's histstat."""
    # The server (the listener's owner, and the other sockets') and the client (the
    # connects'): other processes, whose /proc files histstat reads as it would theirs.
    server, client = (
        subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                         stdin=subprocess.PIPE)
        for _ in range(2)
    )  # fmt: skip
    try:
        return _measure(polls, others, server.pid, client.pid)
    finally:
        for child in (server, client):
            assert child.stdin is not None
            child.stdin.close()
            child.wait()


def _measure(polls: int, others: int, pid: int, client_pid: int) -> list[float]:
    import psutil

    from histstat.connects import Connect, Process
    from histstat.enrich import ProcessCache
    from histstat.filters import RowFilter, parse_ports
    from histstat.output.format import format_json_row, json_fields
    from histstat.poller import Poller
    from histstat.records import Connection, TcpCounters
    from histstat.sources.base import End, Ends
    from histstat.tracker import ConnectionTracker

    created = psutil.Process(client_pid).create_time()
    # As old as the workload's client is at its first connect: the process cache reads a
    # younger process's container again at each lookup (containers.SETTLE_SECONDS).
    time.sleep(max(0.0, created + 2.5 - time.time()))
    facts = ProcessCache().lookup(client_pid)
    start = time.time() + 1.0  # the first connect, after the first poll
    fields = json_fields(False)

    def client_port(k: int) -> int:
        return 50000 + k

    def connect_time(k: int) -> float:
        return start + k * GAP

    class Source:
        def __init__(self) -> None:
            self.now = start
            self.table: frozenset = frozenset()
            self.gone: Ends = Ends([])

        def prepare(self, now: float) -> None:
            """The table and the ends of the poll at ``now``, made before it is timed."""
            self.now = now
            self.table = self._table()
            self.gone = self._ends()

        def snapshot(self, counters: bool = False) -> frozenset:
            return self.table

        def ends(self) -> Ends:
            return self.gone

        def _table(self) -> frozenset:
            records = [
                Connection("tcp", "127.0.0.1", PORT, None, None, "LISTEN", pid, 1, netns=NETNS)
            ]
            for k in range(CONNECTIONS):
                ended = connect_time(k) + 0.05
                if ended <= self.now < ended + TIME_WAIT:
                    records.append(
                        Connection(
                            "tcp",
                            "127.0.0.1",
                            client_port(k),
                            "127.0.0.1",
                            PORT,
                            "TIME_WAIT",
                            None,
                            10_000 + k,
                            netns=NETNS,
                        )
                    )
            churned = int(self.now - start) * max(1, others // 100)
            for n in range(churned, churned + others):
                records.append(
                    Connection(
                        "tcp",
                        "10.0.0.1",
                        20000 + n % 20000,
                        "10.0.0.2",
                        443,
                        "ESTABLISHED",
                        pid,
                        1_000_000 + n,
                        netns=NETNS,
                    )
                )
            return frozenset(records)

        def watches_ends(self) -> bool:
            return True

        def _ends(self) -> Ends:
            found = []
            for k in range(CONNECTIONS):
                ended = connect_time(k) + 0.05
                if self.now - 1.0 <= ended < self.now:
                    counters = TcpCounters(101, 101, 100, 0)
                    found.append(
                        End(
                            "tcp",
                            "127.0.0.1",
                            PORT,
                            "127.0.0.1",
                            client_port(k),
                            20_000 + k,
                            ended,
                            counters,
                            NETNS,
                        )
                    )
                    found.append(
                        End(
                            "tcp",
                            "127.0.0.1",
                            client_port(k),
                            "127.0.0.1",
                            PORT,
                            30_000 + k,
                            ended,
                            counters,
                            NETNS,
                        )
                    )
            return Ends(found)

        def uid_of(self, conn: Connection) -> int | None:
            return None

        def close(self) -> None:
            pass

    process = Process(client_pid, created, facts, NETNS)
    connects = {
        ("tcp", "127.0.0.1", client_port(k), "127.0.0.1", PORT): Connect(
            "tcp",
            "127.0.0.1",
            client_port(k),
            "127.0.0.1",
            PORT,
            connect_time(k),
            connect_time(k) + 0.001,
            False,
            process,
            NETNS,
        )
        for k in range(CONNECTIONS)
    }

    class Watcher:
        def connect_of(self, key: tuple, alone: bool = True) -> Connect | None:
            return connects.get(tuple(key[:5]))

        def catch_up(self) -> None:
            pass

        def take_failed(self) -> list:
            return []

        def lost_since_told(self) -> int:
            return 0

    source = Source()
    poller = Poller(
        source,
        ConnectionTracker(),
        ProcessCache(),
        RowFilter(ports=parse_ports(str(PORT))),
        connects=Watcher(),
    )  # type: ignore[arg-type]
    spent = []
    rows = 0
    for n in range(polls):
        source.prepare(start + n)
        began = time.thread_time()
        for pending in poller.poll():
            format_json_row(pending.resolved(), fields)
            rows += 1
        spent.append(time.thread_time() - began)
    assert rows == 2 * CONNECTIONS + 1, rows
    return spent[1:]  # the first poll makes a story per socket of the host


def turn(python: str, polls: int, others: int) -> float:
    """The median CPU of a poll in a fresh process of ``python``."""
    out = subprocess.run(
        [python, os.path.abspath(__file__), "--child", str(polls), str(others)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(out.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", help="the Python of the reference venv")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--polls", type=int, default=40, help="polls a turn (-i 1: seconds)")
    parser.add_argument("--others", type=int, default=1000, help="the host's other sockets")
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(statistics.median(measure(*args.child)))
        return
    pythons = {"this": sys.executable}
    if args.against:
        pythons["against"] = args.against
    results: dict[str, list[float]] = {name: [] for name in pythons}
    for _ in range(args.turns):
        for name, python in pythons.items():
            results[name].append(turn(python, args.polls, args.others))
    print(f"{args.polls} polls a turn, {args.others} other sockets; CPU of a poll (median):")
    for name, medians in results.items():
        print(f"  {name:8} " + "  ".join(f"{m * 1e3:6.3f} ms" for m in medians))
    if args.against:
        this = statistics.median(results["this"])
        against = statistics.median(results["against"])
        print(f"  this / against: {this / against:.2f}")


if __name__ == "__main__":
    main()

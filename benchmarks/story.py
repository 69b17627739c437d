"""The tracker's cost per poll: one story per socket, against the plain set difference of
two snapshots (what a tracker that knows only "new since the last poll" pays), measured
in the same run on the same synthetic snapshots.

    .venv/bin/python benchmarks/story.py [SOCKETS ...]

Each snapshot holds SOCKETS TCP connections; between two polls 1% of them close, as many
open, and 1% change state. Prints the first poll (a story per socket) and the mean of
the polls after it, in milliseconds, and their ratio to the set difference.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from histstat.records import Connection, sort_key  # noqa: E402
from histstat.tracker import ConnectionTracker  # noqa: E402

POLLS = 50


def connection(number: int, status: str = "ESTABLISHED") -> Connection:
    return Connection(
        "tcp", "10.0.0.1", 1024 + number % 60000, f"10.0.{number // 60000 % 250}.2", 443,
        status, 1000 + number % 50,
    )  # fmt: skip


def snapshots(sockets: int) -> list[frozenset[Connection]]:
    rng = random.Random(1)
    live = {number: connection(number) for number in range(sockets)}
    following = sockets
    made = []
    for _ in range(POLLS):
        made.append(frozenset(live.values()))
        for _ in range(sockets // 100):
            del live[rng.choice(list(live))]
            live[following] = connection(following)
            following += 1
            changed = rng.choice(list(live))
            live[changed] = live[changed]._replace(status="CLOSE_WAIT", pid=None)
    return made


def stories(made: list[frozenset[Connection]]) -> tuple[float, float]:
    tracker = ConnectionTracker()
    started = time.perf_counter()
    tracker.update(made[0], 0.0)
    first = time.perf_counter() - started
    started = time.perf_counter()
    for number, snapshot in enumerate(made[1:], 1):
        tracker.update(snapshot, float(number))
    return first, (time.perf_counter() - started) / (len(made) - 1)


def differences(made: list[frozenset[Connection]]) -> tuple[float, float]:
    previous: frozenset[Connection] = frozenset()
    times = []
    for snapshot in made:
        started = time.perf_counter()
        sorted(snapshot - previous, key=sort_key)
        sorted(previous - snapshot, key=sort_key)
        times.append(time.perf_counter() - started)
        previous = snapshot
    return times[0], sum(times[1:]) / (len(times) - 1)


def main(argv: list[str]) -> None:
    print("sockets  first poll ms (x diff)  later polls ms (x diff)")
    for sockets in [int(arg) for arg in argv] or [1000, 10000, 50000]:
        made = snapshots(sockets)
        first, later = stories(made)
        first_diff, later_diff = differences(made)
        print(
            f"{sockets:7d}  {first * 1000:8.1f} ({first / first_diff:5.1f}x)"
            f"        {later * 1000:8.2f} ({later / later_diff:5.1f}x)"
        )


if __name__ == "__main__":
    main(sys.argv[1:])

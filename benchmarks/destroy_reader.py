"""The destroy-broadcast reader's CPU per end, this checkout against a reference one.

Each turn runs, in a process of its own, the ``DestroyWatcher`` of one checkout (this
one, or ``--reference``, e.g. a ``git worktree`` of main) while ``--connections``
loopback connections open, stay open ``--hold`` seconds, close normally (two ends each)
and are followed by a ``--gap`` pause, as short connections at the default interval
arrive; the caller takes the ends every poll as histstat does. The figure is the reader
thread's own CPU clock (``pthread_getcpuclockid``) over the run, divided by the ends it
received (other programs' ends count too; ``--own-namespace`` leaves them out, as
they come in bursts that share a wake-up). The turns alternate, ``--turns`` of each;
the medians and their ratio are printed.

    .venv/bin/python benchmarks/destroy_reader.py --reference /path/to/main-checkout \
        --own-namespace

Needs Linux (sock_diag destroy broadcasts, no privilege needed).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from turns import in_turns  # this directory's (a script's first path)

HERE = Path(__file__).resolve().parent.parent


def worker(connections: int, hold: float, gap: float) -> dict:
    from histstat.sources.destroy import DestroyWatcher

    watcher = DestroyWatcher(["tcp", "tcp6", "udp", "udp6"])
    if not watcher.start():
        raise SystemExit(f"cannot join the destroy groups: {watcher.error}")
    reader = next(t for t in threading.enumerate() if t.name == "histstat-destroy")
    clock = time.pthread_getcpuclockid(reader.ident)
    ends = 0
    mine = set()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(128)
        address = server.getsockname()
        time.sleep(0.2)
        watcher.ends()
        start = time.clock_gettime(clock)
        for _ in range(connections):
            client = socket.create_connection(address)
            accepted, _ = server.accept()
            mine.add(client.getsockname()[1])
            time.sleep(hold)
            client.close()
            accepted.close()
            time.sleep(gap)
            taken = watcher.ends().ends
            ends += len(taken)
            mine.difference_update(end.lport for end in taken)
        deadline = time.monotonic() + 2.0
        while mine and time.monotonic() < deadline:
            time.sleep(0.05)
            taken = watcher.ends().ends
            ends += len(taken)
            mine.difference_update(end.lport for end in taken)
        cpu = time.clock_gettime(clock) - start
    watcher.close()
    return {"cpu": cpu, "ends": ends, "missing": len(mine)}


def run_turn(root: Path, args: argparse.Namespace) -> dict:
    env = dict(os.environ, PYTHONPATH=str(root))
    command = [sys.executable, __file__, "--worker", str(args.connections)]
    command += ["--hold", str(args.hold), "--gap", str(args.gap)]
    if args.own_namespace:
        # Only this run's ends: other programs' arrive in bursts, which share a wake-up.
        script = 'ip link set lo up && exec "$@"'
        command = ["unshare", "--net", "sh", "-c", script, "sh", *command]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True, cwd=root)
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, help="a checkout to measure against")
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--hold", type=float, default=0.02)
    parser.add_argument("--gap", type=float, default=0.05)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument(
        "--own-namespace",
        action="store_true",
        help="run each turn in a network namespace of its own (root; unshare, ip)",
    )
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.hold, args.gap)))
        return
    checkouts = {"this": HERE}
    if args.reference is not None:
        checkouts["reference"] = args.reference.resolve()

    def per_end(root: Path) -> tuple[float, str]:
        result = run_turn(root, args)
        micros = result["cpu"] / max(result["ends"], 1) * 1e6
        return micros, (
            f"{micros:6.1f} µs per end ({result['ends']} ends, "
            f"{result['cpu'] * 1e3:.1f} ms, {result['missing']} of ours missing)"
        )

    medians = in_turns(checkouts, args.turns, per_end)
    for name, value in medians.items():
        print(f"{name}: median {value:.1f} µs of the reader's CPU per end")
    if "reference" in medians:
        print(f"ratio this/reference: {medians['this'] / medians['reference']:.2f}")


if __name__ == "__main__":
    main()

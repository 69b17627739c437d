"""The Linux source's dumps: both TCP tables from one walk of the kernel's hash tables
(TCPDIAG_GETSOCK) against one dump per family, and the whole snapshot per poll against a
reference checkout.

    .venv/bin/python benchmarks/dumps.py                     # one walk vs per family
    .venv/bin/python benchmarks/dumps.py --reference /path/to/main-checkout --quiet

1. With this checkout's ``SockDiag``: ``dump_tcp`` (both families,
   connections then listeners: two requests) against ``dump`` of tcp and of tcp6 (four
   requests), alternating, one call every ``--pause`` seconds (cold caches, as a poll at
   ``-i 1`` finds them), ``--rounds`` of each; the calling thread's CPU
   (``time.thread_time``), which includes the kernel's walk. Medians and their ratio.
2. With ``--reference``: ``LinuxSource().snapshot()`` (dumps, namespace discovery,
   owners, rows), in a process of its own per turn for this checkout and the reference,
   alternating, ``--turns`` of each, each turn ``--polls`` snapshots ``--pause`` apart;
   the median thread CPU per snapshot of each turn, then the median of the turns.

``--quiet`` runs both in new network and pid namespaces (root; ``unshare``, ``ip``): a
machine with no socket and three processes, whose dumps still walk the kernel's whole
hash tables, which every namespace shares; other programs' sockets then do not change
the figures as they come and go.

Needs Linux; root for ``--quiet``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from turns import in_turns  # this directory's (a script's first path)

HERE = Path(__file__).resolve().parent.parent


def one_walk_against_per_family(rounds: int, pause: float) -> dict:
    from histstat.sources.linux import _TCP_STATES
    from histstat.sources.sock_diag import SockDiag

    diag = SockDiag()
    caches: dict[int, dict] = {socket.AF_INET: {}, socket.AF_INET6: {}}
    tables = {socket.AF_INET: ("tcp", caches[2]), socket.AF_INET6: ("tcp6", caches[10])}

    def one_walk() -> int:
        return sum(len(rows) for rows in diag.dump_tcp(tables, _TCP_STATES).values())

    def per_family() -> int:
        return sum(
            len(diag.dump(proto, family, socket.IPPROTO_TCP, _TCP_STATES, caches[family]))
            for family, (proto, _) in tables.items()
        )

    variants = {"one walk (TCPDIAG_GETSOCK)": one_walk, "per family (two v2 dumps)": per_family}
    times: dict[str, list[float]] = {name: [] for name in variants}
    rows: dict[str, list[int]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, dump in variants.items():
            time.sleep(pause)
            start = time.thread_time()
            rows[name].append(dump())
            times[name].append(time.thread_time() - start)
    diag.close()
    return {name: (times[name], rows[name]) for name in variants}


def print_walks(found: dict) -> None:
    medians = {name: statistics.median(times) * 1e6 for name, (times, _) in found.items()}
    for name, (times, rows) in found.items():
        print(
            f"{name:28s} median {medians[name]:7.0f} µs, min {min(times) * 1e6:7.0f} µs "
            f"(median {statistics.median(rows):.0f} rows)"
        )
    one, per = medians.values()
    print(f"ratio one walk / per family: {one / per:.2f}")


def snapshots(polls: int, pause: float) -> dict:
    from histstat.sources.linux import LinuxSource

    source = LinuxSource()
    costs = []
    for _ in range(polls):
        time.sleep(pause)
        start = time.thread_time()
        table = source.snapshot()
        costs.append(time.thread_time() - start)
        source.ends()
    source.close()
    return {"median": statistics.median(costs[1:]), "sockets": len(table)}


def run_worker(root: Path, args: argparse.Namespace, work: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(root))
    command = [sys.executable, __file__, "--worker", work, "--pause", str(args.pause)]
    command += ["--polls", str(args.polls), "--rounds", str(args.rounds)]
    if args.quiet:
        script = 'ip link set lo up && exec "$@"'
        prefix = ["unshare", "--net", "--pid", "--fork", "--mount-proc", "sh", "-c", script]
        command = [*prefix, "sh", *command]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True, cwd=root)
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--pause", type=float, default=0.5)
    parser.add_argument("--reference", type=Path, help="a checkout to compare snapshots with")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--polls", type=int, default=16)
    parser.add_argument("--quiet", action="store_true", help="snapshots in empty namespaces")
    parser.add_argument("--worker", choices=("walks", "snapshots"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "walks":
        print(json.dumps(one_walk_against_per_family(args.rounds, args.pause)))
        return
    if args.worker == "snapshots":
        print(json.dumps(snapshots(args.polls, args.pause)))
        return
    print(
        f"{os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}"
        f", load average {os.getloadavg()[0]:.2f}"
    )
    print_walks(run_worker(HERE, args, "walks"))
    if args.reference is None:
        return
    checkouts = {"this": HERE, "reference": args.reference.resolve()}

    def snapshot(root: Path) -> tuple[float, str]:
        result = run_worker(root, args, "snapshots")
        micros = result["median"] * 1e6
        return micros, f"snapshot median {micros:6.0f} µs ({result['sockets']} sockets)"

    medians = in_turns(checkouts, args.turns, snapshot)
    for name, value in medians.items():
        print(f"{name}: snapshot {value:.0f} µs of CPU (median of the turns' medians)")
    print(f"ratio this/reference: {medians['this'] / medians['reference']:.2f}")


if __name__ == "__main__":
    main()

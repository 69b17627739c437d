"""What reading a process's container (its /proc/PID/cgroup) adds to reading its facts.

Run from the repository root, with the Python of a venv where histstat is installed (as
root, so that every process's facts can be read, as histstat reads them):

    python benchmarks/container_facts.py              # the first 100 processes: seconds
    python benchmarks/container_facts.py --processes 300 --runs 11

It measures in the same run, as wall time per process (``timeit``, the best of 3 repeats
of ``--reads`` reads of every process, the median of ``--runs`` runs, each kind in turn
so that the machine's load falls on all alike):

* the Linux facts reader (``read_linux_process_facts``) without its cgroup read: the
  ratio's reference;
* the same reader as histstat runs it, with the cgroup read;
* the cgroup read and parse alone (``read_container_id``).

Facts are read once per new process (the cache keys them by pid and start time), so
this is a cost per process, not per row or per poll. The machine's load average is
printed: other programs count too.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import timeit

import psutil

import histstat.enrich as enrich
from histstat.containers import read_container_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=100, help="processes read")
    parser.add_argument("--reads", type=int, default=5, help="reads of each per timing")
    parser.add_argument("--runs", type=int, default=7, help="runs, of which the median")
    args = parser.parse_args()
    me = os.getpid()
    processes = [proc for proc in psutil.process_iter() if proc.pid != me][: args.processes]
    reading = enrich.read_container_id

    def without_cgroup() -> None:
        enrich.read_container_id = lambda pid, proc="/proc": None
        for proc in processes:
            enrich.read_linux_process_facts(proc)

    def with_cgroup() -> None:
        enrich.read_container_id = reading
        for proc in processes:
            enrich.read_linux_process_facts(proc)

    def cgroup_alone() -> None:
        for proc in processes:
            read_container_id(proc.pid)

    kinds = {
        "facts without the cgroup read (reference)": without_cgroup,
        "facts with the cgroup read (histstat)": with_cgroup,
        "cgroup read alone": cgroup_alone,
    }
    timings: dict[str, list[float]] = {name: [] for name in kinds}
    for _ in range(args.runs):
        for name, work in kinds.items():
            best = min(timeit.repeat(work, number=args.reads, repeat=3))
            timings[name].append(best / (args.reads * len(processes)))
    enrich.read_container_id = reading
    per_process = {name: statistics.median(values) * 1e6 for name, values in timings.items()}
    reference = per_process["facts without the cgroup read (reference)"]
    print(f"Python {platform.python_version()}, Linux {platform.release()}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}, "
          f"{len(processes)} processes read")  # fmt: skip
    print(f"{'measure':<44} {'µs/process':>10} {'ratio':>6}")
    for name, micros in per_process.items():
        print(f"{name:<44} {micros:>10.1f} {micros / reference:>6.2f}")


if __name__ == "__main__":
    if not sys.platform.startswith("linux"):
        sys.exit("container_facts.py measures the Linux facts reader")
    main()

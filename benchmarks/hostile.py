"""histstat against a hostile process: a 1 MB control-character command line (issue 14).

Run from the repository root, with the Python of a venv where histstat is installed:

    python benchmarks/hostile.py                 # --once at 30 and 100 connections, 3 runs
                                                 # each, and a live victim: ~1 min on 2 cores
    python benchmarks/hostile.py --quick         # 30 connections, 1 run, 100 victim connections
    python benchmarks/hostile.py --before /path/to/other/venv/bin/histstat
                                                 # also measure another install (the code
                                                 # before a change) in the same run
    python benchmarks/hostile.py --neighbour 30 &  # only start the attacker, until killed
                                                 # (to run the test suite beside it)

The attacker is the issue's: a process named "\\xffsshd" whose command line is 9 arguments
of 120,000 \\x01 bytes, holding N loopback connections (2N + 1 sockets with its listener).
The reference, measured in the same run, is a holder of the same connections with a short
command line: the ratios say what the attacker costs beyond the sockets themselves.

* Once: wall time and peak RSS (wait4's ru_maxrss) of ``histstat --once --port PORT``,
  plain and ``-j``, stdout to /dev/null; the median of the runs.
* Victim: ``histstat -j -i 0.1 --pid VICTIM,ATTACKER -l FILE`` runs while the attacker
  replaces one of its connections every 0.1 s (20 new rows a second) and a victim opens
  20 connections a second, each held 0.3 s: the share of the victim's connections seen,
  against the same run with a benign holder, and histstat's peak RSS (VmHWM).

Every helper and histstat process is stopped at the end, on an error and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

from bench import MIB, Processes, machine, read_line, socket_census, table

ATTACKER_COMM = b"\xffsshd"
ATTACKER_ARGUMENTS = [b"\x01" * 120_000] * 9
LOOPBACK = "127.0.0.1"
ONCE_TIMEOUT = 600.0  # seconds: the code before issue 14 took 108 s at 100 connections

# ---------------------------------------------------------------------------------------
# Helper processes (this file, run as: hostile.py _helper KIND ARGS...)
# ---------------------------------------------------------------------------------------


def _rst_on_close(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _pair(listener: socket.socket) -> tuple:
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    _rst_on_close(client)
    _rst_on_close(accepted)
    return client, accepted


def _holder(pairs: int, churn: float, hostile: bool, forever: bool = False) -> None:
    """Hold ``pairs`` connections; with ``churn``, replace the oldest every ``churn`` s;
    until stdin reaches EOF, or until killed when ``forever``."""
    if hostile:
        fd = os.open("/proc/self/comm", os.O_WRONLY)
        os.write(fd, ATTACKER_COMM)
        os.close(fd)
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(128)
    held = collections.deque(_pair(listener) for _ in range(pairs))
    print(f"ready {listener.getsockname()[1]}", flush=True)
    ended = threading.Event()
    if not forever:
        threading.Thread(target=lambda: (sys.stdin.buffer.read(), ended.set()), daemon=True).start()
    while not ended.wait(churn if churn > 0 else None):
        for end in held.popleft():
            end.close()
        held.append(_pair(listener))
    os._exit(0)


def _victim(count: int, rate: float, hold: float) -> None:
    """``count`` connections to its own listener, ``rate`` a second, each held ``hold`` s;
    waits for a line on stdin first, prints the client ports at the end."""
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(128)
    print("ready", flush=True)
    sys.stdin.buffer.readline()
    held: collections.deque = collections.deque()
    ports = []
    start = time.monotonic()
    while len(ports) < count or held:
        now = time.monotonic()
        while held and held[0][0] <= now:
            for end in held.popleft()[1]:
                end.close()
        if len(ports) < count and start + len(ports) / rate <= now:
            pair = _pair(listener)
            ports.append(pair[0].getsockname()[1])
            held.append((now + hold, pair))
        time.sleep(0.002)
    print(json.dumps(ports), flush=True)
    sys.stdin.buffer.read()
    os._exit(0)


def helper_main(argv: list) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the benchmark stops us on Ctrl-C
    kind, args = argv[0], argv[1:]
    if kind in ("attacker", "benign"):
        _holder(int(args[0]), float(args[1]), kind == "attacker")
    elif kind == "neighbour":
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        _holder(int(args[0]), float(args[1]), True, forever=True)
    elif kind == "victim":
        _victim(int(args[0]), float(args[1]), float(args[2]))
    raise SystemExit(f"unknown helper {kind!r}")


def start_helper(procs: Processes, kind: str, *args) -> subprocess.Popen:
    extra = ATTACKER_ARGUMENTS if kind == "attacker" else []
    command = [sys.executable, os.path.abspath(__file__), "_helper", kind, *map(str, args)]
    return procs.start([*command, *extra], stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def holder(procs: Processes, kind: str, pairs: int, churn: float = 0.0) -> tuple:
    """(process, listener port) of an attacker or a benign holder."""
    proc = start_helper(procs, kind, pairs, churn)
    return proc, int(read_line(proc, 60).split()[1])


# ---------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------


def run_once(histstat: list, args: list, tmp: str) -> tuple:
    """(seconds, peak RSS in bytes) of one histstat run to its end, stdout to /dev/null;
    in ``tmp``, where ``python -m histstat`` cannot pick up a checkout's package."""
    started = time.monotonic()
    with open(os.devnull, "wb") as null:
        proc = subprocess.Popen([*histstat, *args], stdin=subprocess.DEVNULL, stdout=null,
                                stderr=subprocess.PIPE, cwd=tmp)  # fmt: skip
    try:
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - started > ONCE_TIMEOUT:
                raise RuntimeError(f"{args} did not end within {ONCE_TIMEOUT:g} s")
            time.sleep(0.01)
    finally:
        if not pid:
            proc.kill()
            os.wait4(proc.pid, 0)
    took = time.monotonic() - started
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"histstat {args} failed: {err[-2000:]}")
    return took, usage.ru_maxrss * 1024


def once(procs: Processes, installs: dict, pairs: int, runs: int, tmp: str) -> dict:
    """{(install, kind, format): (median seconds, median peak RSS)}."""
    results = {}
    for kind in ("benign", "attacker"):
        proc, port = holder(procs, kind, pairs)
        try:
            for name, histstat in installs.items():
                for style, options in (("plain", []), ("json", ["-j"])):
                    args = ["--once", *options, "--port", str(port)]
                    times, peaks = zip(*(run_once(histstat, args, tmp) for _ in range(runs)))
                    results[(name, kind, style)] = (
                        statistics.median(times),
                        statistics.median(peaks),
                    )
                    print(f"once, {pairs} connections, {name}, {kind}, {style}: "
                          f"{results[(name, kind, style)][0]:.2f} s", flush=True)  # fmt: skip
        finally:
            procs.stop(proc)
    return results


def vm_peak(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def victim_coverage(procs: Processes, histstat: list, kind: str, count: int, tmp: str) -> dict:
    """The share of a victim's connections histstat saw while ``kind`` churned beside it."""
    other, port = holder(procs, kind, 30, 0.1)
    victim = start_helper(procs, "victim", count, 20.0, 0.3)
    log = os.path.join(tmp, f"victim-{kind}.ndjson")
    histstat_proc = None
    try:
        read_line(victim, 30)
        pids = f"{victim.pid},{other.pid}"
        with open(os.devnull, "wb") as null:
            histstat_proc = procs.start(
                [*histstat, "-q", "-j", "-i", "0.1", "--pid", pids, "-l", log],
                stdin=subprocess.DEVNULL, stdout=null, stderr=subprocess.DEVNULL, cwd=tmp,
            )  # fmt: skip
        deadline = time.monotonic() + 120
        while not (os.path.exists(log) and os.path.getsize(log)):  # its first poll is out
            if time.monotonic() > deadline:
                raise RuntimeError("histstat wrote nothing within 120 s")
            time.sleep(0.05)
        victim.stdin.write(b"go\n")
        victim.stdin.flush()
        ports = set(json.loads(read_line(victim, count / 20.0 * 3 + 60)))
        time.sleep(1.0)  # the rows of the last polls reach the file
        peak = vm_peak(histstat_proc.pid)
    finally:
        if histstat_proc is not None:
            procs.stop(histstat_proc)
        procs.stop(victim)
        procs.stop(other)
    seen, other_rows = set(), 0
    with open(log, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # the last line, cut by SIGTERM
            if row["pid"] == victim.pid:
                seen.update(p for p in (row["lport"], row["rport"]) if p in ports)
            elif row["pid"] == other.pid:
                other_rows += 1
    return {"seen": len(seen) / len(ports), "peak": peak, "other_rows": other_rows}


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def once_table(results: dict, installs: list, sizes: list) -> str:
    rows = []
    for pairs in sizes:
        for name in installs:
            for style in ("plain", "json"):
                benign = results[pairs][(name, "benign", style)]
                attacked = results[pairs][(name, "attacker", style)]
                rows.append([
                    f"{pairs} ({2 * pairs + 1} rows)", name, style,
                    f"{benign[0]:.2f}", f"{attacked[0]:.2f}", f"{attacked[0] / benign[0]:.1f}×",
                    f"{benign[1] / MIB:.0f}", f"{attacked[1] / MIB:.0f}",
                    f"{attacked[1] / benign[1]:.1f}×",
                ])  # fmt: skip
    header = ["connections", "histstat", "format", "reference s", "attacker s", "time ×",
              "reference MiB", "attacker MiB", "memory ×"]  # fmt: skip
    return table(header, rows)


def victim_table(results: dict) -> str:
    rows = [
        [name, f"{r['benign']['seen']:.1%}", f"{r['attacker']['seen']:.1%}",
         r["attacker"]["other_rows"], f"{r['attacker']['peak'] / MIB:.0f}"]
        for name, r in results.items()
    ]  # fmt: skip
    header = ["histstat", "victim seen, benign holder", "victim seen, attacker",
              "attacker rows written", "peak RSS with attacker (MiB)"]  # fmt: skip
    return table(header, rows)


def _terminated(signum, frame) -> None:
    raise KeyboardInterrupt


def bench(quick: bool, installs: dict, procs: Processes, tmp: str) -> None:
    sizes = [30] if quick else [30, 100]
    runs = 1 if quick else 3
    count = 100 if quick else 200
    print(f"# histstat against a hostile command line{' (--quick)' if quick else ''}\n")
    print(machine())
    for name, histstat in installs.items():
        print(f"- {name}: {' '.join(histstat)}")
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    sockets, time_wait, _ = socket_census()
    print(f"- load average at the start: {load}; inet sockets: {sockets:,} ({time_wait:,} "
          "TIME_WAIT)\n", flush=True)  # fmt: skip
    once_results = {pairs: once(procs, installs, pairs, runs, tmp) for pairs in sizes}
    victim_results = {}
    for name, histstat in installs.items():
        victim_results[name] = {
            kind: victim_coverage(procs, histstat, kind, count, tmp)
            for kind in ("benign", "attacker")
        }
        print(f"victim, {name}: {victim_results[name]['attacker']['seen']:.1%} seen", flush=True)
    print(f"\n## --once, the median of {runs} run{'s' if runs > 1 else ''}\n")
    print(once_table(once_results, list(installs), sizes))
    print(f"\n## A victim's {count} connections (20 a second, each held 0.3 s), -i 0.1, while "
          "30 connections of a holder churn (one replaced every 0.1 s)\n")  # fmt: skip
    print(victim_table(victim_results))
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"\nLoad average at the end: {load}.")


def main(argv: list | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_helper"]:
        helper_main(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="30 connections, one run")
    parser.add_argument(
        "--before", metavar="HISTSTAT", help="also measure this histstat command (another install)"
    )
    parser.add_argument(
        "--neighbour", metavar="PAIRS", type=int,
        help="only run the attacker with PAIRS connections, until killed",
    )  # fmt: skip
    options = parser.parse_args(argv)
    if options.neighbour is not None:
        helper = [sys.executable, os.path.abspath(__file__), "_helper", "neighbour"]
        os.execv(sys.executable, [*helper, str(options.neighbour), "0", *ATTACKER_ARGUMENTS])
    installs = {"this": [sys.executable, "-m", "histstat"]}
    if options.before:
        before = os.path.abspath(options.before)
        installs = {"before": [before], "after": installs["this"]}
    signal.signal(signal.SIGTERM, _terminated)
    procs = Processes()
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="histstat-hostile-") as tmp:
            bench(options.quick, installs, procs, tmp)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping helper processes", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
    print(f"\n(benchmark took {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""histstat benchmarks: per-poll CPU, churn, catching short connections, memory.

Run from the repository root, with the Python of a venv where histstat is installed:

    python benchmarks/bench.py            # full run (steady 100/1,000/10,000 sockets,
                                          # catch 200, memory 100,000): ~2.5 min on 2 cores
    python benchmarks/bench.py --quick    # reduced sizes (steady 100/1,000, churn on 1,000,
                                          # catch 50, memory 10,000): under a minute

(it needs no root, but as root ss and psutil see every process's sockets). Other
programs' sockets count too, and are printed: run it on an otherwise quiet machine.

It sets up every workload itself on 127.0.0.1 (helper processes started from this same
file), measures side by side in one run and prints Markdown tables with ratios, to paste
into docs/performance.md. Every helper and histstat process is stopped at the end, on an
error and on Ctrl-C; helpers also die with this process (stdin EOF, and PR_SET_PDEATHSIG
on Linux). Sockets are closed with RST (SO_LINGER 0), so no TIME_WAIT piles up between
workloads.

Workloads:

* Steady: sockets held open by helper processes (a loopback connection is two sockets),
  no churn. CPU per poll (process CPU time over many polls, the first one excluded) of
  histstat's poll (histstat.poller.Poller: source, tracker, enrichment of what is new)
  with each source; of a bare psutil.net_connections('inet'); of ``ss -tunap`` as a
  whole process (CPU of the child); and of the original histstat's list diff (for each
  connection of the new list, ``c not in previous``: quadratic; a single iteration at
  10,000 sockets).
* Churn: the largest steady set plus a client process opening 100 connections a second
  to a listener in another process, each held 1 s; one poll a second, as histstat does
  by default.
* Catch: a client opening connections one after the other, each held 50 ms, 20 ms
  apart, to a listener in another process, while ``histstat -j -i 0.02`` runs as a real
  process writing to a file: the share of connections seen (either end, matched by the
  client's port), the share attributed to the client's pid (its own end), histstat's
  CPU as a share of one core.
* Memory: RSS of ``histstat -q -l /dev/null -i 0.05`` before and after connections
  churned as fast as the machine allows (bounded in time; the count reached is printed).

The Linux source (histstat.source_linux.LinuxSource) is measured when it can be imported;
the real process gets ``--source NAME`` only when ``histstat --help`` mentions it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import resource
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque

import psutil

import histstat
from histstat.enrich import ProcessCache
from histstat.poller import Poller
from histstat.sources.psutil_source import PsutilSource
from histstat.tracker import ConnectionTracker

try:
    from histstat.sources.linux import LinuxSource
except ImportError:  # not written yet, or not this platform
    LinuxSource = None

LOOPBACK = "127.0.0.1"
PAIRS_PER_HELPER = 1000  # connections (2 sockets each) per holding process, at most
HISTSTAT = [sys.executable, "-m", "histstat"]
MIB = 1024 * 1024

TARGETS = {
    "steady_vs_ss": "≤ 0.5×",
    "steady_vs_psutil": "≤ 0.25×",
    "churn_vs_ss": "≤ 1×",
    "catch_seen": "≥ 99%",
    "catch_attributed": "≥ 95%",
    "catch_cpu": "≤ 5%",
    "memory": "≤ 5 MiB",
}

# ---------------------------------------------------------------------------------------
# Helper processes (this file, run as: bench.py _helper KIND ARGS...)
# ---------------------------------------------------------------------------------------


def _rst_on_close(sock: socket.socket) -> None:
    """SO_LINGER 0: close sends RST, and neither end lingers in TIME_WAIT."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _raise_nofile(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _exit_with_parent() -> None:
    """End this helper as soon as the benchmark closes our stdin (or dies)."""

    def watch() -> None:
        sys.stdin.buffer.read()
        os._exit(0)  # sockets close with RST: SO_LINGER 0 on every one

    threading.Thread(target=watch, daemon=True).start()


def _hold(pairs: int) -> None:
    _raise_nofile(2 * pairs + 64)
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(128)
    held = []
    for _ in range(pairs):
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        _rst_on_close(client)
        _rst_on_close(server)
        held += (client, server)
    _say(f"ready {listener.getsockname()[1]} {pairs}")
    sys.stdin.buffer.read()
    os._exit(0)


def _serve() -> None:
    """A listener that accepts everything and closes its end when the peer does."""
    _raise_nofile(65536)
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(4096)
    listener.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    _exit_with_parent()
    _say(f"ready {listener.getsockname()[1]}")
    while True:
        for key, _ in selector.select():
            sock = key.fileobj
            if sock is listener:
                while True:
                    try:
                        accepted, _ = listener.accept()
                    except OSError:  # BlockingIOError: none left; EMFILE: later
                        break
                    accepted.setblocking(False)
                    _rst_on_close(accepted)
                    selector.register(accepted, selectors.EVENT_READ)
                continue
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                selector.unregister(sock)
                sock.close()


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection((LOOPBACK, port), timeout=10)
    _rst_on_close(sock)
    return sock


def _churn(port: int, rate: float, hold: float, duration: float) -> None:
    """``rate`` connections a second, each held ``hold`` seconds, for ``duration``."""
    _exit_with_parent()
    held: deque = deque()
    start = time.monotonic()
    opened = 0
    while True:
        now = time.monotonic()
        while held and held[0][0] <= now:
            held.popleft()[1].close()
        if now >= start + duration:
            break
        while start + opened / rate <= now:
            held.append((now + hold, _connect(port)))
            opened += 1
        wake = min(start + opened / rate, held[0][0] if held else start + duration)
        time.sleep(max(0.0, wake - time.monotonic()))
    _say(f"done {opened}")


def _catch(port: int, count: int, hold: float, gap: float) -> None:
    """One connection after the other, each held ``hold`` s, ``gap`` s apart."""
    _exit_with_parent()
    ports = []
    for _ in range(count):
        sock = _connect(port)
        ports.append(sock.getsockname()[1])
        time.sleep(hold)
        sock.close()
        time.sleep(gap)
    _say(json.dumps({"pid": os.getpid(), "ports": ports}))


def _flood(port: int, count: int, duration: float, window: int) -> None:
    """As many connections as possible, up to ``count`` or ``duration``, ``window`` of
    them open at a time (so that polls can see them)."""
    _exit_with_parent()
    held: deque = deque()
    opened = failed = 0
    start = time.monotonic()
    while opened < count and time.monotonic() - start < duration:
        try:
            held.append(_connect(port))
        except OSError:
            failed += 1
            time.sleep(0.01)
            continue
        opened += 1
        if len(held) > window:
            held.popleft().close()
    took = time.monotonic() - start
    while held:
        held.popleft().close()
    _say(f"done {opened} {took:.3f} {failed}")


def helper_main(argv: list) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the benchmark stops us on Ctrl-C
    kind, args = argv[0], argv[1:]
    if kind == "hold":
        _hold(int(args[0]))
    elif kind == "serve":
        _serve()
    elif kind == "churn":
        _churn(int(args[0]), float(args[1]), float(args[2]), float(args[3]))
    elif kind == "catch":
        _catch(int(args[0]), int(args[1]), float(args[2]), float(args[3]))
    elif kind == "flood":
        _flood(int(args[0]), int(args[1]), float(args[2]), int(args[3]))
    else:
        raise SystemExit(f"unknown helper {kind!r}")
    sys.stdout.flush()
    os._exit(0)  # not a normal exit: the stdin watcher thread still reads


# ---------------------------------------------------------------------------------------
# Processes started by the benchmark
# ---------------------------------------------------------------------------------------

_LIBC = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError):
        _LIBC = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:  # preexec_fn: in the child, before exec
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


class Processes:
    """Every process the benchmark starts, to stop them all whatever happens."""

    def __init__(self) -> None:
        self._running: list = []
        self.ports: set = set()  # our listeners' ports, to tell our sockets from others'

    def helper(self, kind: str, *args) -> subprocess.Popen:
        command = [sys.executable, os.path.abspath(__file__), "_helper", kind, *map(str, args)]
        return self.start(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def start(self, command: list, **options) -> subprocess.Popen:
        proc = subprocess.Popen(command, preexec_fn=_die_with_parent, **options)
        self._running.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 10.0) -> None:
        """Close its stdin (helpers exit) or send SIGTERM (histstat exits cleanly)."""
        if proc.poll() is None:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            else:
                proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if proc in self._running:
            self._running.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self._running):
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 5.0
        for proc in list(self._running):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self.stop(proc)


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The one line a helper prints (ready..., done...), waiting at most ``timeout``."""
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise RuntimeError(f"helper {proc.args[3:]} said nothing in {timeout:g} s")
    line = proc.stdout.readline().decode()
    if not line:
        raise RuntimeError(f"helper {proc.args[3:]} ended with status {proc.wait()}")
    return line.strip()


def serve(procs: Processes) -> tuple:
    """(listener process, port)."""
    proc = procs.helper("serve")
    port = int(read_line(proc, 30).split()[1])
    procs.ports.add(port)
    return proc, port


# ---------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------


def inet_sockets() -> list:
    return psutil.net_connections("inet")


def socket_census(ours: set = frozenset()) -> tuple:
    """(inet sockets on the machine, of which TIME_WAIT, of which to or from ``ours``)."""
    entries = inet_sockets()
    waiting = [e for e in entries if e.status == psutil.CONN_TIME_WAIT]
    mine = [e for e in waiting if e.laddr.port in ours or (e.raddr and e.raddr.port in ours)]
    return len(entries), len(waiting), len(mine)


def cpu_per_call(call, target: float, min_calls: int = 3, max_calls: int = 500) -> float:
    """Mean process CPU seconds of ``call``, repeated until ``target`` CPU seconds are
    spent (or ``max_calls``, or 4× ``target`` of wall time)."""
    calls = 0
    cpu_start, wall_start = time.process_time(), time.monotonic()
    while True:
        call()
        calls += 1
        cpu = time.process_time() - cpu_start
        if calls >= max_calls:
            break
        if calls >= min_calls and (cpu >= target or time.monotonic() - wall_start > 4 * target):
            break
    return cpu / calls


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_ss() -> None:
    subprocess.run(
        ["ss", "-tunap"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, check=False,
    )  # fmt: skip


def ss_cpu_per_run(target: float, max_runs: int = 200) -> float:
    """CPU of ``ss -tunap`` as a whole process (its own, from RUSAGE_CHILDREN)."""
    runs = 0
    before, wall_start = children_cpu(), time.monotonic()
    while True:
        run_ss()
        runs += 1
        cpu = children_cpu() - before
        enough = cpu >= target or time.monotonic() - wall_start > 4 * target
        if runs >= max_runs or (runs >= 3 and enough):
            break
    return cpu / runs


def original_diff_cpu(target: float, single: bool) -> float:
    """The original histstat's diff of two consecutive polls: ``c not in previous``."""
    previous, current = inet_sockets(), inet_sockets()

    def diff() -> list:
        return [c for c in current if c not in previous]

    return cpu_per_call(diff, target, min_calls=1, max_calls=1 if single else 500)


OPENED_SOURCES: list = []  # closed at the end: the Linux source holds a reader thread


def make_poller(factory) -> Poller:
    source = factory()
    OPENED_SOURCES.append(source)
    return Poller(source, ConnectionTracker(), ProcessCache())


def available_sources() -> dict:
    """name -> factory of the in-process sources that work here."""
    sources = {"psutil": PsutilSource}
    if LinuxSource is None:
        print("note: histstat.source_linux.LinuxSource cannot be imported: linux source skipped")
        return sources
    probe = LinuxSource()
    try:
        probe.snapshot()
    except Exception as exc:  # noqa: BLE001 - any failure means: not measurable here
        print(f"note: LinuxSource does not work here ({exc!r}): linux source skipped")
        return sources
    finally:
        probe.close()
    sources["linux"] = LinuxSource
    return sources


def cli_sources(sources: dict) -> dict:
    """name -> extra arguments for histstat as a process."""
    shown = subprocess.run([*HISTSTAT, "--help"], capture_output=True, text=True, check=False)
    if "--source" not in shown.stdout:
        return {"default": []}
    return {name: ["--source", name] for name in sources}


# ---------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------


def pairs_per_helper() -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return PAIRS_PER_HELPER
    return max(1, min(PAIRS_PER_HELPER, (hard - 64) // 2))


def hold_more(procs: Processes, holders: list, pairs: int) -> None:
    """Start holders in parallel until ``pairs`` connections are held in all."""
    missing = pairs - sum(held for _, held in holders)
    started = []
    while missing > 0:
        chunk = min(pairs_per_helper(), missing)
        started.append((procs.helper("hold", chunk), chunk))
        missing -= chunk
    for proc, chunk in started:
        procs.ports.add(int(read_line(proc, 120).split()[1]))
        holders.append((proc, chunk))


def steady(procs: Processes, sizes: list, sources: dict, target: float, holders: list) -> dict:
    results: dict = {}
    for size in sizes:
        hold_more(procs, holders, size // 2)
        column = results[size] = {"sockets": socket_census()[0]}
        print(f"steady {size:,} sockets: {column['sockets']:,} inet sockets on the machine")
        for name, factory in sources.items():
            poller = make_poller(factory)
            poller.poll()  # the first poll reads everything: excluded
            column[f"poll_{name}"] = cpu_per_call(poller.poll, target)
        column["psutil"] = cpu_per_call(inet_sockets, target)
        if shutil.which("ss"):
            column["ss"] = ss_cpu_per_run(target)
        column["listdiff"] = original_diff_cpu(target, single=size >= 10000)
    return results


def churn(procs: Processes, sources: dict, polls: int, holders: list) -> dict:
    rate, hold, interval = 100.0, 1.0, 1.0
    server, port = serve(procs)
    client = procs.helper("churn", port, rate, hold, 600)
    time.sleep(hold + 0.5)  # until as many close as open each second
    result: dict = {"sockets": socket_census()[0], "held": 2 * sum(h for _, h in holders)}
    print(f"churn: {result['sockets']:,} inet sockets on the machine")

    def spaced(call) -> float:
        cpu = 0.0
        for _ in range(polls):
            time.sleep(interval)
            start = time.process_time()
            call()
            cpu += time.process_time() - start
        return cpu / polls

    for name, factory in sources.items():
        poller = make_poller(factory)
        poller.poll()
        rows: list = []
        result[f"poll_{name}"] = spaced(lambda p=poller, r=rows: r.append(len(p.poll())))
        result[f"rows_{name}"] = sum(rows) / len(rows)
    result["psutil"] = spaced(inet_sockets)
    if shutil.which("ss"):
        result["ss"] = 0.0
        for _ in range(polls):
            time.sleep(interval)
            before = children_cpu()
            run_ss()
            result["ss"] += (children_cpu() - before) / polls
    procs.stop(client)
    procs.stop(server)
    return result


def wait_until_quiet(ours: set, limit: float) -> tuple:
    """Wait (at most ``limit`` s) until no TIME_WAIT socket of earlier workloads is left
    (there should be none: they close with RST). Other programs' sockets stay counted."""
    deadline = time.monotonic() + limit
    while True:
        census = socket_census(ours)
        if census[2] == 0 or time.monotonic() >= deadline:
            return census
        time.sleep(0.5)


def read_rows(path: str) -> list:
    rows = []
    with open(path, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            with contextlib.suppress(ValueError):
                rows.append(json.loads(line))
    return rows


def start_histstat(procs: Processes, args: list, out: str, err: str) -> subprocess.Popen:
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        return procs.start([*HISTSTAT, *args], stdin=subprocess.DEVNULL, stdout=stdout,
                           stderr=stderr)  # fmt: skip


def fail_if_ended(proc: subprocess.Popen, err: str) -> None:
    if proc.poll() is not None:
        with open(err, encoding="utf-8", errors="replace") as text:
            raise RuntimeError(f"histstat ended early ({proc.returncode}): {text.read()[-2000:]}")


def catch(procs: Processes, source_args: list, count: int, tmp: str) -> dict:
    hold, gap = 0.05, 0.02
    sockets, time_wait, _ = socket_census()
    server, port = serve(procs)
    out, err = os.path.join(tmp, "catch.ndjson"), os.path.join(tmp, "catch.err")
    histstat_proc = start_histstat(procs, ["-j", "-i", "0.02", *source_args], out, err)
    try:
        deadline = time.monotonic() + 30
        while not any(r.get("lport") == port and r.get("status") == "LISTEN"
                      for r in read_rows(out)):  # fmt: skip
            fail_if_ended(histstat_proc, err)
            if time.monotonic() > deadline:
                raise RuntimeError("histstat did not show the listener within 30 s")
            time.sleep(0.05)
        watched = psutil.Process(histstat_proc.pid)
        cpu_start, wall_start = sum(watched.cpu_times()[:2]), time.monotonic()
        client = procs.helper("catch", port, count, hold, gap)
        report = json.loads(read_line(client, count * (hold + gap) * 3 + 30))
        cpu = sum(watched.cpu_times()[:2]) - cpu_start
        wall = time.monotonic() - wall_start
        procs.stop(client)
        time.sleep(0.5)  # rows of the last polls reach the file
        fail_if_ended(histstat_proc, err)
    finally:
        procs.stop(histstat_proc)
        procs.stop(server)
    client_ports = set(report["ports"])
    seen, attributed = set(), set()
    for row in read_rows(out):
        lport, rport = row.get("lport"), row.get("rport")
        if lport in client_ports and rport == port:
            seen.add(lport)
            if row.get("pid") == report["pid"]:
                attributed.add(lport)
        elif lport == port and rport in client_ports:
            seen.add(rport)
    return {
        "count": len(client_ports),
        "seen": len(seen) / len(client_ports),
        "attributed": len(attributed) / len(client_ports),
        "cpu": cpu / wall,
        "sockets": sockets,
        "time_wait": time_wait,
    }


def memory(procs: Processes, source_args: list, count: int, limit: float, tmp: str) -> dict:
    server, port = serve(procs)
    err = os.path.join(tmp, "memory.err")
    histstat_proc = start_histstat(
        procs, ["-q", "-l", os.devnull, "-i", "0.05", *source_args], os.devnull, err
    )
    try:
        time.sleep(3.0)  # imported, and polling for a while
        fail_if_ended(histstat_proc, err)
        watched = psutil.Process(histstat_proc.pid)
        before = peak = watched.memory_info().rss
        flood = procs.helper("flood", port, count, limit, 256)
        with selectors.DefaultSelector() as selector:
            selector.register(flood.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + limit + 60
            while not selector.select(0.25):
                peak = max(peak, watched.memory_info().rss)
                if time.monotonic() > deadline:
                    raise RuntimeError("the churning client did not finish")
        _, churned, took, failed = read_line(flood, 1).split()
        procs.stop(flood)
        time.sleep(2.0)  # histstat sees them go
        fail_if_ended(histstat_proc, err)
        after = watched.memory_info().rss
        peak = max(peak, after)
    finally:
        procs.stop(histstat_proc)
        procs.stop(server)
    return {
        "churned": int(churned),
        "seconds": float(took),
        "failed": int(failed),
        "before": before,
        "after": after,
        "peak": peak,
    }


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def ms(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    value = seconds * 1000
    return f"{value:.3g}" if value < 1000 else f"{value:,.0f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or not b:
        return "n/a"
    return f"{a / b:.2f}×"


def table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def steady_table(results: dict, sources: list) -> str:
    sizes = list(results)
    largest = 10000 in results
    header = ["per-poll CPU (ms)", *(f"{s:,} sockets" for s in sizes)]
    header.append("target at 10,000" if largest else "target (at 10,000)")

    def row(label: str, key, target: str = "") -> list:
        return [label, *(key(results[s]) for s in sizes), target]

    rows = [row("inet sockets on the machine", lambda c: f"{c['sockets']:,}")]
    for name in sources:
        rows.append(row(f"histstat poll, {name} source", lambda c, n=name: ms(c[f"poll_{n}"])))
    rows.append(row("psutil.net_connections('inet')", lambda c: ms(c["psutil"])))
    rows.append(row("ss -tunap (process)", lambda c: ms(c.get("ss"))))
    rows.append(row("original list diff (`c not in previous`)", lambda c: ms(c["listdiff"])))
    for name in sources:
        rows.append(row(f"histstat[{name}] / net_connections",
                        lambda c, n=name: ratio(c[f"poll_{n}"], c["psutil"]),
                        TARGETS["steady_vs_psutil"]))  # fmt: skip
        rows.append(row(f"histstat[{name}] / ss -tunap",
                        lambda c, n=name: ratio(c[f"poll_{n}"], c.get("ss")),
                        TARGETS["steady_vs_ss"]))  # fmt: skip
    return table(header, rows)


def churn_table(result: dict, sources: list) -> str:
    rows = []
    for name in sources:
        poll = result[f"poll_{name}"]
        rows.append([
            f"histstat poll, {name} source ({result[f'rows_{name}']:.0f} rows a poll)",
            ms(poll), ratio(poll, result["psutil"]), ratio(poll, result.get("ss")),
            TARGETS["churn_vs_ss"],
        ])  # fmt: skip
    rows.append(["psutil.net_connections('inet')", ms(result["psutil"]), "", "", ""])
    rows.append(["ss -tunap (process)", ms(result.get("ss")), "", "", ""])
    header = ["per-poll CPU (ms)", "ms", "/ net_connections", "/ ss -tunap", "target (vs ss)"]
    return table(header, rows)


def catch_table(results: dict) -> str:
    rows = [
        [
            name, r["count"], f"{r['sockets']:,} ({r['time_wait']} TIME_WAIT)",
            f"{r['seen']:.1%}", f"{r['attributed']:.1%}", f"{r['cpu']:.1%}",
        ]
        for name, r in results.items()
    ]  # fmt: skip
    rows.append(["target", "", "", TARGETS["catch_seen"], TARGETS["catch_attributed"],
                 TARGETS["catch_cpu"]])  # fmt: skip
    header = ["histstat -j -i 0.02, source", "connections", "sockets at start", "seen",
              "attributed to client pid", "CPU (% of one core)"]  # fmt: skip
    return table(header, rows)


def memory_table(results: dict) -> str:
    rows = [
        [
            name, f"{r['churned']:,}", f"{r['seconds']:.1f}",
            f"{r['before'] / MIB:.1f}", f"{r['after'] / MIB:.1f}", f"{r['peak'] / MIB:.1f}",
            f"{(r['after'] - r['before']) / MIB:+.1f}",
        ]
        for name, r in results.items()
    ]  # fmt: skip
    rows.append(["target (100,000 connections)", "", "", "", "", "", TARGETS["memory"]])
    header = ["histstat -q -l /dev/null -i 0.05, source", "connections churned", "seconds",
              "RSS before (MiB)", "RSS after", "RSS peak", "growth"]  # fmt: skip
    return table(header, rows)


def machine() -> str:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    ss_version = "not installed"
    if shutil.which("ss"):
        shown = subprocess.run(["ss", "-V"], capture_output=True, text=True, check=False)
        ss_version = shown.stdout.strip().split(",")[-1].strip() or "?"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return (
        f"- machine: {os.cpu_count()} cores ({usable} usable), {platform.system()} "
        f"{platform.release()} {platform.machine()}\n"
        f"- Python {platform.python_version()}, psutil {psutil.__version__}, "
        f"histstat {histstat.__version__}, ss {ss_version}\n"
        f"- RLIMIT_NOFILE {soft}/{hard} ({pairs_per_helper()} connections per holding process)"
    )


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def _terminated(signum, frame) -> None:
    raise KeyboardInterrupt


def bench(quick: bool, procs: Processes, tmp: str) -> None:
    sizes = [100, 1000] if quick else [100, 1000, 10000]
    target = 0.3 if quick else 1.0  # CPU seconds spent on each measurement
    catch_count = 50 if quick else 200
    memory_count, memory_limit = (10000, 30.0) if quick else (100000, 120.0)
    churn_polls = 3 if quick else 6

    print(f"# histstat benchmark{' (--quick)' if quick else ''}\n")
    print(machine())
    sources = available_sources()
    in_cli = cli_sources(sources)
    baseline = socket_census()[0]
    as_process = [" ".join(args) or "(no --source option)" for args in in_cli.values()]
    print(f"- in-process sources: {', '.join(sources)}; histstat as a process: "
          + ", ".join(as_process))  # fmt: skip
    print(f"- inet sockets on the machine before the run: {baseline:,}\n", flush=True)

    holders: list = []
    steady_results = steady(procs, sizes, sources, target, holders)
    churn_result = churn(procs, sources, churn_polls, holders)
    for proc, _ in holders:
        procs.stop(proc)
    holders.clear()

    catch_results, memory_results = {}, {}
    for name, args in in_cli.items():
        sockets, time_wait, mine = wait_until_quiet(procs.ports, 65)
        print(f"catch, {name}: {sockets:,} inet sockets ({time_wait} TIME_WAIT, {mine} "
              "from this benchmark)", flush=True)  # fmt: skip
        catch_results[name] = catch(procs, args, catch_count, tmp)
    for name, args in in_cli.items():
        wait_until_quiet(procs.ports, 65)
        print(f"memory, {name}: churning up to {memory_count:,} connections", flush=True)
        memory_results[name] = memory(procs, args, memory_count, memory_limit, tmp)

    names = list(sources)
    print("\n## Steady: sockets held open, no churn\n")
    print(steady_table(steady_results, names))
    print(f"\n## Churn: {churn_result['held']:,} sockets held, plus 100 connections a "
          "second (each held 1 s), one poll a second\n")  # fmt: skip
    print(f"inet sockets on the machine: {churn_result['sockets']:,}\n")
    print(churn_table(churn_result, names))
    print(f"\n## Catch: {catch_count} connections, each held 50 ms, 20 ms apart\n")
    print(catch_table(catch_results))
    crowded = max(r["sockets"] for r in catch_results.values())
    if crowded > 500:
        print(f"\nThe machine was not quiet: up to {crowded:,} inet sockets at the start "
              "(other programs'), which slows every poll; rerun on a quiet machine.")  # fmt: skip
    print(f"\n## Memory: RSS around {memory_count:,} connections churned "
          f"(at most {memory_limit:.0f} s)\n")  # fmt: skip
    print(memory_table(memory_results))
    print(
        "\nCPU is process CPU time: in-process (time.process_time) for histstat's poll "
        "(Poller: source, tracker, enrichment; no output), net_connections and the list "
        "diff; RUSAGE_CHILDREN for ss (output to /dev/null); /proc utime+stime over the "
        "wall time for histstat as a process. Sockets close with RST (no TIME_WAIT)."
    )
    sockets, time_wait, mine = socket_census(procs.ports)
    print(f"\nAt the end: {sockets:,} inet sockets on the machine, {time_wait:,} in TIME_WAIT, "
          f"{mine} of them from this benchmark.")  # fmt: skip


def main(argv: list | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_helper"]:
        helper_main(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced sizes, under ~2 min")
    options = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)
    procs = Processes()
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="histstat-bench-") as tmp:
            bench(options.quick, procs, tmp)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping helper processes", file=sys.stderr)
        return 130
    finally:
        for source in OPENED_SOURCES:
            source.close()
        procs.stop_all()
    print(f"\n(benchmark took {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

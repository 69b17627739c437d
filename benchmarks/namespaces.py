"""Network namespaces: the cost of discovering them per call, of opening a socket inside
each, of one sock_diag dump per namespace, and of a whole Linux source snapshot with and
without them.

Run as root from the repository root, with the Python of a venv where histstat is
installed:

    python benchmarks/namespaces.py     # 300 processes, 1,000 connections, 50 namespaces
    python benchmarks/namespaces.py --processes 1000 --namespaces 200

Workloads, each set up by this script and ended at the end (also on an error or Ctrl-C):

* The machine's processes, topped up with idle ``cat`` processes to ``--processes``, in
  histstat's own namespace, and ``--pairs`` loopback connections (both ends) held by
  this process there, so that the own namespace's dump has a table to walk.
* The same plus ``--namespaces`` idle namespaces, each held by one ``unshare --net cat``
  (empty: loopback down, no sockets).

Figures are CPU time of this process per call (process time, all its threads, over
``--calls`` calls, the first call excluded), side by side with a reference measured in
the same run: for discovery, reading every process's start time and ns link each call
(what discovery without memory would do); for the dumps, the dump of histstat's own
namespace; for ``LinuxSource.snapshot()`` (discovery, registry, dumps of every namespace,
owners lookup, Connections, as a poll takes it), the same source's snapshot before the
idle namespaces were started.

The dumps use the Linux source's ``SockDiag`` on sockets made inside each namespace (its
``sock`` seam): tcp and tcp6 from one walk, then udp and udp6, as a poll does.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from histstat.sources.linux import _TABLES, _TCP_STATES, LinuxSource
from histstat.sources.namespaces import (
    NamespaceDiscovery,
    NamespaceSockets,
    namespace_inode,
    process_start_time,
)
from histstat.sources.sock_diag import SockDiag

DEADLINE = 30.0  # seconds for the helpers to be ready
ROUNDS = 5  # turns of the snapshots measured side by side (their medians)


def pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def sockets_in_use() -> str:
    """What this namespace's TCP and UDP counters say (/proc/net/sockstat)."""
    found = []
    for name in ("sockstat", "sockstat6"):
        with contextlib.suppress(OSError), open(f"/proc/net/{name}") as handle:
            for line in handle:
                fields = line.split()
                if fields and fields[0] in ("TCP:", "UDP:", "TCP6:", "UDP6:"):
                    counts = dict(zip(fields[1::2], fields[2::2]))
                    found.append(f"{fields[0]} {counts['inuse']}")
                    if "tw" in counts:
                        found.append(f"TIME_WAIT {counts['tw']}")
    return ", ".join(found)


def machine(label: str) -> str:
    return (
        f"- {label}: {os.cpu_count()} cores, {platform.system()} {platform.release()} "
        f"{platform.machine()}, Python {platform.python_version()}; {len(pids())} processes, "
        f"sockets in this namespace: {sockets_in_use()}; "
        f"{len(NamespaceDiscovery().scan())} network namespaces"
    )


def full_read() -> dict[int, int]:
    """The reference: every process's start time and ns link, read afresh."""
    held: dict[int, int] = {}
    for pid in pids():
        if process_start_time(pid) is None:
            continue
        with contextlib.suppress(PermissionError):
            inode = namespace_inode(pid)
            if inode is not None:
                held.setdefault(inode, pid)
    return held


def socket_counts(pid: int) -> bytes:
    """A namespace's own socket counters (no walk of the kernel's socket tables): what
    could tell an empty namespace, whose dumps would find nothing, without dumping it."""
    data = b""
    for name in ("sockstat", "sockstat6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{name}", "rb") as handle:
            data += handle.read()
    return data


def hold_pairs(count: int, held: list[socket.socket]) -> None:
    """``count`` loopback connections, both ends kept in ``held``."""
    if not count:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * count + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    server = socket.socket()
    held.append(server)
    server.bind(("127.0.0.1", 0))
    server.listen(128)
    for _ in range(count):
        held.append(socket.create_connection(server.getsockname()))
        held.append(server.accept()[0])


def per_call(work: Callable[[], object], calls: int) -> float:
    """CPU microseconds per call, the first (warming) call excluded."""
    work()
    started = time.process_time()
    for _ in range(calls):
        work()
    return (time.process_time() - started) / calls * 1e6


def start_helpers(argv: list[str], count: int, helpers: list[subprocess.Popen]) -> None:
    for _ in range(count):
        helpers.append(subprocess.Popen(argv, stdin=subprocess.PIPE))


def wait_for_namespaces(helpers: list[subprocess.Popen], own: int) -> None:
    deadline = time.monotonic() + DEADLINE
    for helper in helpers:
        while namespace_inode(helper.pid) in (own, None):
            if time.monotonic() > deadline:
                raise SystemExit("the unshare helpers did not make their namespaces in time")
            time.sleep(0.01)


def dump_all(diag: SockDiag) -> int:
    """The four tables as a poll reads them: both TCP ones from one walk, then UDP."""
    both = {socket.AF_INET: ("tcp", {}), socket.AF_INET6: ("tcp6", {})}
    rows = sum(len(found) for found in diag.dump_tcp(both, _TCP_STATES).values())
    for proto, family, protocol, stateful in _TABLES:
        if not stateful:
            rows += len(diag.dump(proto, family, protocol, {}, {}))
    return rows


def diag_for(sock: socket.socket) -> SockDiag:
    """A SockDiag that owns a socket made inside another namespace: a dup, as the
    registry keeps closing its own."""
    return SockDiag(sock=sock.dup())


def discovery_rows(label: str, calls: int) -> list[str]:
    discovery = NamespaceDiscovery()
    started = time.process_time()
    discovery.scan()
    first = (time.process_time() - started) * 1e6
    reference = per_call(full_read, calls)
    steady = per_call(discovery.scan, calls)
    return [
        f"| {label} | discovery, first call | {first:,.0f} | {first / reference:.2f} |",
        f"| {label} | discovery, nothing changed | {steady:,.0f} | {steady / reference:.2f} |",
        f"| {label} | reference: every process read | {reference:,.0f} | 1.00 |",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=300)
    parser.add_argument("--namespaces", type=int, default=50)
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("namespaces.py: needs root (other namespaces are closed to others)", file=sys.stderr)
        return 1
    own = NamespaceDiscovery().own
    print(machine("before"))
    helpers: list[subprocess.Popen] = []
    rows = ["| workload | measure | µs CPU per call | ratio |", "|---|---|---:|---:|"]
    source = LinuxSource()
    pairs: list[socket.socket] = []
    try:
        hold_pairs(args.pairs, pairs)
        start_helpers(["cat"], max(0, args.processes - len(pids())), helpers)
        label = f"{len(pids())} processes"
        rows += discovery_rows(label, args.calls)
        source.snapshot()  # joins the broadcasts; then the reference
        sockets = len(source.snapshot())
        whole = per_call(source.snapshot, args.calls)
        rows.append(
            f"| {label}, {len(NamespaceDiscovery().scan())} namespace(s) | `LinuxSource.snapshot()`"
            f" ({sockets} sockets, reference) | {whole:,.0f} | 1.00 |"
        )
        namespaced: list[subprocess.Popen] = []
        start_helpers(["unshare", "--net", "cat"], args.namespaces, namespaced)
        helpers += namespaced
        wait_for_namespaces(namespaced, own)
        label = f"{len(pids())} processes, {args.namespaces} idle namespaces"
        rows += discovery_rows(label, args.calls)
        started = time.process_time()
        source.snapshot()
        first = (time.process_time() - started) * 1e6
        read = len(source.namespaces)
        rows.append(
            f"| {label} | `LinuxSource.snapshot()` that finds them ({read} entered, each a dump"
            f" and a broadcast socket) | {first:,.0f} | {first / whole:.2f} |"
        )
        # The machine's other work changes the own namespace's table as this runs: a
        # source that reads histstat's own namespace alone, measured in turns with the
        # whole one, is the reference of the same moment.
        own_only = LinuxSource(namespaces=False)
        try:
            own_only.snapshot()
            steadies, alones = [], []
            for _ in range(ROUNDS):
                steadies.append(per_call(source.snapshot, max(1, args.calls // ROUNDS)))
                alones.append(per_call(own_only.snapshot, max(1, args.calls // ROUNDS)))
            sockets = len(own_only.snapshot())
        finally:
            own_only.close()
        steady, alone = statistics.median(steadies), statistics.median(alones)
        rows.append(
            f"| {label} | `LinuxSource.snapshot()`, nothing changed | {steady:,.0f} "
            f"| {steady / whole:.2f} |"
        )
        rows.append(
            f"| {label} | the same, in turns with: own namespace alone ({sockets} sockets, "
            f"reference) | {steady:,.0f} against {alone:,.0f} | {steady / alone:.2f} |"
        )
        with NamespaceSockets() as registry:
            started = time.process_time()
            opened = registry.update().opened
            opening = (time.process_time() - started) * 1e6 / max(1, len(opened))
            steady = per_call(registry.update, args.calls)
            rows.append(f"| {label} | open one namespace's socket | {opening:,.0f} | |")
            rows.append(f"| {label} | registry update, nothing changed | {steady:,.0f} | |")
            own_diag = SockDiag()
            try:
                reference = per_call(lambda: dump_all(own_diag), args.calls)
                own_rows = dump_all(own_diag)
            finally:
                own_diag.close()
            diags = [diag_for(sock) for sock in registry.sockets.values()]
            each = per_call(lambda: [dump_all(diag) for diag in diags], max(1, args.calls // 10))
            rows.append(
                f"| {label} | dump of histstat's own namespace ({own_rows} sockets) "
                f"| {reference:,.0f} | 1.00 |"
            )
            rows.append(
                f"| {label} | dumps of all {len(diags)} namespaces | {each:,.0f} "
                f"| {each / reference:.2f} |"
            )
            rows.append(
                f"| {label} | dump of one idle namespace | {each / max(1, len(diags)):,.0f} "
                f"| {each / max(1, len(diags)) / reference:.2f} |"
            )
            held = list(registry.discovery.scan().values())
            counting = per_call(lambda: [socket_counts(pid) for pid in held], args.calls // 10)
            one = counting / len(held)
            rows.append(
                f"| {label} | socket counts of one namespace (/proc/PID/net/sockstat, "
                f"sockstat6) | {one:,.0f} | {one / reference:.2f} |"
            )
        print(machine("during"))
    finally:
        source.close()
        for sock in pairs:
            sock.close()
        for helper in helpers:
            with contextlib.suppress(OSError):
                helper.stdin.close()
        for helper in helpers:
            try:
                helper.wait(5)
            except subprocess.TimeoutExpired:
                helper.kill()
                helper.wait()
    print()
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

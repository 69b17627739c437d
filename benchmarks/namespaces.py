"""Network namespaces: the cost of discovering them per call, of opening a socket inside
each, of one sock_diag dump per namespace, and of a whole Linux source snapshot with and
without them.

Run as root from the repository root, with the Python of a venv where histstat is
installed:

    python benchmarks/namespaces.py                  # 300 processes, 50 namespaces
    python benchmarks/namespaces.py --processes 1000 --namespaces 200

Workloads, each set up by this script and ended at the end (also on an error or Ctrl-C):

* The machine's processes, topped up with idle ``cat`` processes to ``--processes``, in
  histstat's own namespace.
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
``sock`` seam): tcp, tcp6, udp and udp6, as a poll does.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import socket
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


def pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def sockets_in_use() -> int:
    with open("/proc/net/sockstat") as handle:
        for line in handle:
            if line.startswith("sockets:"):
                return int(line.split()[2])
    return 0


def machine(label: str) -> str:
    return (
        f"- {label}: {os.cpu_count()} cores, {platform.system()} {platform.release()} "
        f"{platform.machine()}, Python {platform.python_version()}; {len(pids())} processes, "
        f"{sockets_in_use()} sockets in use (/proc/net/sockstat, this namespace), "
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
    rows = 0
    for proto, family, protocol, stateful in _TABLES:
        rows += len(diag.dump(proto, family, protocol, _TCP_STATES if stateful else {}, {}))
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
    try:
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
        steady = per_call(source.snapshot, args.calls)
        rows.append(
            f"| {label} | `LinuxSource.snapshot()`, nothing changed | {steady:,.0f} "
            f"| {steady / whole:.2f} |"
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

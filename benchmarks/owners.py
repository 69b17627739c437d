"""What finding every owner of every socket costs the Linux source, per poll.

Run from the repository root, with the Python of a venv where histstat is installed
(as root, so that every process's descriptors can be read, as histstat reads them):

    python benchmarks/owners.py                 # ~300 processes, 2,000 sockets: ~1 min
    python benchmarks/owners.py --processes 1000 --pairs 5000

It adds processes to the machine until it holds ``--processes`` (``sleep`` children,
each with a dozen descriptors; eight of them share one listening socket, as a pre-fork
server's workers do) and a helper holding ``--pairs`` loopback connections, then measures
in the same run, as process CPU time per poll:

* ``SocketOwners.owners`` of this checkout (every holder), with its clock moved by the
  interval at each poll, so each poll does the sweep's share of an ``-i`` run;
* the same class as it was at ``--reference`` (one owner per socket, a git commit of this
  repository; default: the commit before every-owner work), the ratio's reference, on
  the same moved clock when it has one (a later commit's, with a sweep);
* reading every process's descriptors at every poll (what psutil does), for scale;
* the Linux source's whole snapshot (table dump and owners);

first steady (the same table every poll, and nothing changes), then with churn: before
each poll the helper opens 10 new connections and 2 new processes start (and the oldest 2
added ones end), and the table is read again (outside the timed part for the owner rows;
other programs' new sockets count there too). The machine's process
and socket counts are printed: other programs count too. Every child ends at exit.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import time
import types
from collections import deque

import psutil

from histstat.sources.linux import LinuxSource
from histstat.sources.owners import SocketOwners

REFERENCE = "0b92bf0"  # SocketOwners moved to its own module, one owner per socket
LOOPBACK = "127.0.0.1"

HOLDER = """
import socket, struct, sys
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(1024)
held = []
def connect(count):
    for _ in range(count):
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        for end in (client, accepted):
            end.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            held.append(end)
connect(int(sys.argv[1]))
print("ready", flush=True)
for line in sys.stdin:
    connect(int(line))
    print("ok", flush=True)
"""


def reference_class(commit: str) -> type | None:
    """SocketOwners as it was at ``commit``, or None when git cannot show it."""
    for path in ("histstat/sources/owners.py", "histstat/sources/linux.py"):
        result = subprocess.run(["git", "show", f"{commit}:{path}"], capture_output=True)
        if result.returncode == 0 and b"class SocketOwners" in result.stdout:
            module = types.ModuleType(f"reference_owners_{commit}")
            exec(compile(result.stdout, f"{commit}:{path}", "exec"), module.__dict__)
            return module.SocketOwners
    return None


class SteppedOwners(SocketOwners):
    """This checkout's SocketOwners on a clock that each poll moves by ``interval``."""

    def __init__(self, interval: float) -> None:
        super().__init__()
        self.interval = interval
        self.clock = 0.0

        self.reads = 0  # descriptor tables read after the first poll
        self.polls = 0

    def owners(self, inodes):
        found = super().owners(inodes)
        self.polls += 1
        return found

    def now(self) -> float:
        self.clock += self.interval
        return self.clock

    def socket_inodes(self, pid: int):
        self.reads += self.polls > 0
        return super().socket_inodes(pid)


def stepped(owners_class: type, interval: float) -> type:
    """``owners_class`` on a clock that each poll moves by ``interval``, when it has a
    clock (a reference with a sweep; the one-owner lookup has none)."""
    if not hasattr(owners_class, "now"):
        return owners_class

    class Stepped(owners_class):  # type: ignore[valid-type,misc]
        def __init__(self) -> None:
            super().__init__()
            self.clock = 0.0

        def now(self) -> float:
            self.clock += interval
            return self.clock

    return Stepped


class EveryProcessEveryPoll(SocketOwners):
    """Reads every process's descriptors at every poll: the cost of not being incremental."""

    def owners(self, inodes):
        current = set(inodes)
        found: dict = {}
        for pid in self.pids() or ():
            for inode in (self.socket_inodes(pid) or set()) & current:
                found.setdefault(inode, []).append(pid)
        return found


class Children:
    """Processes this benchmark started, ended at exit."""

    def __init__(self) -> None:
        self.procs: list = []
        self.added: deque = deque()

    def start(self, argv: list, **options) -> subprocess.Popen:
        proc = subprocess.Popen(argv, **options)
        self.procs.append(proc)
        return proc

    def add_sleepers(self, count: int, pass_fds: tuple) -> None:
        for _ in range(count):
            proc = self.start(["sleep", "3600"], stdin=subprocess.DEVNULL, pass_fds=pass_fds)
            self.added.append(proc)

    def end_oldest(self, count: int) -> None:
        for _ in range(min(count, len(self.added))):
            proc = self.added.popleft()
            proc.kill()
            proc.wait()

    def end_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def cpu_per_poll(poll, polls: int, between=None) -> float:
    """Process CPU seconds per call of ``poll`` (after one untimed call); ``between`` runs
    untimed before each."""
    poll()
    total = 0.0
    for _ in range(polls):
        if between is not None:
            between()
        start = time.process_time()
        poll()
        total += time.process_time() - start
    return total / polls


def census() -> tuple:
    processes = sum(1 for name in os.listdir("/proc") if name.isdigit())
    sockets = len(LinuxSource().table())
    return processes, sockets


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=300, help="processes on the machine")
    parser.add_argument("--pairs", type=int, default=1000, help="connections the helper holds")
    parser.add_argument("--interval", type=float, default=1.0, help="histstat's -i")
    parser.add_argument("--polls", type=int, default=40)
    parser.add_argument("--reference", default=REFERENCE, help="git commit to compare with")
    args = parser.parse_args(argv)
    reference = reference_class(args.reference)
    if reference is not None:
        reference = stepped(reference, args.interval)
    children = Children()
    shared = socket.socket()
    pipe_read, pipe_write = os.pipe()
    try:
        shared.bind((LOOPBACK, 0))
        shared.listen(8)
        holder = children.start(
            [sys.executable, "-c", HOLDER, str(args.pairs)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holder.stdout.readline() == "ready\n"
        # A dozen descriptors each (a pipe's two ends duplicated); eight share a listener.
        extra = [os.dup(fd) for fd in (pipe_read, pipe_write) * 4]
        children.add_sleepers(8, (shared.fileno(), *extra))
        before_count = census()[0]
        children.add_sleepers(max(0, args.processes - before_count), tuple(extra))
        for fd in extra:
            os.close(fd)
        processes, sockets = census()
        print("# histstat benchmark: every owner of every socket\n")
        print(f"- machine: {os.cpu_count()} cores, Linux {platform.release()}")
        print(f"- Python {platform.python_version()}, psutil {psutil.__version__}")
        print(f"- euid {os.geteuid()}; {processes} processes, {sockets} inet sockets")
        print(f"- load average at the start: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
        print(f"- reference: SocketOwners at {args.reference}; -i {args.interval:g} s")
        print(f"- {args.polls} polls timed per row; CPU = time.process_time()\n")

        def churn() -> None:
            holder.stdin.write("5\n")  # 5 connections: 10 sockets
            holder.stdin.flush()
            assert holder.stdout.readline() == "ok\n"
            children.end_oldest(2)
            children.add_sleepers(2, ())

        rows = []
        reads: dict = {}
        for label, between in (("steady", None), ("churn", churn)):
            table = LinuxSource().table

            def owner_poll(owners, table=table):
                inodes = [row[6] for row in table()]
                return lambda: owners.owners(inodes)

            measured = {}
            variants = {
                "this checkout (every owner)": SteppedOwners(args.interval),
                f"reference {args.reference} (one owner)": reference() if reference else None,
                "every process every poll": EveryProcessEveryPoll(),
            }
            for name, owners in variants.items():
                if owners is None:
                    continue
                # The table read is outside the timed part: only the owners are timed.
                state = {"poll": owner_poll(owners)}

                def prepare(between=between, owners=owners, state=state):
                    # Steady polls keep the first table, so that other programs' new
                    # sockets (other test suites on the machine) do not count.
                    if between is not None:
                        between()
                        state["poll"] = owner_poll(owners)

                measured[name] = cpu_per_poll(lambda s=state: s["poll"](), args.polls, prepare)
                if isinstance(owners, SteppedOwners):
                    reads[label] = owners.reads / args.polls
            whole = LinuxSource()
            whole.owners = SteppedOwners(args.interval)
            measured["whole Linux snapshot, this checkout"] = cpu_per_poll(
                whole.snapshot, args.polls, between
            )
            rows.append((label, measured))
        base = f"reference {args.reference} (one owner)"
        print(f"| CPU per poll (ms) | steady | churn | share of a core at -i {args.interval:g} |")
        print("|---|---|---|---|")
        for name in rows[0][1]:
            values = [measured[name] for _, measured in rows]
            cells = [f"{1000 * value:.2f}" for value in values]
            share = (
                f"{100 * values[0] / args.interval:.2f}% / {100 * values[1] / args.interval:.2f}%"
            )
            print(f"| {name} | {' | '.join(cells)} | {share} |")
        print(
            "\nDescriptor tables read per poll by this checkout (the first poll, which reads "
            "them all, left out): "
            + ", ".join(f"{label} {count:.1f}" for label, count in reads.items())
        )
        if reference is not None:
            for label, measured in rows:
                ratio = measured["this checkout (every owner)"] / measured[base]
                print(f"\n{label}: this checkout / reference = {ratio:.2f}×", end="")
            print()
        processes, sockets = census()
        print(f"\nAt the end: {processes} processes, {sockets} inet sockets.")
        return 0
    finally:
        children.end_all()
        shared.close()
        os.close(pipe_read)
        os.close(pipe_write)


if __name__ == "__main__":
    sys.exit(main())

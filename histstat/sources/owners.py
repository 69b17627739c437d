"""Which processes hold each socket inode, learnt incrementally from /proc across polls."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator

from histstat.procfs import read_stat
from histstat.shortage import note_shortage


def _process_stat(proc: str, pid: int) -> tuple[int, int] | None:
    """The process's start time (which tells a process from a later one given the same
    pid) and its parent's pid; None when it is gone or a zombie (an exited process its
    parent has not reaped holds no descriptor)."""
    stat = read_stat(pid, proc)
    return None if stat is None or stat.state in (b"Z", b"X") else (stat.start_time, stat.ppid)


class SocketOwners:
    """Every process that holds each socket inode, learnt incrementally across polls.

    A socket may have several holders: a forked child inherits its parent's descriptors
    (a shell's ``exec 3<>/dev/tcp/…`` shared with its background children, a pre-fork
    server's listener), and a descriptor can be passed to any process over a Unix socket.
    Reading every process's descriptors every poll costs what psutil costs, so a poll
    reads only:

    - the list of pids, and the start time of every known holder: a pid reused by
      another process never keeps the old one's sockets;
    - the descriptors of each process that appeared since the previous poll, at that
      poll and the next (a child inherits sockets at fork and may close them at exec);
    - for sockets that no known holder has: the processes that lately got new sockets,
      then every process from the newest pid down, stopping once each has a holder;
    - the parent of a process first found holding a socket, and up while each parent
      holds it (at most ``ANCESTORS``): new processes are read first, and a child shares
      its parent's descriptors, so the parent that opened the socket is found with it
      (other holders that existed before it are left to the sweep);
    - a slice of a sweep through every process, paced so that a whole pass takes about
      ``SWEEP_SECONDS`` whatever the interval: it finds holders that got a socket in
      another way (descriptor passing to a running process) and lets go of copies a
      process closed. A poll with no new socket and no new process reads only this.

    A process's start time is read only when it holds a socket of the table.

    An inode found in no process (a kernel socket, another user's process, one in another
    pid namespace) is looked for on one more poll, in case it was caught between being
    created and its descriptor being installed, then left to the sweep until it leaves
    the table. Every map is keyed by inodes of the socket table or by pids of /proc.
    """

    UNOWNED_LOOKUPS = 2  # full scans that must miss an inode before it is left alone
    RECENT_OWNERS = 64
    UNOWNED_LIMIT = 1 << 16
    SWEEP_SECONDS = 10.0  # a pass of the sweep through every process
    ANCESTORS = 8  # parents read up from the first holder found of a new socket

    def __init__(self, proc: str = "/proc") -> None:
        self.proc = proc
        self._holders: dict[int, set[int]] = {}  # inode → pids
        self._held: dict[int, set[int]] = {}  # pid → inodes of the table it holds
        self._started: dict[int, int] = {}  # pid → start time when its inodes were read
        self._owners: dict[int, tuple[int, ...]] = {}  # inode → holders, likeliest opener first
        self._changed: set[int] = set()  # inodes whose holders changed this poll
        self._misses: dict[int, int] = {}  # inode → full scans that did not find it
        self._recent: dict[int, None] = {}  # pids that got new sockets lately, most recent last
        self._listed: set[int] | None = None  # the pids of the previous poll
        self._young: list[int] = []  # pids new at the previous poll: looked at once more
        self._sweep: list[int] = []  # the pids of the sweep's pass, in order
        self._sweep_at = 0  # the next one's index
        self._sweep_credit = 0.0  # processes the sweep owes, by the time since last poll
        self._last_poll: float | None = None

    def owners(self, inodes: Iterable[int]) -> dict[int, tuple[int, ...]]:
        """inode → every pid holding it, the likeliest opener first (the earliest start
        time, the lowest pid on a tie), for the given socket inodes; 0 and unowned ones
        are left out."""
        current = set(inodes)
        current.discard(0)
        self._forget(current)
        listed = self.pids()
        self._check_holders(listed)
        scanned: set[int] = set()
        if listed is not None:
            self._scan_new_processes(listed, current, scanned)
            self._sweep_some(listed, current, scanned)
        wanted = current.difference(self._holders)
        if wanted:
            wanted = {
                inode for inode in wanted if self._misses.get(inode, 0) < self.UNOWNED_LOOKUPS
            }
        if wanted:
            self._look_for(wanted, listed or [], current, scanned)
        self._order_changed()
        return self._owners

    def _forget(self, current: set[int]) -> None:
        """Drop what left the socket table, which bounds every map by its size."""
        for inode in self._holders.keys() - current:
            for pid in self._holders.pop(inode):
                held = self._held[pid]
                held.discard(inode)
                if not held:
                    del self._held[pid]
                    del self._started[pid]
            self._owners.pop(inode, None)
        if self._misses:
            for inode in self._misses.keys() - current:
                del self._misses[inode]

    def _check_holders(self, listed: list[int] | None) -> None:
        """Drop the holders that ended, or whose pid another process now has."""
        present = None if listed is None else set(listed)
        for pid, started in list(self._started.items()):
            if present is not None and pid not in present:
                self._drop_pid(pid)
            elif self.start_time(pid) != started:
                self._drop_pid(pid)

    def _drop_pid(self, pid: int) -> None:
        self._set_held(pid, None, set())

    def _set_held(self, pid: int, started: int | None, held: set[int]) -> set[int]:
        """Record that ``pid`` holds exactly ``held`` (inodes of the table); the inodes
        it got that it did not hold before are returned."""
        before = self._held.get(pid, set())
        for inode in before - held:
            holders = self._holders[inode]
            holders.discard(pid)
            if not holders:
                del self._holders[inode]
            self._changed.add(inode)
        got = held - before
        for inode in got:
            self._holders.setdefault(inode, set()).add(pid)
            self._changed.add(inode)
            self._misses.pop(inode, None)
        if held and started is not None:
            self._held[pid] = held
            self._started[pid] = started
        else:
            self._held.pop(pid, None)
            self._started.pop(pid, None)
        return got

    def _scan(
        self,
        pid: int,
        current: set[int],
        scanned: set[int],
        shared: set[int] | None = None,
        depth: int = 0,
    ) -> set[int] | None:
        """Read which sockets of the table ``pid`` holds now and record them, then its
        parent's, up while each holds a socket first found in it or its child (the
        ``shared`` inodes of a child read first); the inodes ``pid`` got since it was
        last read, None when it was already read this poll or is gone."""
        if pid in scanned:
            return None
        scanned.add(pid)
        held = self.socket_inodes(pid)
        if held is None:
            return None  # what it held stays as last read; the checks see it end
        held &= current
        if not held and pid not in self._held:
            # Most processes hold none of the table's sockets: their start time is not
            # needed, and reading it would cost more than their descriptors did.
            return held
        stat = self.process_stat(pid)
        if stat is None:
            self._drop_pid(pid)
            return None
        started, parent = stat
        if self._started.get(pid, started) != started:
            self._drop_pid(pid)  # the pid now belongs to another process
        unheld = held.difference(self._holders)
        got = self._set_held(pid, started, held)
        if got:
            self._recent.pop(pid, None)
            self._recent[pid] = None
        # A forked child shares its parent's descriptors, and new processes are read
        # first: the parent that likely opened a socket first found in its child must be
        # read now too, so that the snapshot that first shows the socket names it.
        following = unheld if shared is None else unheld | (shared & held)
        if following and depth < self.ANCESTORS and parent > 0:
            self._scan(parent, current, scanned, following, depth + 1)
        return got

    def _scan_new_processes(self, listed: list[int], current: set[int], scanned: set[int]) -> None:
        """Read the processes that appeared since the previous poll (every process at the
        first poll), and once more those that appeared at the previous poll."""
        first = self._listed is None
        present = set(listed)
        fresh = sorted(present if self._listed is None else present - self._listed, reverse=True)
        again, self._young = self._young, ([] if first else fresh)
        self._listed = present
        for pid in fresh:
            self._scan(pid, current, scanned)
        for pid in again:
            self._scan(pid, current, scanned)

    def _sweep_some(self, listed: list[int], current: set[int], scanned: set[int]) -> None:
        """Read the next processes of the sweep, as many as the time since the previous
        poll is worth (a whole pass per SWEEP_SECONDS, at most a pass per poll)."""
        now = self.now()
        if self._last_poll is None:
            self._last_poll = now  # the first poll read every process already
            return
        elapsed, self._last_poll = max(0.0, now - self._last_poll), now
        owed = self._sweep_credit + len(listed) * elapsed / self.SWEEP_SECONDS
        self._sweep_credit = min(owed, float(len(listed)))
        while self._sweep_credit >= 1.0:
            if self._sweep_at >= len(self._sweep):
                self._sweep, self._sweep_at = sorted(listed), 0
                if not self._sweep:
                    break
            pid = self._sweep[self._sweep_at]
            self._sweep_at += 1
            self._sweep_credit -= 1.0
            self._scan(pid, current, scanned)

    def _look_for(
        self, wanted: set[int], listed: list[int], current: set[int], scanned: set[int]
    ) -> None:
        """Find a first holder of each ``wanted`` inode, likeliest processes first,
        stopping once all are found."""
        for pid in self._candidates(listed):
            before = self._held.get(pid, set())
            got = self._scan(pid, current, scanned)
            if got is None:
                continue
            # A descriptor number reused for another socket: what the process no longer
            # holds and nobody else is known to must be found again, maybe in a process
            # that shares it.
            lost = before.difference(self._held.get(pid, ())).difference(self._holders)
            wanted.update(i for i in lost if self._misses.get(i, 0) < self.UNOWNED_LOOKUPS)
            wanted -= got
            if not wanted:
                break
        while len(self._recent) > self.RECENT_OWNERS:
            del self._recent[next(iter(self._recent))]
        for inode in wanted:
            self._misses[inode] = self._misses.get(inode, 0) + 1
        while len(self._misses) > self.UNOWNED_LIMIT:
            del self._misses[next(iter(self._misses))]

    def _candidates(self, listed: list[int]) -> Iterator[int]:
        """Pids in the order most likely to own a new socket: lately active owners, then
        every process from the newest pid down."""
        yield from reversed(list(self._recent))
        yield from sorted(listed, reverse=True)

    def _order_changed(self) -> None:
        """Order the holders of the inodes whose holders changed: the earliest start
        time first (the likeliest opener: a child inherits, a receiver is passed to),
        the lowest pid on a tie."""
        started = self._started
        for inode in self._changed:
            holders = self._holders.get(inode)
            if holders:
                self._owners[inode] = tuple(sorted(holders, key=lambda pid: (started[pid], pid)))
            else:
                self._owners.pop(inode, None)
        self._changed.clear()

    # The /proc reads, one method each so tests can count or replace them.
    def pids(self) -> list[int] | None:
        """The pids in /proc; None when it cannot be listed."""
        try:
            names = os.listdir(self.proc)
        except OSError as exc:
            note_shortage(exc)
            return None
        return [int(name) for name in names if name.isdigit()]

    def now(self) -> float:
        return time.monotonic()

    def start_time(self, pid: int) -> int | None:
        stat = _process_stat(self.proc, pid)
        return None if stat is None else stat[0]

    def process_stat(self, pid: int) -> tuple[int, int] | None:
        """(start time, parent's pid); None when it is gone or a zombie."""
        return _process_stat(self.proc, pid)

    def socket_inodes(self, pid: int) -> set[int] | None:
        """The inodes of the sockets among the process's descriptors; None when they
        cannot be read (it is gone, denies access, or no descriptor was left)."""
        held: set[int] = set()
        try:
            directory = os.open(f"{self.proc}/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            note_shortage(exc)  # no descriptor left: what it holds stays as last read
            return None
        try:
            for name in os.listdir(directory):
                try:
                    target = os.readlink(name, dir_fd=directory)
                except OSError:  # closed meanwhile
                    continue
                if target.startswith("socket:["):
                    held.add(int(target[8:-1]))
        except OSError as exc:  # the process ended while its descriptors were listed
            note_shortage(exc)  # (or listing them needed a descriptor none was left for)
        finally:
            os.close(directory)
        return held

"""Which processes hold each socket inode, learnt incrementally from /proc across polls."""

from __future__ import annotations

import os
from collections.abc import Iterable

from histstat.shortage import note_shortage


def _start_time(proc: str, pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22),
    which tells a process from a later one given the same pid; None when it is gone."""
    try:
        # os.open and one read: this runs for every owning process every poll, and a
        # file object costs twice as much.
        fd = os.open(f"{proc}/{pid}/stat", os.O_RDONLY)
        try:
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
        # The command name (field 2) may hold spaces and parentheses; fields after its
        # closing parenthesis start at field 3.
        return int(data[data.rindex(b")") + 2 :].split(None, 20)[19])
    except OSError as exc:
        note_shortage(exc)  # no descriptor left: the process looks gone
        return None
    except (ValueError, IndexError):
        return None


class SocketOwners:
    """Which process holds each socket inode, learnt incrementally across polls.

    A poll whose inodes are all known reads no /proc/PID/fd at all; new inodes are looked
    for first in the processes that lately owned sockets, then from the newest pid down,
    stopping once all are found. An inode found in no process (a kernel socket, another
    user's process, one in another pid namespace) is looked for on one more poll, in case
    it was caught between being created and its descriptor being installed, then left
    alone until it leaves the table. Known owners are checked every poll by start time, so
    a pid reused by another process never keeps the old one's sockets.
    """

    UNOWNED_LOOKUPS = 2  # full scans that must miss an inode before it is left alone
    RECENT_OWNERS = 64
    UNOWNED_LIMIT = 1 << 16

    def __init__(self, proc: str = "/proc") -> None:
        self.proc = proc
        self._owner: dict[int, int] = {}  # inode → pid
        self._inodes_of: dict[int, set[int]] = {}  # pid → set of inodes
        self._started: dict[int, int | None] = {}  # pid → start time when its inodes were read
        self._misses: dict[int, int] = {}  # inode → full scans that did not find it
        self._recent: dict[int, None] = {}  # pids that owned new sockets lately, most recent last

    def owners(self, inodes: Iterable[int]) -> dict[int, int]:
        """inode → pid for the given socket inodes (0 and unowned ones are left out)."""
        current = set(inodes)
        current.discard(0)
        self._forget(current)
        self._check_owners()
        wanted = current.difference(self._owner)
        if wanted:
            wanted = {
                inode for inode in wanted if self._misses.get(inode, 0) < self.UNOWNED_LOOKUPS
            }
        if wanted:
            self._look_for(wanted)
        return self._owner

    def _forget(self, current: set[int]) -> None:
        """Drop what left the socket table, which bounds every map by its size."""
        for inode in self._owner.keys() - current:
            self._drop_inode(inode)
        if self._misses:
            for inode in self._misses.keys() - current:
                del self._misses[inode]

    def _drop_inode(self, inode: int) -> None:
        pid = self._owner.pop(inode)
        held = self._inodes_of.get(pid)
        if held is not None:
            held.discard(inode)
            if not held:
                self._drop_pid(pid)

    def _drop_pid(self, pid: int) -> None:
        for inode in self._inodes_of.pop(pid, ()):
            self._owner.pop(inode, None)
        self._started.pop(pid, None)

    def _check_owners(self) -> None:
        for pid, started in list(self._started.items()):
            if self.start_time(pid) != started:
                self._drop_pid(pid)

    def _look_for(self, wanted: set[int]) -> None:
        scanned = set()
        for pid in self._candidates():
            if pid in scanned:
                continue
            scanned.add(pid)
            started = self.start_time(pid)
            if started is None:
                continue
            held = self.socket_inodes(pid)
            if self._started.get(pid, started) != started:
                wanted.update(self._inodes_of.get(pid, ()))
                self._drop_pid(pid)  # the pid now belongs to another process
            else:
                # A descriptor number reused for another socket: what the process no
                # longer holds must be found again, maybe in a process that shares it.
                lost = self._inodes_of.get(pid, set()).difference(held)
                for inode in lost:
                    self._drop_inode(inode)
                wanted |= lost
            found = wanted.intersection(held)
            if not found:
                continue
            self._started[pid] = started
            self._inodes_of.setdefault(pid, set()).update(found)
            for inode in found:
                self._owner[inode] = pid
                self._misses.pop(inode, None)
            self._recent.pop(pid, None)
            self._recent[pid] = None
            wanted -= found
            if not wanted:
                break
        while len(self._recent) > self.RECENT_OWNERS:
            del self._recent[next(iter(self._recent))]
        for inode in wanted:
            self._misses[inode] = self._misses.get(inode, 0) + 1
        while len(self._misses) > self.UNOWNED_LIMIT:
            del self._misses[next(iter(self._misses))]

    def _candidates(self):
        """Pids in the order most likely to own a new socket: lately active owners, then
        every process from the newest pid down."""
        yield from reversed(list(self._recent))
        yield from sorted(self.pids(), reverse=True)

    # The /proc reads, one method each so tests can count or replace them.
    def pids(self) -> list[int]:
        try:
            names = os.listdir(self.proc)
        except OSError as exc:
            note_shortage(exc)
            return []
        return [int(name) for name in names if name.isdigit()]

    def start_time(self, pid: int) -> int | None:
        return _start_time(self.proc, pid)

    def socket_inodes(self, pid: int) -> set[int]:
        """The inodes of the sockets among the process's descriptors; empty when it is
        gone or denies access."""
        held: set[int] = set()
        try:
            directory = os.open(f"{self.proc}/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            note_shortage(exc)  # no descriptor left: its sockets look unowned
            return held
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

"""Process facts for a pid (name, user, command line, executable), through a cache."""

from __future__ import annotations

import functools
import os
import sys
from concurrent.futures import Future
from typing import Callable

import psutil

from histstat.hashing import ExecutableHasher
from histstat.records import UNKNOWN_PROCESS, ProcessFacts
from histstat.shortage import note_shortage

_PROCESS_GONE_OR_HIDDEN = (psutil.Error, OSError)


def _field(read: Callable):
    """One process fact, or None when the process hides it or is gone (or when no
    descriptor was left to read it: counted, for the loop to say so)."""
    try:
        return read()
    except _PROCESS_GONE_OR_HIDDEN as exc:
        note_shortage(exc)
        return None


_SURROGATE_ESCAPES = range(0xDC80, 0xDD00)


def as_utf8(text: str | None) -> str | None:
    """Text the kernel handed over as bytes, decoded as UTF-8 whatever the locale.

    psutil decodes with the filesystem encoding (ASCII under LC_ALL=C without UTF-8
    mode), which would turn valid UTF-8 into escaped bytes; only bytes that are not
    UTF-8 stay surrogate escapes, for the formatters to show as \\xNN.
    """
    if text is None or text.isascii() or not any(ord(c) in _SURROGATE_ESCAPES for c in text):
        return text
    try:
        raw = os.fsencode(text)
    except UnicodeError:
        return text
    return raw.decode("utf-8", "surrogateescape")


def _command(proc: psutil.Process) -> str | None:
    args = proc.cmdline()
    return as_utf8(" ".join(args)) if args else None


def executable_path(proc: psutil.Process) -> str | None:
    """The executable's path as the kernel names it.

    On Linux the link is read directly because psutil drops the " (deleted)" suffix,
    and a binary deleted after it started is exactly what an analyst must see.
    """
    if sys.platform.startswith("linux"):
        try:
            return as_utf8(os.readlink(f"/proc/{proc.pid}/exe"))
        except OSError:
            return None
    return _field(proc.exe) or None


def executable_to_hash(pid: int, exe: str | None) -> str | None:
    """The path to open for hashing: on Linux /proc/<pid>/exe reaches deleted files too."""
    if exe is None:
        return None
    if sys.platform.startswith("linux"):
        return f"/proc/{pid}/exe"
    return exe


def read_process_facts(proc: psutil.Process) -> ProcessFacts:
    """Every fact independently: AccessDenied on one leaves the others intact."""
    return ProcessFacts(
        name=as_utf8(_field(proc.name) or None),
        user=as_utf8(_field(proc.username) or None),
        command=_field(lambda: _command(proc)),
        exe=executable_path(proc),
    )


@functools.lru_cache(maxsize=1024)
def user_name(uid: int) -> str:
    """The login name of ``uid``, or the number when it has none (POSIX only)."""
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return str(uid)


class ProcessCache:
    """Process facts keyed by (pid, create time), so a reused pid is never confused.

    Entries for pids that no longer own a socket are dropped by ``retain``, which keeps
    the cache as small as the socket table on a machine that runs for weeks.
    """

    def __init__(
        self,
        hasher: ExecutableHasher | None = None,
        process: Callable = psutil.Process,
    ) -> None:
        self._hasher = hasher
        self._process = process
        self._entries: dict = {}

    def lookup(self, pid: int | None) -> ProcessFacts:
        """The facts of ``pid``'s process; unknown ones if it is gone."""
        if pid is None:
            return UNKNOWN_PROCESS
        try:
            proc = self._process(pid)
        except _PROCESS_GONE_OR_HIDDEN as exc:
            note_shortage(exc)
            return UNKNOWN_PROCESS
        created = _field(proc.create_time)
        cached = self._entries.get(pid)
        if cached is not None and created is not None and cached[0] == created:
            return cached[1]
        facts = read_process_facts(proc)
        if created is not None:
            self._entries[pid] = [created, facts, None]
        return facts

    def hashes(self, pid: int | None, facts: ProcessFacts) -> Future | None:
        """A future of the Hashes of the executable behind ``facts`` (None: no hashing,
        or unknown). Asked only for rows that are kept, so filtered-out processes cost
        no hashing; asked again for the same process, it is the same future."""
        if self._hasher is None or pid is None:
            return None
        cached = self._entries.get(pid)
        if cached is not None and cached[1] is facts and cached[2] is not None:
            return cached[2]
        path = executable_to_hash(pid, facts.exe)
        future = self._hasher.hashes_of(path) if path is not None else None
        if cached is not None and cached[1] is facts:
            cached[2] = future
        return future

    def created(self, pid: int) -> float | None:
        """The process's start (epoch seconds), None when it is gone or hidden."""
        try:
            return self._process(pid).create_time()
        except _PROCESS_GONE_OR_HIDDEN as exc:
            note_shortage(exc)
            return None

    def retain(self, live_pids: set) -> None:
        """Forget processes that own no socket any more."""
        for pid in [pid for pid in self._entries if pid not in live_pids]:
            del self._entries[pid]

    def __len__(self) -> int:
        return len(self._entries)

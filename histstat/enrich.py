"""Process facts for a pid (name, user, command line, executable, parent), through a
cache."""

from __future__ import annotations

import datetime
import functools
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any, Callable, TypeVar

import psutil

from histstat.containers import SETTLE_SECONDS, read_container_id
from histstat.hashing import ExecutableHasher, Hashes
from histstat.procfs import read_stat
from histstat.records import UNKNOWN_PROCESS, ProcessFacts
from histstat.shortage import note_shortage

_PROCESS_GONE_OR_HIDDEN = (psutil.Error, OSError)
T = TypeVar("T")


def _field(read: Callable[[], T]) -> T | None:
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


# The default of --command-limit: longer command lines are cut where they are read, so
# every format and sink shows the same text, and one process cannot make histstat spend
# its time and memory on megabytes per row (Linux allows about 6 MB of arguments).
COMMAND_LIMIT = 65536


# What ends a command cut by --command-limit: how many characters were left out.
COMMAND_MARKER = "...[+{removed} chars]"


def cut_command(command: str | None, limit: int) -> tuple[str | None, int | None]:
    """(the command as shown, its full length in characters); ``limit`` 0 keeps it
    whole. Only ``command_length`` tells a cut command apart from one that merely ends
    like the marker."""
    if command is None:
        return None, None
    length = len(command)
    if limit and length > limit:
        return command[:limit] + COMMAND_MARKER.format(removed=length - limit), length
    return command, length


def cut_arguments(args: Sequence[str] | None, limit: int) -> tuple[str, ...] | None:
    """The arguments cut as ``cut_command`` cuts the command they make joined by spaces:
    the argument in which the limit falls is cut there and ends with the marker, the
    ones after it are left out, so " ".join of the result is always the command as
    shown. ``limit`` 0 keeps them whole."""
    if args is None:
        return None
    length = sum(map(len, args)) + max(len(args) - 1, 0)
    if not limit or length <= limit:
        return tuple(args)
    return cut_arguments_at(args, limit, COMMAND_MARKER.format(removed=length - limit))


def cut_arguments_at(args: Sequence[str], keep: int, marker: str) -> tuple[str, ...]:
    """The arguments whose join by spaces is the first ``keep`` characters of theirs,
    the last one kept ending with ``marker``."""
    kept = []
    room = keep
    for arg in args:
        if len(arg) >= room:
            kept.append(arg[:room] + marker)
            break
        kept.append(arg)
        room -= len(arg) + 1  # and the space that joins it to the next
    return tuple(kept) if kept else (marker,)


def _arguments(proc: psutil.Process) -> list[str] | None:
    args = proc.cmdline()
    return [as_utf8(arg) or "" for arg in args] if args else None


def _ppid(proc: psutil.Process) -> int | None:
    return _field(proc.ppid)


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


def read_process_facts(proc: psutil.Process, command_limit: int = COMMAND_LIMIT) -> ProcessFacts:
    """Every fact independently, through psutil: AccessDenied on one leaves the others
    intact."""
    args = _field(lambda: _arguments(proc))
    return _facts(proc, as_utf8(_field(proc.name)), args, command_limit)


def read_process_name(proc: psutil.Process) -> str | None:
    """The name alone, as ``read_process_facts`` reads it."""
    return as_utf8(_field(proc.name))


# The kernel keeps at most this many bytes of a process name (TASK_COMM_LEN - 1).
_COMM_MAX = 15
# No file name is longer (NAME_MAX): a longer first argument is not an executable's name.
_NAME_MAX = 255


def _proc_file(pid: int, name: str) -> bytes:
    with open(f"/proc/{pid}/{name}", "rb", buffering=0) as handle:
        return handle.read()


def _linux_argv(raw: bytes) -> list[bytes]:
    """The arguments in the bytes of /proc/<pid>/cmdline, split as psutil splits them.

    Read as bytes, because psutil reads the file as text with universal newlines, which
    turns CR and CRLF inside arguments into LF. Arguments end with NUL; a process that
    rewrote them (setproctitle) may separate them with spaces instead.
    """
    separator = b"\0" if raw.endswith(b"\0") else b" "
    if raw.endswith(separator):
        raw = raw[:-1]
    if separator == b" " or (b"\0" not in raw and b" " in raw):
        return raw.split(b" ")
    return raw.split(b"\0")


def _linux_arguments(raw: bytes) -> tuple[bytes, bytes]:
    """(the command line with arguments joined by spaces, the first argument) from the
    bytes of /proc/<pid>/cmdline (see ``_linux_argv``)."""
    argv = _linux_argv(raw)
    return b" ".join(argv), argv[0]


def _linux_name(pid: int, first_argument: bytes | None) -> str:
    """The process name, as psutil gives it: the kernel's name, cut at 15 bytes, or the
    name of the first argument when it starts with those 15 bytes, but never a longer
    name than a file can have (a process chooses its arguments)."""
    comm = _proc_file(pid, "comm")
    comm = comm[:-1] if comm.endswith(b"\n") else comm
    if len(comm) >= _COMM_MAX and first_argument:
        extended = os.path.basename(first_argument)
        if extended.startswith(comm) and len(extended) <= _NAME_MAX:
            comm = extended
    return comm.decode("utf-8", "surrogateescape")


def read_linux_process_facts(
    proc: psutil.Process, command_limit: int = COMMAND_LIMIT
) -> ProcessFacts:
    """Like ``read_process_facts``, but the name and the command line come from /proc as
    bytes: every byte as the process set it, decoded as UTF-8."""
    raw = _field(lambda: _proc_file(proc.pid, "cmdline"))
    first = args = None
    if raw:  # empty for kernel threads and zombies
        # NUL and space are never part of a UTF-8 sequence: each argument decodes alone
        argv = _linux_argv(raw)
        first = argv[0]
        args = [arg.decode("utf-8", "surrogateescape") for arg in argv]
    facts = _facts(proc, _field(lambda: _linux_name(proc.pid, first)), args, command_limit)
    return facts._replace(container=read_container_id(proc.pid))


def _facts(
    proc: psutil.Process, name: str | None, args: list[str] | None, command_limit: int
) -> ProcessFacts:
    """The facts of a process whose name and arguments were read (each reader has its
    own way); the command line is the arguments joined by spaces, both cut alike."""
    command, length = cut_command(" ".join(args) if args else None, command_limit)
    return ProcessFacts(
        name=name,
        user=as_utf8(_field(proc.username) or None),
        command=command,
        exe=executable_path(proc),
        command_length=length,
        ppid=_ppid(proc),
        args=cut_arguments(args, command_limit),
        args_count=len(args) if args else None,
    )


def read_linux_process_name(proc: psutil.Process) -> str | None:
    """The name alone, as ``read_linux_process_facts`` reads it."""
    raw = _field(lambda: _proc_file(proc.pid, "cmdline"))
    first = _linux_argv(raw)[0] if raw else None
    return _field(lambda: _linux_name(proc.pid, first))


# Where the name and command line come from on this platform.
_ON_LINUX = sys.platform.startswith("linux")
PROCESS_FACTS = read_linux_process_facts if _ON_LINUX else read_process_facts
PROCESS_NAME = read_linux_process_name if _ON_LINUX else read_process_name
# The container of a live process, read again while it is young (None: no containers).
PROCESS_CONTAINER: Callable[[int], str | None] | None = read_container_id if _ON_LINUX else None


# A change of the wall-clock time of boot larger than this is a step of the clock (NTP
# slews by at most 0.5 ms a second, far less between two polls).
CLOCK_STEP = 1.0  # seconds


def _wall_clock_at_boot() -> float:
    """When the machine booted, by the wall clock now: it moves when the clock is set."""
    since_boot = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)
    return time.time() - time.clock_gettime(since_boot)


def _start_ticks(pid: int) -> int | None:
    """The process's start in clock ticks since boot, from one read of /proc/<pid>/stat;
    None when it is gone."""
    stat = read_stat(pid)
    return None if stat is None else stat.start_time


def start_time(created: float | None) -> datetime.datetime | None:
    """A process's start (epoch seconds) as local time with its UTC offset, like the
    rows' timestamps."""
    if created is None:
        return None
    return datetime.datetime.fromtimestamp(created).astimezone()


@functools.lru_cache(maxsize=1024)
def user_name(uid: int) -> str:
    """The login name of ``uid``, or the number when it has none (POSIX only)."""
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return str(uid)


@functools.lru_cache(maxsize=1024)
def user_id(name: str) -> int | None:
    """The uid of the login ``name`` (the inverse of ``user_name``: a name that is a
    number is that uid when no login has it); None when unknown (POSIX only)."""
    try:
        import pwd

        return pwd.getpwnam(name).pw_uid
    except ImportError:
        return None
    except (KeyError, ValueError):  # no such login; a NUL or undecodable byte in it
        return int(name) if name.isascii() and name.isdigit() else None


class ProcessCache:
    """Process facts keyed by (pid, create time), so a reused pid is never confused.

    A process's parent is the one it had when first read: its pid and its name, also
    read once per (pid, create time). Its container is read again at each lookup while
    the process is younger than SETTLE_SECONDS (a runtime forks, then moves the child
    into the container's cgroup), and once after. Entries for pids that no longer own a
    socket are dropped by ``retain``, and parent names with them, which keeps the cache
    as small as the socket table on a machine that runs for weeks. ``retain`` also ends
    a poll: a process's start, which tells a reused pid, is read once a poll (on Linux
    from /proc/<pid>/stat alone while its facts are cached).
    """

    def __init__(
        self,
        hasher: ExecutableHasher | None = None,
        process: Callable[[int], psutil.Process] = psutil.Process,
        command_limit: int = COMMAND_LIMIT,
        read: Callable[..., ProcessFacts] = PROCESS_FACTS,
        read_name: Callable[[psutil.Process], str | None] = PROCESS_NAME,
        read_container: Callable[[int], str | None] | None = PROCESS_CONTAINER,
        clock: Callable[[], float] = time.time,
        start_ticks: Callable[[int], int | None] | None = None,
        boot_clock: Callable[[], float] = _wall_clock_at_boot,
    ) -> None:
        self._hasher = hasher
        self._process = process
        self._command_limit = command_limit
        self._read = read
        self._read_name = read_name
        self._read_container = read_container
        self._clock = clock
        # A quick check of a cached process's start (clock ticks since boot; None: none,
        # psutil's is used): /proc's, on Linux where psutil is not stood in for.
        if start_ticks is None and _ON_LINUX and process is psutil.Process:
            start_ticks = _start_ticks
        self._ticks = start_ticks
        # pid → [its start time, its facts, its hashes (a future) once asked for,
        # whether its container is settled, its start in clock ticks (None: unknown)]
        self._entries: dict[int, list[Any]] = {}
        # pid → (its start time, its name), for parents that own no socket
        self._parent_names: dict[int, tuple[float, str | None]] = {}
        # Pids whose start was read since the poll began (``begin_poll``): the kernel
        # hands a pid out again only after its whole range, never within a poll, and a
        # poll's rows are often many of one process.
        self._checked: set[int] = set()
        self._boot_clock = boot_clock
        self._booted: float | None = None  # the wall-clock time of boot, as last seen

    def lookup(self, pid: int | None) -> ProcessFacts:
        """The facts of ``pid``'s process; unknown ones if it is gone."""
        if pid is None:
            return UNKNOWN_PROCESS
        return self._start_and_facts(pid, None, True)[1] or UNKNOWN_PROCESS

    def start_and_facts(
        self, pid: int, accept: Callable[[float], bool] | None = None
    ) -> tuple[float | None, ProcessFacts | None]:
        """(the start of ``pid``'s process in epoch seconds, its facts), from one look at
        the process: (None, unknown facts) when it is gone or hides its start, and (its
        start, None) when ``accept`` refuses that start (another process took the pid):
        its facts are not read then."""
        return self._start_and_facts(pid, accept, False)

    def _start_and_facts(
        self, pid: int, accept: Callable[[float], bool] | None, hidden_start: bool
    ) -> tuple[float | None, ProcessFacts | None]:
        """See ``start_and_facts``; ``hidden_start``: a process that hides its start is
        read all the same (not cached)."""
        cached = self._entries.get(pid)
        if cached is not None and pid in self._checked:
            return self._cached(pid, cached, accept)
        ticks = None
        if self._ticks is not None:
            # The cached facts are still the process's when its start is: one small
            # read, where psutil reads /proc/<pid>/stat and /proc/stat twice.
            ticks = self._ticks(pid)
            if ticks is None:
                return None, UNKNOWN_PROCESS
            if cached is not None and cached[4] == ticks:
                self._checked.add(pid)
                return self._cached(pid, cached, accept)
        try:
            proc = self._process(pid)
        except _PROCESS_GONE_OR_HIDDEN as exc:
            note_shortage(exc)
            return None, UNKNOWN_PROCESS
        with proc.oneshot():  # /proc/<pid>/stat and status read once for all the facts
            created = _field(proc.create_time)
            if created is None and not hidden_start:
                return None, UNKNOWN_PROCESS
            if cached is not None and created is not None and cached[0] == created:
                self._checked.add(pid)
                return self._cached(pid, cached, accept)
            if created is not None and accept is not None and not accept(created):
                return created, None
            facts = self._read(proc, self._command_limit)
        facts = facts._replace(
            started=start_time(created), parent=self._parent_name(facts.ppid, created)
        )
        if created is not None:
            if ticks is not None and self._ticks is not None and self._ticks(pid) != ticks:
                ticks = None  # the pid changed hands while it was read: no quick check
            else:
                self._checked.add(pid)
            self._entries[pid] = [created, facts, None, self._settled(created), ticks]
        return created, facts

    def _cached(
        self, pid: int, cached: list[Any], accept: Callable[[float], bool] | None
    ) -> tuple[float, ProcessFacts | None]:
        created = cached[0]
        if accept is not None and not accept(created):
            return created, None
        if not cached[3]:
            self._settle_container(pid, cached)
        return created, cached[1]

    def _settled(self, created: float) -> bool:
        """Whether a process started at ``created`` is old enough for its container to
        be final (or there are no containers to read)."""
        return self._read_container is None or self._clock() - created >= SETTLE_SECONDS

    def _settle_container(self, pid: int, cached: list[Any]) -> None:
        """A young process's container read again; once it is old enough, the last time.
        A process that left its cgroup for none since keeps the one it had: an exited
        process's read gives None too."""
        assert self._read_container is not None
        settled = self._settled(cached[0])
        container = self._read_container(pid)
        facts = cached[1]
        if container is not None and container != facts.container:
            cached[1] = facts._replace(container=container)
        cached[3] = settled

    def _parent_name(self, ppid: int | None, child_created: float | None) -> str | None:
        """The name of process ``ppid``, the parent of a process started at
        ``child_created``; None when it is gone, hidden, or started after its child
        (then it is another process that took a dead parent's pid)."""
        if ppid is None or ppid <= 0:  # 0: the kernel started it
            return None
        try:
            parent = self._process(ppid)
        except _PROCESS_GONE_OR_HIDDEN as exc:
            note_shortage(exc)
            return None
        created = _field(parent.create_time)
        if created is None or (child_created is not None and created > child_created):
            return None
        cached = self._entries.get(ppid)
        if cached is not None and cached[0] == created:
            return cached[1].name
        known = self._parent_names.get(ppid)
        if known is not None and known[0] == created:
            return known[1]
        name = self._read_name(parent)
        self._parent_names[ppid] = (created, name)
        return name

    def hashes(self, pid: int | None, facts: ProcessFacts) -> Future[Hashes] | None:
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

    def begin_poll(self) -> None:
        """A poll begins: every process's start is read again at its next lookup. After
        a step of the wall clock the cache starts over: a start in epoch seconds is
        psutil's boot time plus the start in ticks, and the boot time moved with the
        clock, so a cached start (a process known by its ticks alone) would be off by
        the step, and a live owner taken for a newer process."""
        self._checked.clear()
        booted = self._boot_clock()
        if self._booted is not None and abs(booted - self._booted) > CLOCK_STEP:
            self._entries.clear()
            self._parent_names.clear()
        self._booted = booted

    def retain(self, live_pids: set[int]) -> None:
        """Forget processes that own no socket any more."""
        for pid in [pid for pid in self._entries if pid not in live_pids]:
            del self._entries[pid]
        parents = {entry[1].ppid for entry in self._entries.values()}
        for pid in [pid for pid in self._parent_names if pid not in parents]:
            del self._parent_names[pid]

    def __len__(self) -> int:
        return len(self._entries)

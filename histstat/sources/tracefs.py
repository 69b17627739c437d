"""Connect events from the kernel's sock:inet_sock_set_state tracepoint, read through a
private tracefs instance: finding (or mounting) tracefs, the instance's life, and a
bounded, non-blocking reader of its trace_pipe."""

from __future__ import annotations

import ctypes
import os
import re
import select
import sys
import time
from collections.abc import Mapping
from typing import NamedTuple

from histstat.sources.trace_lines import ConnectEvent, ConnectLineParser, LineSplitter

STANDARD_ROOT = "/sys/kernel/tracing"  # where the kernel and trace-cmd expect tracefs
# A directory to use as tracefs instead of looking for it, for tests only: nothing is
# mounted, and an unusable directory gives the reason a real one would.
TEST_ROOT_VARIABLE = "HISTSTAT_TEST_TRACEFS"

EVENT = "sock/inet_sock_set_state"  # Linux 4.16 and later
INSTANCE_PREFIX = "histstat-"
_INSTANCE_NAME = re.compile(r"histstat-(\d+)-(\d+)")

# The transitions that tell who connected to where, as (oldstate, newstate) numbers of
# include/net/tcp_states.h: CLOSE→SYN_SENT runs in the connecting thread; SYN_SENT→
# ESTABLISHED and SYN_SENT→CLOSE (refused, reset, timed out) carry the full 4-tuple;
# SYN_RECV→ESTABLISHED is an accepted connection. Everything else stays in the kernel.
CONNECT_TRANSITIONS = ((7, 2), (2, 1), (2, 7), (3, 1))
_IPPROTO_TCP = 6

# Bounds on one read() call, whatever arrives: past them, events wait in the kernel's
# ring buffer (which counts what it has to overwrite) until the next call.
READ_CHUNK = 64 * 1024
MAX_READ_BYTES = 256 * 1024
# trace_pipe gives at most about a page per read (kernel/trace/trace.c,
# tracing_read_pipe: what it formatted, up to its trace_seq's size), and keeps nothing
# back when that is less than asked. A read that gave less than half a page found no
# more events then: reading again would only meet EAGAIN, and events that come later
# make poll() readable.
SHORT_READ = 2048
# A line longer than this is no line of this event (about 250 bytes): it is dropped,
# and counted, rather than held.
MAX_LINE = 1024

# The per-CPU counters of events the ring buffer lost (kernel/trace/trace.c,
# tracing_stats_read): overwritten unread, dropped when full, lost while committing.
_LOSS_COUNTERS = (b"overrun", b"dropped events", b"commit overrun")


class TracefsUnavailable(Exception):
    """Connect events cannot be had; the message says why, in one line for the user."""


class Tracefs(NamedTuple):
    """Where tracefs is, and whether finding it mounted it (then the caller may unmount
    it when done)."""

    root: str
    mounted: bool


def connect_filter(transitions: tuple[tuple[int, int], ...] = CONNECT_TRANSITIONS) -> str:
    """The kernel-side event filter for TCP sockets making one of ``transitions``."""
    alternatives = " || ".join(
        f"(oldstate == {old} && newstate == {new})" for old, new in transitions
    )
    return f"protocol == {_IPPROTO_TCP} && ({alternatives})"


def _unescape_mount_path(field: bytes) -> str:
    """A path of /proc/self/mountinfo, whose space, tab, newline and backslash are
    written as octal escapes."""
    unescaped = re.sub(rb"\\([0-7]{3})", lambda match: bytes([int(match[1], 8)]), field)
    return os.fsdecode(unescaped)


def mounted_filesystems(mountinfo: bytes) -> dict[str, str]:
    """Mount point → file system type of what is visible there, from the bytes of
    /proc/self/mountinfo: a later mount over the same point hides the earlier one."""
    visible: dict[str, str] = {}
    for line in mountinfo.splitlines():
        before, separator, after = line.partition(b" - ")
        fields = before.split()
        if not separator or len(fields) < 5 or not after:
            continue
        visible[_unescape_mount_path(fields[4])] = after.split()[0].decode(errors="replace")
    return visible


def _read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _kernel_has_tracefs() -> bool:
    try:
        listed = _read("/proc/filesystems")
    except OSError:
        return False
    return any(line.split()[-1:] == [b"tracefs"] for line in listed.splitlines())


def mount_tracefs(path: str = STANDARD_ROOT) -> None:
    """Mount tracefs at ``path`` with mount(2), as trace-cmd and libtracefs do.

    The system call, not the mount command: as root on a machine that may be
    compromised, histstat runs no program found on PATH, and errno says exactly what
    failed.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"nodev", os.fsencode(path), b"tracefs", 0, None) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)


def unmount_tracefs(path: str = STANDARD_ROOT) -> None:
    """Unmount what is mounted at ``path`` (for whoever mounted it: see Tracefs.mounted)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(path), 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)


def check_usable(root: str) -> None:
    """Raise TracefsUnavailable unless ``root`` is a tracefs with instances and the event."""
    if not os.path.isdir(os.path.join(root, "instances")):
        raise TracefsUnavailable(f"{root} is not a usable tracefs: it has no instances/")
    if not os.path.isfile(os.path.join(root, "events", EVENT, "format")):
        raise TracefsUnavailable(
            f"this kernel has no {EVENT.replace('/', ':')} tracepoint (Linux 4.16 or later)"
        )


def locate_tracefs(mount: bool = True, environ: Mapping[str, str] = os.environ) -> Tracefs:
    """Where tracefs is mounted (the standard place first), or mount it there when
    ``mount`` and we are root; raise TracefsUnavailable saying why neither worked."""
    override = environ.get(TEST_ROOT_VARIABLE)
    if override:
        check_usable(override)
        return Tracefs(override, mounted=False)
    if not sys.platform.startswith("linux"):
        raise TracefsUnavailable("kernel connect events need Linux")
    try:
        visible = mounted_filesystems(_read("/proc/self/mountinfo"))
    except OSError as exc:
        raise TracefsUnavailable(f"cannot read /proc/self/mountinfo: {exc.strerror}") from exc
    found = [point for point, kind in visible.items() if kind == "tracefs"]
    if STANDARD_ROOT in found:
        found.remove(STANDARD_ROOT)
        found.insert(0, STANDARD_ROOT)
    if found:
        check_usable(found[0])
        return Tracefs(found[0], mounted=False)
    if not _kernel_has_tracefs():
        raise TracefsUnavailable("this kernel has no tracefs (not in /proc/filesystems)")
    if not mount:
        raise TracefsUnavailable(f"tracefs is not mounted at {STANDARD_ROOT}")
    if os.geteuid() != 0:
        raise TracefsUnavailable(
            f"tracefs is not mounted at {STANDARD_ROOT}, and mounting it needs root"
        )
    try:
        mount_tracefs(STANDARD_ROOT)
    except OSError as exc:
        raise TracefsUnavailable(
            f"cannot mount tracefs at {STANDARD_ROOT}: {exc.strerror}"
        ) from exc
    try:
        check_usable(STANDARD_ROOT)
    except TracefsUnavailable:
        _unmount_quietly(STANDARD_ROOT)
        raise
    return Tracefs(STANDARD_ROOT, mounted=True)


def _unmount_quietly(path: str) -> None:
    try:
        unmount_tracefs(path)
    except OSError:
        pass  # the reason already raised says more than this failure would


# More than /proc/<pid>/stat ever holds (52 numbers and a name of 15 bytes at most).
STAT_READ = 4096


def process_start_time(pid: int) -> int | None:
    """The start time of process ``pid`` (field 22 of /proc/<pid>/stat, clock ticks
    since boot), which tells a process from a later one with the same pid; None when
    there is no such process."""
    try:
        # os.open and one os.read, not open(): a third of the system calls (no fstat,
        # ioctl or second read), as this runs for each connect of a known process.
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        return None
    try:
        stat = os.read(fd, STAT_READ)  # the whole file: the kernel gives it in one read
    except ProcessLookupError:
        return None
    finally:
        os.close(fd)
    # The name (field 2) is in parentheses and may hold any byte, ")" and spaces too:
    # the fields after it start after its last ")".
    after_name = stat[stat.rfind(b")") + 2 :].split()
    return int(after_name[22 - 3])


def instance_name(pid: int, start_time: int) -> str:
    """The name of the tracefs instance of the histstat process ``pid`` started at
    ``start_time`` (see process_start_time)."""
    return f"{INSTANCE_PREFIX}{pid}-{start_time}"


def _process_alive(pid: int, start_time: int) -> bool:
    try:
        return process_start_time(pid) == start_time
    except (OSError, ValueError, IndexError):
        return True  # unreadable is not gone: when in doubt, leave the instance alone


def _remove_instance(directory: str) -> None:
    """Remove an instance (the kernel stops its events first); rmdir fails with EBUSY
    while any file of the instance is open, trace_pipe included. Nothing is written to
    the instance before: a live reader's instance must stay untouched when it refuses."""
    os.rmdir(directory)


def remove_stale_instances(root: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Remove the instances that histstat processes now gone left behind: named
    histstat-<pid>-<start time> where no process ``pid`` started at that time lives.
    Other names are never touched. Returns (names removed, [(name, reason) not removed])."""
    removed: list[str] = []
    failed: list[tuple[str, str]] = []
    instances = os.path.join(root, "instances")
    try:
        names = os.listdir(instances)
    except OSError as exc:
        return removed, [("instances/", exc.strerror or str(exc))]
    for name in sorted(names):
        match = _INSTANCE_NAME.fullmatch(name)
        if match is None or _process_alive(int(match[1]), int(match[2])):
            continue
        try:
            _remove_instance(os.path.join(instances, name))
        except FileNotFoundError:
            continue  # another histstat cleaned it up first
        except OSError as exc:
            failed.append((name, exc.strerror or str(exc)))
        else:
            removed.append(name)
    return removed, failed


def ring_buffer_losses(instance: str) -> int:
    """Events the instance's ring buffer lost so far, summed over its CPUs."""
    total = 0
    per_cpu = os.path.join(instance, "per_cpu")
    try:
        cpus = os.listdir(per_cpu)
    except OSError:
        return 0
    for cpu in cpus:
        try:
            stats = _read(os.path.join(per_cpu, cpu, "stats"))
        except OSError:
            continue  # a CPU going offline takes its directory along
        for line in stats.splitlines():
            key, _, value = line.partition(b":")
            if key in _LOSS_COUNTERS and value.strip().isdigit():
                total += int(value)
    return total


class ConnectEventReader:
    """A private tracefs instance that records TCP connects, and its reader.

    Creating it removes stale instances (see ``stale_removed`` and ``stale_failed``),
    then creates ``instances/histstat-<pid>-<start time>`` with only the
    sock:inet_sock_set_state event on, filtered in the kernel (``connect_filter``),
    tgids recorded and the monotonic trace clock. ``read`` never blocks longer than its
    timeout and does bounded work; ``close`` removes the instance. The caller owns its
    lifetime: nothing is registered at exit or on signals.
    """

    def __init__(
        self,
        root: str,
        *,
        transitions: tuple[tuple[int, int], ...] = CONNECT_TRANSITIONS,
        buffer_kb: int | None = None,
        max_read_bytes: int = MAX_READ_BYTES,
    ) -> None:
        self.root = root
        self.max_read_bytes = max_read_bytes
        self.stale_removed, self.stale_failed = remove_stale_instances(root)
        pid = os.getpid()
        start_time = process_start_time(pid)
        if start_time is None:
            raise TracefsUnavailable("cannot read this process's start time in /proc")
        self.name = instance_name(pid, start_time)
        self.directory = os.path.join(root, "instances", self.name)
        self._fd: int | None = None
        self._lines = LineSplitter(MAX_LINE)
        self._parser = ConnectLineParser()
        self._losses_reported = 0
        try:
            self._make_directory()
        except OSError as exc:
            raise TracefsUnavailable(
                f"cannot create the tracefs instance {self.directory}: {exc.strerror}"
            ) from exc
        self._created = True
        try:
            self._configure(transitions, buffer_kb)
        except BaseException:
            self.close()
            raise

    def _make_directory(self) -> None:
        try:
            os.mkdir(self.directory)
        except FileExistsError:
            # Ours by its name (this pid, this start time): left by a reader of this
            # process that was never closed. It goes unless a reader still has it open
            # (EBUSY), and then two readers would share one buffer: refused.
            _remove_instance(self.directory)
            os.mkdir(self.directory)

    def _configure(self, transitions: tuple[tuple[int, int], ...], buffer_kb: int | None) -> None:
        event = os.path.join(self.directory, "events", EVENT)
        # A new instance traces at once, with the global trace options: off until set up.
        steps = [
            ("tracing_on", "0"),
            ("trace_clock", "mono"),
            ("options/record-tgid", "1"),
            (os.path.join(event, "filter"), connect_filter(transitions)),
            (os.path.join(event, "enable"), "1"),
        ]
        if buffer_kb is not None:
            steps.insert(1, ("buffer_size_kb", str(buffer_kb)))
        for relative, value in steps:
            try:
                _write(os.path.join(self.directory, relative), value)
            except OSError as exc:
                raise TracefsUnavailable(
                    f"cannot set up the tracefs instance ({relative} = {value!r}): {exc.strerror}"
                ) from exc
        try:
            # Fewer bytes to read and parse per event; the parser takes either form.
            _write(os.path.join(self.directory, "options/irq-info"), "0")
        except OSError:
            pass
        try:
            self._fd = os.open(
                os.path.join(self.directory, "trace_pipe"), os.O_RDONLY | os.O_NONBLOCK
            )
            _write(os.path.join(self.directory, "tracing_on"), "1")
        except OSError as exc:
            raise TracefsUnavailable(
                f"cannot read the tracefs instance {self.directory}: {exc.strerror}"
            ) from exc

    def fileno(self) -> int:
        """trace_pipe's descriptor, readable when events wait (for the caller's poll)."""
        if self._fd is None:
            raise ValueError("the reader is closed")
        return self._fd

    def read(self, timeout: float = 0.0) -> list[ConnectEvent]:
        """The events that arrived, waiting at most ``timeout`` seconds for the first;
        at most ``max_read_bytes`` are read per call, the rest waits in the kernel."""
        fd = self.fileno()
        data = self._read_available(fd)
        if not data and timeout > 0:
            # Poll only once a read found nothing: text the kernel formatted for an
            # earlier, cut-short read waits in the reader's state, and poll() (which
            # looks at the ring buffer) does not report it.
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            if poller.poll(int(timeout * 1000)):
                data = self._read_available(fd)
        return self._parse(data) if data else []

    def _read_available(self, fd: int) -> bytes:
        """What trace_pipe holds now, up to ``max_read_bytes``, without blocking."""
        chunks = []
        budget = self.max_read_bytes
        while budget > 0:
            try:
                chunk = os.read(fd, min(READ_CHUNK, budget))
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            if not chunk:
                break
            chunks.append(chunk)
            budget -= len(chunk)
            if len(chunk) < SHORT_READ:
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _parse(self, data: bytes) -> list[ConnectEvent]:
        return self._parser.parse_lines(self._lines.feed(data), time.time() - time.monotonic())

    @property
    def unparsed_lines(self) -> int:
        """Complete lines that were neither an event nor a piece of a name."""
        return self._parser.unparsed

    def lost_events(self) -> int:
        """Events lost since the last call: those the kernel's ring buffer overwrote or
        dropped (the reader fell behind), and lines too long to keep."""
        if self._fd is None:
            return 0
        total = ring_buffer_losses(self.directory) + self._lines.dropped
        increase = total - self._losses_reported
        self._losses_reported = total
        return max(0, increase)

    def close(self) -> str | None:
        """Close trace_pipe and remove the instance, its event with it; safe to call
        again. Returns why the instance could not be removed, or None."""
        if self._fd is not None:
            os.close(self._fd)  # rmdir fails with EBUSY while trace_pipe is open
            self._fd = None
        if not getattr(self, "_created", False):
            return None
        self._created = False
        try:
            _remove_instance(self.directory)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return f"cannot remove the tracefs instance {self.directory}: {exc.strerror}"
        return None

    def __enter__(self) -> ConnectEventReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

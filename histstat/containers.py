"""The container a process runs in, read from its cgroup path."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable

from histstat.shortage import note_shortage
from histstat.sources.namespaces import process_start_time

# A cgroup path component that names a container, by runtime:
# Docker (systemd driver, also dockershim under kubepods.slice), containerd's CRI,
# CRI-O and Podman (systemd driver: a ".scope"; Podman's cgroupfs driver: no suffix).
# Their conmon monitors, "crio-conmon-<id>.scope" and "libpod-conmon-<id>.scope", are
# not the container, and a 64-hex id after "-" excludes them.
_SCOPE = re.compile(
    r"(?:docker|cri-containerd|crio)-([0-9a-f]{64})\.scope"
    r"|libpod-([0-9a-f]{64})(?:\.scope)?"
)
_HEX_ID = re.compile(r"[0-9a-f]{64}")
# Docker's cgroupfs driver (/docker/<id>) and Kubernetes' (/kubepods/<qos>/pod<uid>/<id>)
# name the container by its bare id under these parents.
_BARE_ID_PARENT = re.compile(r"docker|pod[0-9a-fA-F_-]{32,36}")
# systemd-nspawn and other machines registered with systemd-machined:
# machine.slice/machine-<name>.scope, the name escaped as systemd escapes unit names.
_MACHINE = re.compile(r"machine-(.+)\.scope")
_UNIT_ESCAPE = re.compile(r"\\x([0-9a-fA-F]{2})")
_MACHINE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # machined's valid names

# A process younger than this may still be joining its container's cgroup (a runtime
# forks, then moves the child), so its answer is not cached.
SETTLE_SECONDS = 2.0
MIN_PREFIX = 12  # characters of a container id a filter value may give (Docker's short id)


def _component_id(parent: str, name: str) -> str | None:
    """The container named by one path component, None when it names none."""
    match = _SCOPE.fullmatch(name)
    if match:
        return match.group(1) or match.group(2)
    if _HEX_ID.fullmatch(name) and _BARE_ID_PARENT.fullmatch(parent):
        return name
    if parent == "machine.slice":
        match = _MACHINE.fullmatch(name)
        if match:
            machine = _UNIT_ESCAPE.sub(lambda hexa: chr(int(hexa.group(1), 16)), match.group(1))
            if _MACHINE_NAME.fullmatch(machine):
                return machine
    return None


def container_of_path(path: str) -> str | None:
    """The container id named by one cgroup path, the innermost when containers nest
    (Docker in Docker, or in a systemd-nspawn machine); None for none."""
    found = None
    parent = ""
    for name in path.split("/"):
        if name:
            found = _component_id(parent, name) or found
            parent = name
    return found


def container_id(cgroup: str) -> str | None:
    """The container id of a process from the text of its /proc/PID/cgroup: the unified
    hierarchy's ``0::`` line, else the cgroup v1 lines (Docker's cgroupfs driver on a
    v1 or hybrid host); None when the process is in no container.

    The kernel refuses cgroup names holding a newline, so each line is one hierarchy; a
    path may still hold any other byte, ``:`` included, and odd names are simply no
    container.
    """
    unified = None
    legacy = []
    for line in cgroup.split("\n"):
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        if fields[0] == "0" and not fields[1]:
            if unified is None:
                unified = fields[2]
        else:
            legacy.append(fields[2])
    if unified is not None:
        found = container_of_path(unified)
        if found is not None:
            return found
    for path in legacy:
        found = container_of_path(path)
        if found is not None:
            return found
    return None


def read_cgroup(pid: int, proc: str = "/proc") -> str | None:
    """The text of /proc/PID/cgroup; None when the process is gone or hidden."""
    try:
        fd = os.open(f"{proc}/{pid}/cgroup", os.O_RDONLY)
        try:
            chunks = []
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(fd)
    except OSError as exc:
        note_shortage(exc)
        return None
    return b"".join(chunks).decode("utf-8", "replace")


def read_container_id(pid: int, proc: str = "/proc") -> str | None:
    """The container id of a live process; None when it is in none, gone or hidden."""
    text = read_cgroup(pid, proc)
    return None if text is None else container_id(text)


def _boot_ticks() -> float:
    """Clock ticks since boot, the unit of a process's start time."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK")


class ContainerCache:
    """Container ids of processes, cached by (pid, start time) so that a reused pid
    never inherits the old process's container; ``retain`` bounds it to live pids."""

    def __init__(
        self,
        proc: str = "/proc",
        start_time: Callable[[int], int | None] | None = None,
        read: Callable[[int], str | None] | None = None,
    ) -> None:
        """``start_time`` and ``read`` (a process's cgroup text, None when unreadable)
        replace the /proc reads in tests."""
        self.proc = proc
        self._start_time = start_time or (lambda pid: process_start_time(pid, proc))
        self._read = read or (lambda pid: read_cgroup(pid, proc))
        self._settle_ticks = SETTLE_SECONDS * os.sysconf("SC_CLK_TCK")
        self._cache: dict[int, tuple[int, str | None]] = {}  # pid → (start time, id)

    def lookup(self, pid: int | None) -> str | None:
        """The container id of a process, None when in none or gone."""
        if pid is None:
            return None
        started = self._start_time(pid)
        if started is None:
            self._cache.pop(pid, None)
            return None
        cached = self._cache.get(pid)
        if cached is not None and cached[0] == started:
            return cached[1]
        text = self._read(pid)
        if text is None or self._start_time(pid) != started:
            return None  # unreadable (maybe for want of a descriptor: asked again), or reused
        found = container_id(text)
        if _boot_ticks() - started >= self._settle_ticks:
            self._cache[pid] = (started, found)
        return found

    def retain(self, live_pids: set[int]) -> None:
        for pid in self._cache.keys() - live_pids:
            del self._cache[pid]

    def __len__(self) -> int:
        return len(self._cache)


def container_matches(value: str, container: str) -> bool:
    """Whether a ``--container`` value names this container: its full id, or a prefix
    of at least ``MIN_PREFIX`` characters."""
    return value == container or (len(value) >= MIN_PREFIX and container.startswith(value))


class ContainerFilter:
    """The ``--container`` values, matched against the container ids seen."""

    def __init__(self, values: Iterable[str]) -> None:
        self.values = tuple(values)
        self._matched: dict[str, bool] = {}  # container id → whether a value names it

    def matches(self, container: str | None) -> bool:
        if container is None:
            return False
        known = self._matched.get(container)
        if known is None:
            known = self._matched[container] = any(
                container_matches(value, container) for value in self.values
            )
        return known

    def ambiguous(self) -> dict[str, tuple[str, ...]]:
        """Values that matched more than one container id so far, with those ids."""
        named: dict[str, list[str]] = {}
        for container, matched in self._matched.items():
            if matched:
                for value in self.values:
                    if container_matches(value, container):
                        named.setdefault(value, []).append(container)
        return {value: tuple(sorted(ids)) for value, ids in named.items() if len(ids) > 1}

    def unmatched(self) -> tuple[str, ...]:
        """Values that matched no container id seen so far."""
        return tuple(
            value
            for value in self.values
            if not any(
                container_matches(value, container)
                for container, matched in self._matched.items()
                if matched
            )
        )

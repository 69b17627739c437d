"""The container a process runs in, read from its cgroup path."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from histstat.shortage import note_shortage

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
# machinectl start runs one as the unit machine.slice/systemd-nspawn@<name>.service.
_MACHINE = re.compile(r"machine-(.+)\.scope|systemd-nspawn@(.+)\.service")
_UNIT_ESCAPE = re.compile(r"\\x([0-9a-fA-F]{2})")
_MACHINE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # machined's valid names

# A process younger than this may still be joining its container's cgroup (a runtime
# forks, then moves the child), so its answer is read again (enrich.ProcessCache).
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
            escaped = match.group(1) or match.group(2)
            machine = _UNIT_ESCAPE.sub(lambda hexa: chr(int(hexa.group(1), 16)), escaped)
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


_CUT_ID = re.compile(r"[0-9a-f]+")


def container_matches(value: str, container: str) -> bool:
    """Whether a ``--container`` value names this container: its full id or machine
    name, or a cut id (hex digits) of at least ``MIN_PREFIX`` characters that begins
    its id; a machine's name matches only whole."""
    if value == container:
        return True
    return (
        len(value) >= MIN_PREFIX
        and _CUT_ID.fullmatch(value) is not None
        and _HEX_ID.fullmatch(container) is not None
        and container.startswith(value)
    )


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

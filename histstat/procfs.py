"""/proc/<pid>/stat, read once: a process's state, parent and start time (Linux)."""

from __future__ import annotations

import os
from typing import NamedTuple

from histstat.shortage import note_shortage


class ProcessStat(NamedTuple):
    """The fields of /proc/<pid>/stat that histstat uses."""

    state: bytes  # field 3: R, S, D, … Z for a zombie, X for a dead one
    ppid: int  # field 4
    start_time: int  # field 22: clock ticks since boot, which tells a reused pid apart


def read_stat(pid: int | str, proc: str = "/proc") -> ProcessStat | None:
    """The process's stat fields; None when it is gone (or no descriptor was left to
    read them: ``note_shortage`` counts that)."""
    try:
        # os.open and one read: this runs for every owning process every poll, and a
        # file object costs twice as much.
        fd = os.open(f"{proc}/{pid}/stat", os.O_RDONLY)
        try:
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
        # The command name (field 2) may hold any byte, spaces and ")" too: the fields
        # after its last ")" start at field 3.
        fields = data[data.rindex(b")") + 2 :].split(None, 20)
        return ProcessStat(fields[0], int(fields[1]), int(fields[19]))
    except OSError as exc:
        note_shortage(exc)
        return None
    except (ValueError, IndexError):
        return None

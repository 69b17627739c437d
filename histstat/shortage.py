"""Reads that failed for lack of file descriptors, counted so that the loop can say so."""

from __future__ import annotations

import errno

# EMFILE: histstat's own limit (ulimit -n); ENFILE: the whole system's file table.
_SHORTAGE_ERRNOS = (errno.EMFILE, errno.ENFILE)


class DescriptorShortage:
    """How many reads of process facts, socket owners or executables failed because no
    descriptor could be opened: each one left a row without its pid, its process facts
    or its hashes, which would otherwise look like a process that hides them."""

    def __init__(self) -> None:
        self.failed = 0
        self.last_error: OSError | None = None

    def note(self, exc: BaseException) -> bool:
        """Count ``exc`` when it is a shortage of descriptors; True when it was one."""
        if isinstance(exc, OSError) and exc.errno in _SHORTAGE_ERRNOS:
            self.failed += 1
            self.last_error = exc
            return True
        return False

    def take(self) -> tuple[int, OSError | None]:
        """(failed reads since the last take, the last such error)."""
        taken = self.failed, self.last_error
        self.failed, self.last_error = 0, None
        return taken


# One for the process: the stages that open files (enrich, hashing, the Linux source)
# note into it from the poll loop's thread, and the loop reports and resets it.
SHORTAGE = DescriptorShortage()


def note_shortage(exc: BaseException) -> bool:
    """Count ``exc`` when it is a shortage of descriptors (see ``SHORTAGE``)."""
    return SHORTAGE.note(exc)

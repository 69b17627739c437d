"""Rows that wait for facts arriving later (hashes, names), each for a bounded time."""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Any, Callable, NamedTuple

from histstat.records import Row


class Fill(NamedTuple):
    """A fact that arrives later (hashes, a name): its future, how it goes into the
    row, and how long the row may wait for it."""

    future: Future[Any]
    apply: Callable[[Row, Any], Row]
    max_wait: float


class PendingRow(NamedTuple):
    """A row and the facts it waits for."""

    row: Row
    fills: tuple[Fill, ...] = ()
    queued: float = 0.0  # monotonic time it was found

    def ready(self, now: float | None = None) -> bool:
        """Every fill is known, or waited for as long as it may be."""
        now = time.monotonic() if now is None else now
        return all(f.future.done() or now >= self.queued + f.max_wait for f in self.fills)

    def waiting(self) -> tuple[list[Future[Any]], float]:
        """(futures still awaited, the monotonic time the row stops waiting for them)."""
        open_fills = [f for f in self.fills if not f.future.done()]
        give_up = max((self.queued + f.max_wait for f in open_fills), default=self.queued)
        return [f.future for f in open_fills], give_up

    def resolved(self) -> Row:
        """The row with every fact known by now; what is not known stays unknown."""
        row = self.row
        for fill in self.fills:
            if fill.future.done() and not fill.future.cancelled():  # cancelled at exit
                row = fill.apply(row, fill.future.result())
        return row

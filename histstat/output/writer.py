"""The ordered writer: rows to every sink in the order found, files before stdout."""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import wait


class OrderedWriter:
    """Writes rows in the order they were found, each once its hashes are known.

    ``outputs`` pairs a view (row → what its sink takes: a line, or values for a
    database) with a sink, files first and stdout last. Ready rows go out as a batch,
    one sink after the other, each sink flushed (a database committed) before the next
    gets the batch: a row shown on stdout is already saved. A terminal's view may differ
    from the log's (width, colour); sinks sharing a view share one formatted line. With
    ``limit``, writing stops for good after that many rows.
    """

    def __init__(self, outputs: list, limit: int | None = None) -> None:
        self._outputs = outputs
        self._limit = limit
        self._queue: deque = deque()
        self.written = 0

    @property
    def done(self) -> bool:
        return self._limit is not None and self.written >= self._limit

    def add(self, rows: list) -> None:
        self._queue.extend(rows)

    def write_ready(self, deadline: float, final: bool = False) -> None:
        """Write queued rows in order, waiting for hashes until ``deadline`` (a monotonic
        time). A row whose hashes took MAX_HASH_WAIT, or any row when ``final``, goes out
        with what is known: nothing found is ever dropped."""
        while True:
            ready = self._ready_count(final)
            if ready:
                self._emit(ready)
            if not self._queue or self.done or final:
                return
            awaited, give_up = self._queue[0].waiting()
            now = time.monotonic()
            if now >= give_up:
                continue  # its wait is over: it goes out with those facts unknown
            if now >= deadline:
                return  # the poll's time is up; the facts may still come
            wait(awaited, timeout=min(deadline, give_up) - now)

    def _ready_count(self, final: bool) -> int:
        """How many rows at the head of the queue may go out now."""
        room = len(self._queue) if self._limit is None else self._limit - self.written
        count = 0
        now = time.monotonic()
        for pending in self._queue:
            if count >= room:
                break
            if not (final or pending.ready(now)):
                break
            count += 1
        return count

    def _emit(self, count: int) -> None:
        rows = [self._queue[i].resolved() for i in range(count)]
        made: dict = {}
        for view, sink in self._outputs:
            items = made.get(view)
            if items is None:
                items = made[view] = [view(row) for row in rows]
            for item in items:
                sink.write(item)
            sink.flush()
        # Taken off the queue only once every sink has them: an interrupt mid-batch
        # may repeat a row at the final write, never lose one.
        for _ in range(count):
            self._queue.popleft()
        self.written += count

    def pending(self) -> int:
        return len(self._queue)

"""One poll from source to rows, and the in-order writing of rows that wait for hashes."""

from __future__ import annotations

import datetime
import time
from collections import deque
from concurrent.futures import Future, wait
from typing import NamedTuple

from histstat.enrich import ProcessCache
from histstat.filters import RowFilter
from histstat.hashing import UNKNOWN_HASHES
from histstat.records import Connection, ProcessFacts, Row
from histstat.tracker import ConnectionTracker

# The longest a row waits for its executable's hashes before it is written with them
# unknown: a huge or slow file (a hostile process may choose one) cannot hold back the
# stream, and rows behind it keep their order.
MAX_HASH_WAIT = 3.0


class PendingRow(NamedTuple):
    """A row and, with --hash, the future of its executable's hashes."""

    row: Row
    hashes: Future | None
    queued: float = 0.0  # monotonic time it was found

    def ready(self) -> bool:
        return self.hashes is None or self.hashes.done()

    def resolved(self) -> Row:
        if self.hashes is None:
            return self.row
        hashes = self.hashes.result() if self.hashes.done() else UNKNOWN_HASHES
        return self.row._replace(md5=hashes.md5, sha256=hashes.sha256)


def make_row(conn: Connection, facts: ProcessFacts, seen: datetime.datetime) -> Row:
    return Row(
        *conn,
        pname=facts.name,
        user=facts.user,
        command=facts.command,
        exe=facts.exe,
        md5=None,
        sha256=None,
        timestamp=seen,
    )


class Poller:
    """source → tracker → enrich: the rows new in one poll."""

    def __init__(
        self,
        source,
        tracker: ConnectionTracker,
        processes: ProcessCache,
        row_filter: RowFilter | None = None,
    ) -> None:
        self._source = source
        self._tracker = tracker
        self._processes = processes
        self._filter = row_filter or RowFilter()

    def poll(self) -> list:
        # Local time with its UTC offset, taken once: every row of a poll shares it.
        seen = datetime.datetime.now().astimezone()
        new = self._tracker.new_since(self._source.snapshot())
        rows = []
        keeps_connection, keeps_process = self._filter.keeps_connection, self._filter.keeps_process
        for conn in new:
            if not keeps_connection(conn):
                continue  # decided on socket fields: no process lookup spent on it
            facts = self._processes.lookup(conn.pid)
            if keeps_process(facts):
                hashes = self._processes.hashes(conn.pid, facts)
                rows.append(PendingRow(make_row(conn, facts, seen), hashes, time.monotonic()))
        self._processes.retain(self._tracker.live_pids())
        return rows


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
            head = self._queue[0]
            now = time.monotonic()
            give_up = head.queued + MAX_HASH_WAIT
            if now >= give_up:
                continue  # its wait is over: it goes out with hashes unknown
            if now >= deadline:
                return  # the poll's time is up; the hashes may still come
            wait([head.hashes], timeout=min(deadline, give_up) - now)

    def _ready_count(self, final: bool) -> int:
        """How many rows at the head of the queue may go out now."""
        room = len(self._queue) if self._limit is None else self._limit - self.written
        count = 0
        now = time.monotonic()
        for pending in self._queue:
            if count >= room:
                break
            if not (final or pending.ready() or now >= pending.queued + MAX_HASH_WAIT):
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

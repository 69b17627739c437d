"""One poll from source to rows, and the in-order writing of rows that wait for hashes."""

from __future__ import annotations

import datetime
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, wait
from typing import Callable, NamedTuple

from histstat.enrich import ProcessCache
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

    def __init__(self, source, tracker: ConnectionTracker, processes: ProcessCache) -> None:
        self._source = source
        self._tracker = tracker
        self._processes = processes

    def poll(self) -> list:
        # Local time with its UTC offset, taken once: every row of a poll shares it.
        seen = datetime.datetime.now().astimezone()
        new = self._tracker.new_since(self._source.snapshot())
        rows = []
        for conn in new:
            facts, hashes = self._processes.lookup(conn.pid)
            rows.append(PendingRow(make_row(conn, facts, seen), hashes, time.monotonic()))
        self._processes.retain(self._tracker.live_pids())
        return rows


class OrderedWriter:
    """Writes rows in the order they were found, each once its hashes are known."""

    def __init__(self, format_row: Callable, fields: Sequence[str], sinks: list) -> None:
        self._format_row = format_row
        self._fields = fields
        self._sinks = sinks
        self._queue: deque = deque()
        self.written = 0

    def add(self, rows: list) -> None:
        self._queue.extend(rows)

    def write_ready(self, deadline: float, final: bool = False) -> None:
        """Write queued rows in order, waiting for hashes until ``deadline`` (a monotonic
        time). A row whose hashes took MAX_HASH_WAIT, or any row when ``final``, goes out
        with what is known: nothing found is ever dropped."""
        try:
            while self._queue:
                head = self._queue[0]
                if not (final or head.ready()):
                    now = time.monotonic()
                    give_up = head.queued + MAX_HASH_WAIT
                    if now < min(deadline, give_up):
                        wait([head.hashes], timeout=min(deadline, give_up) - now)
                        continue
                    if now < give_up:
                        break  # the poll's time is up; the hashes may still come
                self._write(self._queue.popleft().resolved())
        finally:
            for sink in self._sinks:
                sink.flush()

    def pending(self) -> int:
        return len(self._queue)

    def _write(self, row: Row) -> None:
        line = self._format_row(row, self._fields)
        # Sinks are ordered files first, so a row shown on stdout is already saved.
        for sink in self._sinks:
            sink.write(line)
        self.written += 1

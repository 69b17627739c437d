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


class PendingRow(NamedTuple):
    """A row and, with --hash, the future of its executable's hashes."""

    row: Row
    hashes: Future | None

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
            rows.append(PendingRow(make_row(conn, facts, seen), hashes))
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

    def write_ready(self, deadline: float) -> None:
        """Write queued rows, waiting for hashes until ``deadline`` (a monotonic time)."""
        try:
            while self._queue:
                head = self._queue[0]
                if not head.ready():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    wait([head.hashes], timeout=remaining)
                    continue
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

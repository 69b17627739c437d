"""The ordered writer: rows to every sink in the order found, in bounded chunks, files
before the database before stdout."""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import wait
from typing import Any, Callable

from histstat.output.base import Sink, SinkBusy, SinkError
from histstat.pending import PendingRow
from histstat.records import Row

# A sink takes at most this many rows, or about this many characters of them, before it
# is flushed (a database: committed) and the next sink gets them: what is held in memory
# at once stays bounded whatever a process puts in its command line.
CHUNK_ROWS = 256
CHUNK_CHARS = 1 << 20

# While a sink is busy (a database locked by another connection), the rows it has not
# taken wait in memory, up to this many, or about this many characters of process text;
# past that histstat stops with an error rather than grow without end.
MAX_HELD_ROWS = 50_000
MAX_HELD_CHARS = 128 << 20

# How often rows waiting for their hashes check whether the run is ending.
_WAIT_SLICE = 0.1
# stdout's reader stopping and reading again (a pager read page by page) is told at
# once, then at most this often, the times between summed up in the next notice.
BUSY_NOTICE_EVERY = 60.0


def _rows(count: int) -> str:
    return f"{count:,} row" if count == 1 else f"{count:,} rows"


def row_chars(row: Row) -> int:
    """About how much text a row holds: what a process chooses (its name, command line,
    executable path) plus the rest, which is small and bounded."""
    return len(row.command or "") + len(row.pname or "") + len(row.exe or "") + 256


def item_chars(item: Any) -> int:
    """About how much text a sink's item holds: a line (syslog's: encoded), or a
    database's values."""
    if isinstance(item, (str, bytes)):
        return len(item)
    return sum(len(value) for value in item if isinstance(value, str))


class _Busy:
    """A sink that said it is busy: since when, and why."""

    def __init__(self, error: SinkBusy, told: bool) -> None:
        self.error = error
        self.since = time.monotonic()
        self.told = told  # its start was said; its end is said too
        self.dropped = 0  # rows it never got: more than histstat holds (stdout only)


class _Untold:
    """A sink's busy spells not told yet (rate limited): how many, how long in all."""

    def __init__(self, what: str, state: str) -> None:
        self.what = what
        self.state = state
        self.told_at = -BUSY_NOTICE_EVERY
        self.count = 0
        self.seconds = 0.0
        self.dropped = 0

    def summary(self) -> str:
        if not self.count:
            return ""
        times = "once" if self.count == 1 else f"{self.count} times"
        dropped = f", {_rows(self.dropped)} dropped from it" if self.dropped else ""
        return f" (also {times} since the last notice, {self.seconds:.1f} s in all{dropped})"


class OrderedWriter:
    """Writes rows in the order they were found, each once its hashes are known.

    ``outputs`` pairs a view (row → what its sink takes: a line, or values for a
    database) with a sink, files first, then the database, stdout last. Rows go through
    the sinks in chunks (``CHUNK_ROWS``, ``CHUNK_CHARS``): a sink gets a chunk only once
    every sink before it has it flushed (a database: committed), so a row shown on stdout
    is already in every file and the database, and only one chunk's formatted text is
    held at a time. A busy sink (``SinkBusy``: a locked database) holds back the sinks
    after it while those before it go on; the rows wait for it, at most
    ``MAX_HELD_ROWS``. Sinks sharing a view share one formatted line. With ``limit``, no
    row beyond that many is taken. ``notice`` tells the user when a sink gets busy and
    free again; ``stopping`` cuts short a wait for hashes when the run is ending.
    """

    def __init__(
        self,
        outputs: list[tuple[Callable[[Row], Any], Sink]],
        limit: int | None = None,
        notice: Callable[[str], None] | None = None,
        stopping: Callable[[], bool] | None = None,
    ) -> None:
        self._outputs = outputs
        self._limit = limit
        self._notice = notice or (lambda message: None)
        self._stopping = stopping or (lambda: False)
        views = [view for view, _ in outputs]
        self._shared_views = {view for view in views if views.count(view) > 1}
        self._queue: deque[PendingRow] = deque()  # found, not yet taken (waiting for hashes)
        self._taken: list[Row] = []  # taken, in order; some sinks may not have them yet
        self._reached = [0] * len(outputs)  # per sink: how many of _taken it has
        self._taken_chars = 0
        self._busy: dict[int, _Busy] = {}  # sink index → why it is busy
        self._untold: dict[int, _Untold] = {}  # sink index → busy spells not told yet
        self.admitted = 0  # rows taken for writing (what ``limit`` counts)
        self.written = 0  # rows every sink has

    @property
    def done(self) -> bool:
        """No more rows will be taken: ``limit`` is reached."""
        return self._limit is not None and self.admitted >= self._limit

    def add(self, rows: list[PendingRow]) -> None:
        self._queue.extend(rows)

    def pending(self) -> int:
        """Rows found that some sink does not have yet."""
        return len(self._queue) + len(self._taken) - self._reached[-1] if self._outputs else 0

    def write_ready(self, deadline: float, final: bool = False) -> None:
        """Write queued rows in order, waiting for hashes until ``deadline`` (a monotonic
        time) or until the run is ``stopping``. A row whose hashes took MAX_HASH_WAIT,
        or any row when ``final``, goes out with what is known: nothing found is ever
        dropped. A busy sink is tried once per call; raises ``SinkError`` when the rows
        waiting for it are more than histstat keeps."""
        self._write(deadline, final, self._stopping)

    def write_the_rest(self, hash_deadline: float, busy_deadline: float) -> None:
        """At the end of a run: write every row found, waiting for hashes until
        ``hash_deadline`` and for a busy sink until ``busy_deadline``; raises
        ``SinkError`` naming the rows a sink that stayed busy never got."""
        self._write(hash_deadline, False, lambda: False)
        self._write(time.monotonic(), True, lambda: False)  # still waiting: hashes unknown
        while self._busy and time.monotonic() < busy_deadline:
            self._write(time.monotonic(), True, lambda: False)  # each try waits a little
        if self._busy:
            index, busy = next(iter(self._busy.items()))
            missing = len(self._taken) - self._reached[index]
            also = ", nor shown on stdout" if self._after(index) else ""
            before = " (the log has every row)" if index else ""
            raise SinkError(
                f"{busy.error.what} is still {busy.error.state}: {_rows(missing)} found "
                f"{'was' if missing == 1 else 'were'} not saved to it{also}{before}"
            )
        for untold in self._untold.values():
            if untold.count:
                self._notice(f"{untold.what} was {untold.state}{untold.summary()}")
                untold.count = 0

    def _write(self, deadline: float, final: bool, stopping: Callable[[], bool]) -> None:
        blocked: set[int] = set()
        while True:
            self._take(final)
            self._pump(blocked)
            if not self._queue or self.done or final or stopping():
                break
            awaited, give_up = self._queue[0].waiting()
            now = time.monotonic()
            if now >= give_up:
                continue  # its wait is over: it goes out with those facts unknown
            if now >= deadline:
                break  # the poll's time is up; the facts may still come
            wait(awaited, timeout=min(deadline, give_up, now + _WAIT_SLICE) - now)
        self._check_held()

    def _take(self, final: bool) -> None:
        """Take the rows at the head of the queue whose facts are known (all when
        ``final``), up to ``limit``."""
        now = time.monotonic()
        queue = self._queue
        while queue and not self.done:
            if not (final or queue[0].ready(now)):
                return
            row = queue.popleft().resolved()
            self._taken.append(row)
            self._taken_chars += row_chars(row)
            self.admitted += 1

    def _pump(self, blocked: set[int]) -> None:
        """Move taken rows through the sinks chunk by chunk, each sink after the one
        before it, until every sink that can take rows has them."""
        moved = True
        while moved:
            moved = False
            shared: dict[Any, dict[int, Any]] = {}  # view → {row index: item}, this round only
            for index in range(len(self._outputs)):
                if index not in blocked and self._write_chunk(index, shared, blocked):
                    moved = True
            self._release()

    def _write_chunk(
        self, index: int, shared: dict[Any, dict[int, Any]], blocked: set[int]
    ) -> bool:
        """Write the next chunk of rows to sink ``index`` and flush it; False when it
        had nothing to take or was busy."""
        view, sink = self._outputs[index]
        start = self._reached[index]
        end = len(self._taken) if index == 0 else self._reached[index - 1]
        if start >= end:
            return False
        items = shared.setdefault(view, {}) if view in self._shared_views else None
        position, chars = start, 0
        while position < end and position - start < CHUNK_ROWS and chars < CHUNK_CHARS:
            if getattr(sink, "abandoned", False):  # stdout given up on: spare the formatting
                position = end
                break
            if getattr(sink, "stalled", False):  # stdout takes no more for now
                break
            item = items.get(position) if items is not None else None
            if item is None:
                item = view(self._taken[position])
                if items is not None:
                    items[position] = item
            sink.write(item)
            chars += item_chars(item)
            position += 1
        try:
            sink.flush()
        except SinkBusy as busy:
            blocked.add(index)
            self._reached[index] = start + busy.taken
            if index not in self._busy:
                self._got_busy(index, busy)
            return busy.taken > 0
        was_busy = self._busy.pop(index, None)
        if was_busy is not None:
            self._got_free(index, was_busy, end - start, getattr(sink, "abandoned", False))
        self._reached[index] = position
        return True

    def _got_busy(self, index: int, busy: SinkBusy) -> None:
        untold = self._untold.setdefault(index, _Untold(busy.what, busy.state))
        now = time.monotonic()
        # A pager stops and reads again page after page; a database lock is rarer.
        told = not busy.stdout or now - untold.told_at >= BUSY_NOTICE_EVERY
        self._busy[index] = _Busy(busy, told)
        if not told:
            return
        untold.told_at = now
        if busy.stdout:
            others = ": the log or database gets every row" if index else ""
            self._notice(
                f"stdout is not being read (its reader stopped reading){others}; histstat "
                f"keeps polling and holds the rows for stdout, at most {MAX_HELD_ROWS:,}, "
                f"then skips them on stdout{untold.summary()}"
            )
        else:
            later = " (stdout shows them only once it has them)" if self._after(index) else ""
            self._notice(
                f"{busy}: histstat keeps polling and holds the rows for it, at most "
                f"{MAX_HELD_ROWS:,}{later}{untold.summary()}"
            )
        untold.count, untold.seconds, untold.dropped = 0, 0.0, 0

    def _got_free(self, index: int, busy: _Busy, waited: int, abandoned: bool) -> None:
        took = time.monotonic() - busy.since
        if abandoned:
            return  # the run ended while stdout's reader was not reading
        if not busy.told:
            untold = self._untold[index]
            untold.count += 1
            untold.seconds += took
            untold.dropped += busy.dropped
            return
        again = "read again" if busy.error.stdout else "free again"
        dropped = f" ({_rows(busy.dropped)} skipped on it meanwhile)" if busy.dropped else ""
        self._notice(
            f"{busy.error.what} is {again} after {took:.1f} s: writing the "
            f"{_rows(waited)} that waited for it{dropped}"
        )

    def _after(self, index: int) -> bool:
        """Whether sinks come after sink ``index`` (stdout, after the database)."""
        return index < len(self._outputs) - 1

    def _release(self) -> None:
        """Forget the rows every sink has."""
        through = self._reached[-1] if self._outputs else len(self._taken)
        if not through:
            return
        for row in self._taken[:through]:
            self._taken_chars -= row_chars(row)
        del self._taken[:through]
        self._reached = [reached - through for reached in self._reached]
        self.written += through

    def _check_held(self) -> None:
        if not self._busy:
            return
        if len(self._taken) > MAX_HELD_ROWS or self._taken_chars > MAX_HELD_CHARS:
            self._skip_on_stdout()
        held = len(self._taken)
        if held <= MAX_HELD_ROWS and self._taken_chars <= MAX_HELD_CHARS:
            return
        busy = min(self._busy.values(), key=lambda b: b.since)
        raise SinkError(
            f"{busy.error.what} has been {busy.error.state} for "
            f"{time.monotonic() - busy.since:.0f} s: "
            f"{_rows(held)} wait for it, more than histstat holds ({MAX_HELD_ROWS:,} rows "
            f"or {MAX_HELD_CHARS >> 20} MiB of text); stopping"
        )

    def _skip_on_stdout(self) -> None:
        """Too many rows wait for a stdout whose reader does not read: stdout alone skips
        them and goes on with the next rows, so that a reader that never reads cannot
        end the capture of the log and the database."""
        for index, busy in self._busy.items():
            if not busy.error.stdout:
                continue
            lacking = (self._reached[index - 1] if index else len(self._taken)) - self._reached[
                index
            ]
            if not lacking:
                continue
            self._reached[index] += lacking
            busy.dropped += lacking
            if busy.dropped > lacking:
                continue  # told once a spell; the end of the spell says how many in all
            kept = ": the log and the database have them" if index else ""
            self._notice(
                f"stdout has not been read for {time.monotonic() - busy.since:.0f} s: the "
                f"{_rows(lacking)} held for it are more than histstat holds ({MAX_HELD_ROWS:,} "
                f"rows or {MAX_HELD_CHARS >> 20} MiB of text) and are skipped on stdout{kept}; "
                "stdout goes on with the rows found from now on, skipping more while its "
                "reader does not read"
            )
        self._release()

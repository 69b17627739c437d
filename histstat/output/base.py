"""What every sink offers: the ``Sink`` protocol and the two ways a write can end."""

from __future__ import annotations

from typing import Any, Protocol


class SinkError(Exception):
    """A sink cannot open or write; the message is one line for the user."""


class ReaderGone(Exception):
    """Whoever read stdout closed the pipe: a normal end, not an error."""


class SinkBusy(Exception):
    """A sink cannot take rows for now (a database locked by another connection, stdout
    whose reader does not read): what was written to it since its last flush is
    forgotten, to be written again later, except its first ``taken`` rows.

    ``what`` names the sink for the user ("database 'h.db'"), ``state`` says what holds
    it ("locked by another connection"). ``stdout``: the sink is stdout, whose held rows
    are dropped (for it alone) rather than end the capture when they grow too many.
    """

    def __init__(self, what: str, state: str, taken: int = 0, stdout: bool = False) -> None:
        super().__init__(f"{what} is {state}")
        self.what = what
        self.state = state
        self.taken = taken
        self.stdout = stdout


class Sink(Protocol):
    """Where rows go: it owns its handle, flushing, reopening and errors.

    ``write`` takes what the sink's view made of a row (a line of text, or a database's
    values); every method raises ``SinkError`` with one line for the user. A sink that
    may give up for good (stdout, whose reader stopped reading at the end of a run) says
    so with a true ``abandoned`` attribute, and is then spared the rows' formatting.
    """

    def check(self) -> None:
        """Refuse, with one line and creating nothing, what ``open`` would refuse: every
        output is checked before any is made, so a refusal leaves nothing behind."""
        ...

    def open(self, header: str | None) -> None: ...

    def write(self, item: Any) -> None: ...

    def flush(self) -> None:
        """Everything written so far is where it is going (a database: committed), or
        ``SinkBusy``: none of it is, and it must be written again later."""
        ...

    def reopen(self) -> None:
        """Follow a rotated file (SIGHUP)."""
        ...

    def close(self) -> None: ...

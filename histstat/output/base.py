"""What every sink offers: the ``Sink`` protocol and the two ways a write can end."""

from __future__ import annotations

from typing import Any, Protocol


class SinkError(Exception):
    """A sink cannot open or write; the message is one line for the user."""


class ReaderGone(Exception):
    """Whoever read stdout closed the pipe: a normal end, not an error."""


class Sink(Protocol):
    """Where rows go: it owns its handle, flushing, reopening and errors.

    ``write`` takes what the sink's view made of a row (a line of text, or a database's
    values); every method raises ``SinkError`` with one line for the user.
    """

    def check(self) -> None:
        """Refuse, with one line and creating nothing, what ``open`` would refuse: every
        output is checked before any is made, so a refusal leaves nothing behind."""
        ...

    def open(self, header: str | None) -> None: ...

    def write(self, item: Any) -> None: ...

    def flush(self) -> None:
        """Everything written so far is where it is going (a database: committed)."""
        ...

    def reopen(self) -> None:
        """Follow a rotated file (SIGHUP)."""
        ...

    def close(self) -> None: ...

"""Waiting for outcomes: every wait polls with a deadline, never a fixed sleep."""

from __future__ import annotations

import os
import select
import time
from typing import Callable

import pytest

DEFAULT_TIMEOUT = 15.0  # seconds; every wait below is bounded by a deadline
STOP_TIMEOUT = 10.0  # for histstat to end once stopped, or a run to its end
END_TIMEOUT = 5.0  # for a child told to end (stdin closed, killed), and for cleanups
POLL_STEP = 0.02


def wait_for(
    predicate: Callable,
    timeout: float = DEFAULT_TIMEOUT,
    describe: Callable[[], str] | str = "",
    step: float = POLL_STEP,
):
    """Poll ``predicate`` until it returns a true value (which is returned) or fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = describe() if callable(describe) else describe
            pytest.fail(f"condition not met within {timeout:g} s\n{detail}", pytrace=False)
        time.sleep(step)


def read_line(stream, timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """One line from a pipe, without a buffered read, bounded by a deadline."""
    deadline = time.monotonic() + timeout
    fd = stream.fileno()
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no complete line within {timeout:g} s, got {data!r}")
        readable, _, _ = select.select([fd], [], [], remaining)
        if readable:
            chunk = os.read(fd, 1)
            if not chunk:
                raise EOFError(f"pipe closed before a complete line, got {data!r}")
            data += chunk
    return data

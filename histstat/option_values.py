"""Typed values of command-line options: ASCII decimal numbers, counts and lists."""

from __future__ import annotations

import argparse
import functools
import math
import re
from typing import Callable, TypeVar

from histstat.filters import FilterValueError
from histstat.output.format import ALL_FIELDS

T = TypeVar("T")

# Numbers are ASCII decimal only: float() and int() also take "١" (Arabic-Indic digits),
# "1_0", exponents ("1e-300") and surrounding spaces, which no one means on purpose.
_DECIMAL = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+")
_WHOLE = re.compile(r"[0-9]+")
_MAX_DIGITS = 18  # past any sensible count, and within int()'s limit for text


def _seconds(text: str) -> float:
    """``text`` as seconds, if it is written in ASCII digits with an optional fraction."""
    if not _DECIMAL.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"not a decimal number of seconds (such as 0.5 or 10): {text!r}"
        )
    value = float(text)
    if not math.isfinite(value):  # 310 digits make inf
        raise argparse.ArgumentTypeError(f"too many seconds: {text!r}")
    return value


def _whole(text: str) -> int | None:
    """``text`` as a whole number if it is written in ASCII digits only."""
    if not _WHOLE.fullmatch(text) or len(text.lstrip("0")) > _MAX_DIGITS:
        return None
    return int(text)


MIN_INTERVAL = 0.01  # seconds: a shorter interval only busy-loops


def interval_seconds(text: str) -> float:
    value = _seconds(text)
    if value < MIN_INTERVAL:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_INTERVAL:g} seconds, not {text!r}")
    return value


def positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, not {text!r}")
    return value


def positive_count(text: str) -> int:
    value = _whole(text)
    if not value:
        raise argparse.ArgumentTypeError(f"must be a whole number of rows above 0, not {text!r}")
    return value


def command_limit(text: str) -> int:
    value = _whole(text)
    if value is None:
        raise argparse.ArgumentTypeError(
            f"must be a whole number of characters (0: no limit), not {text!r}"
        )
    return value


def byte_size(least: int, most: int) -> Callable[[str], int]:
    """An argparse type for a number of bytes from ``least`` to ``most``."""

    def size(text: str) -> int:
        value = _whole(text)
        if value is None or not least <= value <= most:
            raise argparse.ArgumentTypeError(
                f"must be a whole number of bytes from {least} to {most}, not {text!r}"
            )
        return value

    return size


def list_of(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse type from a filter parser: its message becomes the usage error."""

    @functools.wraps(parse)
    def parse_or_refuse(text: str) -> T:
        try:
            return parse(text)
        except FilterValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse_or_refuse


def parse_fields(text: str) -> tuple[str, ...]:
    fields = tuple(item.strip() for item in text.split(","))
    for field in fields:
        if field not in ALL_FIELDS:
            raise FilterValueError(f"unknown field {field!r} (choose from {', '.join(ALL_FIELDS)})")
    repeated = sorted({field for field in fields if fields.count(field) > 1})
    if repeated:
        raise FilterValueError(f"field listed twice: {', '.join(repeated)}")
    return fields

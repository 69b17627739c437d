"""Measurements of this checkout and a reference checkout, taken in turns: a benchmark's
helper, so that both sides see the same machine, and only ratios of one run compare."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path


def in_turns(
    checkouts: dict[str, Path], turns: int, measure: Callable[[Path], tuple[float, str]]
) -> dict[str, float]:
    """Run ``measure(root)`` for each checkout, one after the other, ``turns`` times; it
    returns (value, what to print of it). Prints each turn; returns each side's median."""
    values: dict[str, list[float]] = {name: [] for name in checkouts}
    for turn in range(turns):
        for name, root in checkouts.items():
            value, said = measure(root)
            values[name].append(value)
            print(f"turn {turn + 1} {name:9s} {said}", flush=True)
    return {name: statistics.median(found) for name, found in values.items()}

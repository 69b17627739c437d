"""Sources of socket snapshots behind one interface, and the choice between them."""

from __future__ import annotations

import sys
from collections.abc import Callable

from histstat.sources.base import Source, SourceAccessDenied

SOURCE_NAMES = ("auto", "psutil", "linux")

__all__ = ["SOURCE_NAMES", "Source", "SourceAccessDenied", "make_source", "resolve_source_name"]


class UnknownSource(ValueError):
    """A source name that is not one of SOURCE_NAMES, or not available here."""


def resolve_source_name(asked: str) -> str:
    """``psutil`` or ``linux`` for a name of SOURCE_NAMES (auto: linux on Linux)."""
    if asked not in SOURCE_NAMES:
        raise UnknownSource(f"invalid choice {asked!r} (choose from {', '.join(SOURCE_NAMES)})")
    on_linux = sys.platform.startswith("linux")
    if asked == "linux" and not on_linux:
        raise UnknownSource("linux is only available on Linux")
    if asked == "auto":
        return "linux" if on_linux else "psutil"
    return asked


def make_source(
    name: str,
    protos: frozenset[str] | None = None,
    watch_ends: bool = True,
    notice: Callable[[str], None] | None = None,
) -> Source:
    """The source of snapshots, reading only the protocols' tables (--tcp, -4, ...);
    the Linux one is imported only where it can run, hears the kernel's destroy
    broadcasts unless ``watch_ends`` is False (--kernel-events off), reads every network
    namespace it may enter and tells ``notice`` once why it cannot read the others."""
    if name == "linux":
        from histstat.sources.linux import LinuxSource

        return LinuxSource(protos=protos, watch_ends=None if watch_ends else False, notice=notice)
    from histstat.sources.psutil_source import PsutilSource

    return PsutilSource(protos)

"""Platform checks for privilege, kept small so the package imports everywhere."""

from __future__ import annotations

import os
import sys

NOT_PRIVILEGED_NOTICE = (
    "(Not all process information could be determined, run at a higher privilege "
    "level to see everything.)"
)


def is_privileged() -> bool:
    """Root on POSIX, an administrator on Windows."""
    if hasattr(os, "geteuid"):
        return os.geteuid() == 0
    if sys.platform == "win32":  # pragma: no cover - not tested here
        try:
            import ctypes

            return bool(ctypes.windll.shell32.IsUserAnAdmin())
        except (AttributeError, OSError):
            return False
    return False  # pragma: no cover

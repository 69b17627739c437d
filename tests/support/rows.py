"""A sample output row for the formatter tests."""

from __future__ import annotations

import datetime
from typing import Any

from histstat.records import Row

SEEN = datetime.datetime(2026, 11, 26, 3, 4, 5, 678, tzinfo=datetime.timezone.utc)


def sample_row(**changes: Any) -> Row:
    """An established loopback connection of a python3 web server, with ``changes``."""
    command = changes.pop("command", "python3 -m http.server 8000")
    row = Row(
        proto="tcp",
        laddr="127.0.0.1",
        lport=8000,
        raddr="127.0.0.1",
        rport=50000,
        status="ESTABLISHED",
        pid=4242,
        pname="python3",
        user="alice",
        command=command,
        exe="/usr/bin/python3.11",
        md5=None,
        sha256=None,
        timestamp=SEEN,
        command_length=len(command) if isinstance(command, str) else None,
    )
    return row._replace(**changes)

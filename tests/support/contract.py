"""The output contract the tests check (DESIGN.md)."""

from __future__ import annotations

# The output contract (DESIGN.md): the text columns in order, hashes just before command.
COLUMNS = (
    "proto", "laddr", "lport", "raddr", "rport", "status",
    "pid", "pname", "time", "date", "user", "command",
)  # fmt: skip
HASH_COLUMNS = COLUMNS[:-1] + ("md5", "sha256") + COLUMNS[-1:]
# A connection's identity in a row: the first six columns.
KEY_FIELDS = COLUMNS[:6]
# The pretty view (-p): time first, endpoints joined (laddr:lport, raddr:rport), no date.
PRETTY_COLUMNS = (
    "time", "proto", "local", "remote", "status", "pid", "pname", "user", "command",
)  # fmt: skip

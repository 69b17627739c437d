"""The SQLite sink: every row in a queryable database, one transaction per batch."""

from __future__ import annotations

import datetime
import json
import os
import socket
import sqlite3
from typing import Callable
from urllib.parse import quote

from histstat import __version__
from histstat.output.base import SinkBusy, SinkError
from histstat.output.format import field_value, json_text
from histstat.output.sinks import warn_if_exposed
from histstat.records import Row

SCHEMA_VERSION = 2

# Every row field, in the order of the connections table's columns after run_id.
ROW_COLUMNS = (
    "timestamp", "epoch", "date", "time", "proto", "laddr", "lport", "raddr", "rport",
    "status", "pid", "pname", "user", "command", "exe", "md5", "sha256",
    "event", "duration", "duration_from_start", "direction", "attribution", "rhost",
    "country", "asn", "as_org",
)  # fmt: skip

# MIGRATIONS[n] takes a database from schema version n to n + 1.
MIGRATIONS = (
    """
    CREATE TABLE runs (
        id        INTEGER PRIMARY KEY,
        started   TEXT NOT NULL,     -- ISO 8601, local time with UTC offset
        ended     TEXT,              -- NULL while running, or if histstat was killed
        host      TEXT NOT NULL,
        version   TEXT NOT NULL,     -- histstat's version
        arguments TEXT NOT NULL      -- JSON array of the command-line arguments
    );
    CREATE TABLE connections (
        id        INTEGER PRIMARY KEY,
        run_id    INTEGER NOT NULL REFERENCES runs(id),
        timestamp TEXT NOT NULL,     -- ISO 8601 with microseconds and UTC offset
        epoch     REAL NOT NULL,     -- the same instant, seconds since 1970 (UTC)
        date      TEXT NOT NULL,     -- yy-mm-dd, local
        time      TEXT NOT NULL,     -- HH:MM:SS, local
        proto     TEXT NOT NULL,     -- tcp, tcp6, udp, udp6
        laddr     TEXT NOT NULL,
        lport     INTEGER NOT NULL,
        raddr     TEXT,              -- NULL: no remote end
        rport     INTEGER,
        status    TEXT,              -- NULL for UDP
        pid       INTEGER,
        pname     TEXT,
        user      TEXT,
        command   TEXT,
        exe       TEXT,
        md5       TEXT,
        sha256    TEXT
    );
    CREATE INDEX connections_by_epoch ON connections(epoch);
    CREATE INDEX connections_by_raddr ON connections(raddr);
    CREATE INDEX connections_by_rport ON connections(rport);
    CREATE INDEX connections_by_pid ON connections(pid);
    CREATE INDEX connections_by_pname ON connections(pname);
    """,
    # 2: the connection's story (--closed, direction, attribution) and the remote
    # end's name and place (-r, --geoip). Rows from version 1 are all "open".
    """
    ALTER TABLE connections ADD COLUMN event TEXT NOT NULL DEFAULT 'open';  -- or close
    ALTER TABLE connections ADD COLUMN duration REAL;  -- close rows: seconds
    ALTER TABLE connections ADD COLUMN duration_from_start INTEGER;  -- 1: lower bound
    ALTER TABLE connections ADD COLUMN direction TEXT;  -- listen, in, out
    ALTER TABLE connections ADD COLUMN attribution TEXT;  -- socket, earlier
    ALTER TABLE connections ADD COLUMN rhost TEXT;
    ALTER TABLE connections ADD COLUMN country TEXT;
    ALTER TABLE connections ADD COLUMN asn INTEGER;
    ALTER TABLE connections ADD COLUMN as_org TEXT;
    """,
)
assert len(MIGRATIONS) == SCHEMA_VERSION

_INSERT = (
    f"INSERT INTO connections (run_id, {', '.join(ROW_COLUMNS)}) "
    f"VALUES ({', '.join('?' * (len(ROW_COLUMNS) + 1))})"
)


def _statements(script: str) -> list:
    """The SQL statements of a migration (executescript would commit first)."""
    return [part for part in script.split(";") if part.strip()]


def row_values(row: Row) -> tuple:
    """The row as the connections table stores it: JSON's values (true text, bad bytes
    as \\\\xNN text), plus the epoch for range queries."""
    values = []
    for column in ROW_COLUMNS:
        if column == "epoch":
            values.append(row.timestamp.timestamp())
            continue
        value = field_value(row, column)
        values.append(json_text(value) if isinstance(value, str) else value)
    return tuple(values)


# While capturing, a write waits this long (milliseconds) for another connection's lock
# before the rows are held for a later try: the poll loop must never stall on it.
BUSY_TIMEOUT_MS = 50

# SQLite's primary result codes for a lock held elsewhere: SQLITE_BUSY, SQLITE_LOCKED.
_LOCK_CODES = (5, 6)


def is_locked(exc: sqlite3.Error) -> bool:
    """True when SQLite refused because another connection holds a lock."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF in _LOCK_CODES
    return "locked" in str(exc)


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="microseconds")


class SqliteSink:
    """Rows into a SQLite database in WAL mode, so it can be queried while histstat
    writes; the rows written since the last ``flush`` are one transaction, committed by
    it, or none of them when another connection holds the lock (``SinkBusy``).

    A new database and its -wal/-shm files are 0600 (SQLite gives the side files the
    database's mode). A file that is not a histstat database is refused, untouched.
    """

    def __init__(self, path: str, arguments: list, warn: Callable[[str], None]) -> None:
        self.path = path
        self._arguments = arguments
        self._warn = warn
        self._db: sqlite3.Connection | None = None
        self._run_id: int | None = None
        self._rows: list = []  # written since the last flush: at most a chunk

    def _fail(self, what: str, exc: BaseException) -> SinkError:
        return SinkError(f"{what} database {self.path!r}: {exc}")

    def open(self, header: str | None = None) -> None:
        if os.path.isdir(self.path):
            raise SinkError(f"cannot open database {self.path!r}: Is a directory")
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
        except FileExistsError:
            pass
        except OSError as exc:
            raise SinkError(f"cannot open database {self.path!r}: {exc.strerror}") from exc
        try:
            # mode=rw: never create anything but the file made above.
            uri = f"file:{quote(os.path.abspath(self.path))}?mode=rw"
            self._db = sqlite3.connect(uri, uri=True, isolation_level=None)
            self._migrate()
            warn_if_exposed(os.stat(self.path), f"database {self.path!r}", self._warn)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._run_id = self._db.execute(
                "INSERT INTO runs (started, host, version, arguments) VALUES (?, ?, ?, ?)",
                (_now(), socket.gethostname(), __version__, json.dumps(self._arguments)),
            ).lastrowid
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        except SinkError:
            self._abandon()
            raise
        except sqlite3.Error as exc:
            self._abandon()
            raise self._fail("cannot use", exc) from exc

    def _abandon(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _schema_version(self) -> int:
        assert self._db is not None
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise SinkError(
                f"database {self.path!r} has schema version {version}, newer than this "
                f"histstat's {SCHEMA_VERSION}: use a newer histstat or another file"
            )
        return version

    def _migrate(self) -> None:
        """Bring an older schema up to date; refuse a newer one or a foreign database.

        The version is read again inside a write transaction: two histstats opening
        one old database at once must not both migrate it.
        """
        assert self._db is not None
        if self._schema_version() == SCHEMA_VERSION:
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            version = self._schema_version()
            if (
                version == 0
                and self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            ):
                raise SinkError(f"database {self.path!r} is not a histstat database")
            for step in range(version, SCHEMA_VERSION):
                for statement in _statements(MIGRATIONS[step]):
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {step + 1}")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def write(self, values: tuple) -> None:
        self._rows.append(values)

    def flush(self) -> None:
        """Commit the rows written since the last flush in one transaction. The write
        lock is taken first (BEGIN IMMEDIATE), waiting BUSY_TIMEOUT_MS at most: a lock
        held elsewhere raises ``SinkBusy`` and the rows are forgotten, for the writer to
        write again later."""
        if self._db is None or not self._rows:
            return
        rows, self._rows = self._rows, []
        db, run_id = self._db, self._run_id
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(_INSERT, ((run_id, *values) for values in rows))
                db.execute("COMMIT")
            except BaseException:
                self._roll_back()
                raise
        except sqlite3.Error as exc:
            if is_locked(exc):
                raise SinkBusy(f"database {self.path!r}", "locked by another connection") from exc
            raise self._fail("cannot write", exc) from exc

    def _roll_back(self) -> None:
        assert self._db is not None
        if self._db.in_transaction:  # some errors end the transaction themselves
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def reopen(self) -> None:
        pass  # a database is not rotated like a log

    def close(self) -> None:
        """Commit what was written, record the run's end, let go of the database."""
        if self._db is None:
            return
        try:
            try:
                self.flush()
            except SinkBusy as exc:
                raise self._fail("cannot write", exc.__cause__ or exc) from exc
            if self._run_id is not None:
                self._db.execute("UPDATE runs SET ended = ? WHERE id = ?", (_now(), self._run_id))
        except sqlite3.Error as exc:
            raise self._fail("cannot write", exc) from exc
        finally:
            db, self._db = self._db, None
            db.close()

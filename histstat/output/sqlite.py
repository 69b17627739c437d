"""The SQLite sink: every row in a queryable database, one transaction per batch."""

from __future__ import annotations

import datetime
import functools
import json
import os
import socket
import sqlite3
from typing import Any, Callable, Optional
from urllib.parse import quote

from histstat import __version__
from histstat.output.base import SinkBusy, SinkError
from histstat.output.files import (
    CAN_WALK,
    DATABASE_KINDS,
    Directory,
    check_access,
    check_entry,
    lstat_entry,
    open_checked,
    open_directory,
    open_path,
)
from histstat.output.format import field_value, json_text, owners_json
from histstat.output.sinks import warn_if_exposed
from histstat.records import Row

SCHEMA_VERSION = 6

# Every row field, in the order of the connections table's columns after run_id.
ROW_COLUMNS = (
    "timestamp", "epoch", "date", "time", "proto", "laddr", "lport", "raddr", "rport",
    "status", "pid", "pname", "user", "command", "exe", "md5", "sha256",
    "event", "duration", "duration_from_start", "direction", "attribution", "rhost",
    "country", "asn", "as_org", "command_length", "bytes_sent", "bytes_received", "owners",
    "owners_count", "ppid", "parent", "netns", "container",
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
    # 3: the whole command line's length in characters, as --command-limit cuts the
    # command. NULL in rows of earlier versions: their commands were never cut.
    """
    ALTER TABLE connections ADD COLUMN command_length INTEGER;
    """,
    # 4: one story per connection (issue 10): rows may be state and update rows too; close
    # and update rows carry payload bytes; every process holding the socket. The close
    # row's timestamp is its end (the kernel's, where an end event gave it). NULL in rows
    # of earlier versions.
    """
    ALTER TABLE connections ADD COLUMN bytes_sent INTEGER;  -- TCP close and update rows
    ALTER TABLE connections ADD COLUMN bytes_received INTEGER;
    ALTER TABLE connections ADD COLUMN owners TEXT;  -- JSON: [{"pid": 1, "name": "x"}]
    ALTER TABLE connections ADD COLUMN owners_count INTEGER;  -- holders, listed or not
    CREATE INDEX connections_by_event ON connections(event);
    """,
    # 5: the parent process, its pid and name when histstat first read the process.
    # NULL in rows of earlier versions.
    """
    ALTER TABLE connections ADD COLUMN ppid INTEGER;
    ALTER TABLE connections ADD COLUMN parent TEXT;
    """,
    # 6: containers (issue 12): the socket's network namespace and the owner's container.
    # NULL in rows of earlier versions.
    """
    ALTER TABLE connections ADD COLUMN netns INTEGER;  -- the namespace's inode (Linux)
    ALTER TABLE connections ADD COLUMN container TEXT;  -- the full container id
    CREATE INDEX connections_by_container ON connections(container);
    """,
)
assert len(MIGRATIONS) == SCHEMA_VERSION

_INSERT = (
    f"INSERT INTO connections (run_id, {', '.join(ROW_COLUMNS)}) "
    f"VALUES ({', '.join('?' * (len(ROW_COLUMNS) + 1))})"
)


def _statements(script: str) -> list[str]:
    """The SQL statements of a migration (executescript would commit first)."""
    return [part for part in script.split(";") if part.strip()]


# The files SQLite opens by name beside the database, creating them if missing.
SIDE_SUFFIXES = ("-wal", "-shm", "-journal")
Identities = dict[str, tuple[int, int]]  # a file's name: (device, inode) as checked

_MASTER = "SELECT type, name, tbl_name, sql FROM sqlite_master"
SchemaObject = tuple[str, str, str, Optional[str]]  # a row of _MASTER


def expected_schema(version: int) -> frozenset[SchemaObject]:
    """The objects (type, name, tbl_name, sql) of a histstat database of schema
    ``version``, as SQLite itself records what the migrations create."""
    return _schema_made_by(MIGRATIONS[:version])


@functools.cache
def _schema_made_by(migrations: tuple[str, ...]) -> frozenset[SchemaObject]:
    db = sqlite3.connect(":memory:")
    try:
        for script in migrations:
            for statement in _statements(script):
                db.execute(statement)
        return frozenset(db.execute(_MASTER))
    finally:
        db.close()


@functools.cache
def statistics_tables() -> frozenset[SchemaObject]:
    """The tables ANALYZE adds (the query planner's statistics, which run no code): a
    database someone analysed is still histstat's."""
    db = sqlite3.connect(":memory:")
    try:
        db.execute("CREATE TABLE t (c)")
        db.execute("CREATE INDEX t_c ON t(c)")
        db.execute("INSERT INTO t VALUES (1)")
        db.execute("ANALYZE")
        return frozenset(row for row in db.execute(_MASTER) if row[1].startswith("sqlite_stat"))
    finally:
        db.close()


def _short(name: object) -> str:
    """An object's name (another user may have chosen it) for a message of one line."""
    shown = repr(name)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def _code_first(row: SchemaObject) -> tuple[int, str]:
    """Triggers and views first: they are what runs SQL, so what a message should name."""
    return ({"trigger": 0, "view": 1}.get(row[0], 2), str(row))


def schema_difference(found: set[SchemaObject], version: int) -> str | None:
    """What keeps ``found`` (rows of sqlite_master) from being exactly the schema that
    histstat makes at ``version``, or None. Anything else may run SQL inside histstat:
    a trigger, a view in place of a table, a default that calls a function."""
    expected = expected_schema(version)
    expected_names = {(kind, name) for kind, name, _, _ in expected}
    for kind, name, _, _ in sorted(found - expected - statistics_tables(), key=_code_first):
        if (kind, name) in expected_names:
            return f"its {kind} {_short(name)} is not as histstat makes it"
        return f"it holds the {kind} {_short(name)}, which histstat does not make"
    found_names = {(kind, name) for kind, name, _, _ in found}
    for kind, name, _, _ in sorted(expected - found, key=str):
        if (kind, name) not in found_names:
            return f"it lacks the {kind} {_short(name)} of schema version {version}"
    return None


def row_values(row: Row) -> tuple[Any, ...]:
    """The row as the connections table stores it: JSON's values (true text, bad bytes
    as \\\\xNN text), plus the epoch for range queries."""
    values: list[Any] = []
    for column in ROW_COLUMNS:
        if column == "epoch":
            values.append(row.timestamp.timestamp())
            continue
        value = field_value(row, column)
        if column == "owners" and value is not None:
            values.append(json.dumps(owners_json(value), ensure_ascii=False))
            continue
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

    The database and the side files SQLite opens by name beside it (-wal, -shm,
    -journal) pass the checks of a log (``files``): no link, nothing another user owns or
    can swap; histstat makes missing side files itself, 0600, before SQLite opens them,
    and checks after opening that they are still the files it checked. Only a regular
    file is a database. Before any write, the schema must be exactly histstat's: a foreign
    or hostile database is refused, untouched.
    """

    def __init__(self, path: str, arguments: list[str], warn: Callable[[str], None]) -> None:
        self.path = path
        self._arguments = arguments
        self._warn = warn
        self._db: sqlite3.Connection | None = None
        self._run_id: int | None = None
        self._rows: list[tuple[object, ...]] = []  # written since the last flush: a chunk at most
        # SQLite is given this same absolute path that the checks walked.
        self._abspath = os.path.abspath(path)
        self._what = f"database {path!r}"

    def _fail(self, what: str, exc: BaseException) -> SinkError:
        return SinkError(f"{what} database {self.path!r}: {exc}")

    def _side_what(self, suffix: str) -> str:
        return f"{suffix} file of database {self.path!r}"

    def check(self) -> None:
        if not CAN_WALK:
            return
        directory = open_directory(self._abspath, self._what)
        try:
            info = lstat_entry(directory, directory.name)
            if info is not None:
                check_entry(info, self._what, DATABASE_KINDS)
            for suffix in SIDE_SUFFIXES:
                side = lstat_entry(directory, directory.name + suffix)
                if side is not None:
                    check_entry(side, self._side_what(suffix), DATABASE_KINDS)
            check_access(directory, info, self._what)
        except OSError as exc:
            raise SinkError(f"cannot open {self._what}: {exc.strerror or exc}") from exc
        finally:
            os.close(directory.fd)

    def _open_files(self, directory: Directory) -> tuple[Identities, list[str]]:
        """Open (or make) the database and its side files through the checks, and close
        them again before SQLite opens them (closing a descriptor of a file would drop
        SQLite's locks on it). Returns {name: (device, inode)} of the files checked, and
        the names of the side files histstat made."""
        checked: Identities = {}
        made: list[str] = []
        names = [(directory.name, self._what)] + [
            (directory.name + suffix, self._side_what(suffix)) for suffix in SIDE_SUFFIXES
        ]
        try:
            for name, what in names:
                existed = lstat_entry(directory, name) is not None
                fd, info = open_checked(directory, name, what, os.O_RDWR, DATABASE_KINDS)
                os.close(fd)
                checked[name] = (info.st_dev, info.st_ino)
                if not existed and name != directory.name:
                    made.append(name)
        except BaseException:
            self._remove_made(directory, checked, made)
            raise
        return checked, made

    def _remove_made(self, directory: Directory, checked: Identities, made: list[str]) -> None:
        """Remove the side files histstat made and SQLite did not (in WAL mode, SQLite
        removes -wal and -shm as it closes), if they are still the ones it made."""
        for name in made:
            info = lstat_entry(directory, name)
            if info is not None and (info.st_dev, info.st_ino) == checked[name]:
                if info.st_size == 0:
                    os.unlink(name, dir_fd=directory.fd)

    def _check_unchanged(self, directory: Directory, checked: Identities) -> None:
        """After SQLite opened them: each file there is still the one checked."""
        for name, identity in checked.items():
            info = lstat_entry(directory, name)
            if info is not None and (info.st_dev, info.st_ino) != identity:
                raise SinkError(
                    f"cannot use {self._what}: {name!r} was replaced while histstat opened it"
                )

    def open(self, header: str | None = None) -> None:
        if not CAN_WALK:  # pragma: no cover - not POSIX
            fd, _ = open_path(self._abspath, self._what, os.O_RDWR, DATABASE_KINDS)
            os.close(fd)
            self._connect()
            return
        directory = open_directory(self._abspath, self._what)
        checked: Identities = {}
        made: list[str] = []
        try:
            checked, made = self._open_files(directory)
            self._connect()
            self._check_unchanged(directory, checked)
            self._remove_made(directory, checked, [n for n in made if n.endswith("-journal")])
        except BaseException:
            self._abandon()
            try:
                self._remove_made(directory, checked, made)
            except OSError:
                pass
            raise
        finally:
            os.close(directory.fd)

    def _connect(self) -> None:
        try:
            # mode=rw: never create anything but the files checked above.
            uri = f"file:{quote(self._abspath)}?mode=rw"
            self._db = sqlite3.connect(uri, uri=True, isolation_level=None)
            self._db.execute("PRAGMA trusted_schema = OFF")
            version = self._schema_version()
            self._check_schema(version)  # before anything is written, the journal mode too
            self._migrate(version)
            warn_if_exposed(os.stat(self._abspath), self._what, self._warn)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._run_id = self._db.execute(
                "INSERT INTO runs (started, host, version, arguments) VALUES (?, ?, ?, ?)",
                (_now(), socket.gethostname(), __version__, json.dumps(self._arguments)),
            ).lastrowid
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        except sqlite3.Error as exc:
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

    def _check_schema(self, version: int) -> None:
        """Refuse a database whose schema is not exactly what histstat makes at its
        version: its triggers, views or defaults would run inside histstat (as root)."""
        assert self._db is not None
        difference = schema_difference(set(self._db.execute(_MASTER)), version)
        if difference is not None:
            raise SinkError(
                f"database {self.path!r} is not a histstat database ({difference}); "
                "histstat writes only into a database it made"
            )

    def _migrate(self, version: int) -> None:
        """Bring an older schema up to date.

        The version and the schema are read again inside a write transaction: two
        histstats opening one old database at once must not both migrate it.
        """
        assert self._db is not None
        if version == SCHEMA_VERSION:
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            version = self._schema_version()
            self._check_schema(version)
            for step in range(version, SCHEMA_VERSION):
                for statement in _statements(MIGRATIONS[step]):
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {step + 1}")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def write(self, values: tuple[object, ...]) -> None:
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
                raise SinkBusy(self._what, "locked by another connection") from exc
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

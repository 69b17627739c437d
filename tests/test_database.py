"""The SQLite sink: schema, types, transactions, refusals that leave files untouched."""

import datetime
import json
import os
import sqlite3
import stat

import pytest

from histstat import __version__
from histstat.output import sqlite as sqlite_module
from histstat.output.base import SinkError
from histstat.output.sqlite import MIGRATIONS, ROW_COLUMNS, SCHEMA_VERSION, SqliteSink, row_values
from histstat.records import ProcessRef, Row

SEEN = datetime.datetime(2026, 11, 26, 3, 4, 5, 678, tzinfo=datetime.timezone.utc)


def make_row(**changes) -> Row:
    row = Row("tcp", "127.0.0.1", 8000, "127.0.0.1", 50000, "ESTABLISHED", 4242, "python3",
              "alice", "python3 -m http.server", "/usr/bin/python3", None, None, SEEN)  # fmt: skip
    return row._replace(**changes)


def open_sink(path, arguments=("--sqlite", "x.db")):
    warnings = []
    sink = SqliteSink(str(path), list(arguments), warnings.append)
    sink.open()
    return sink, warnings


def query(path, sql, *params):
    db = sqlite3.connect(path)
    try:  # closed at once: an open reader keeps SQLite from removing -wal and -shm
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


def test_new_database_is_private_with_schema_and_run(tmp_path):
    path = tmp_path / "h.db"
    sink, warnings = open_sink(path, ["-q", "--sqlite", "h.db"])
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert warnings == []
    sink.close()
    assert query(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert query(path, "PRAGMA journal_mode") == [("wal",)]
    ((started, ended, host, version, arguments),) = query(
        path, "SELECT started, ended, host, version, arguments FROM runs"
    )
    assert (version, arguments) == (__version__, '["-q", "--sqlite", "h.db"]')
    assert datetime.datetime.fromisoformat(ended) >= datetime.datetime.fromisoformat(started)
    assert host
    indexed = {row[0] for row in query(path, "SELECT sql FROM sqlite_master WHERE type='index'")}
    for column in ("epoch", "raddr", "rport", "pid", "pname"):
        assert any(f"({column})" in sql for sql in indexed), column


def test_rows_keep_their_sql_types_and_a_batch_is_one_transaction(tmp_path):
    path = tmp_path / "h.db"
    sink, _ = open_sink(path)
    sink.write(row_values(make_row()))
    sink.write(row_values(make_row(raddr=None, rport=None, status=None, pid=None)))
    assert query(path, "SELECT count(*) FROM connections") == [(0,)]  # not committed yet
    sink.flush()
    assert query(path, "SELECT count(*) FROM connections") == [(2,)]
    types = query(
        path,
        "SELECT typeof(lport), typeof(rport), typeof(pid), typeof(epoch), typeof(timestamp) "
        "FROM connections ORDER BY id",
    )
    assert types == [("integer", "integer", "integer", "real", "text"),
                     ("integer", "null", "null", "real", "text")]  # fmt: skip
    ((epoch, timestamp, date, time_),) = query(
        path, "SELECT epoch, timestamp, date, time FROM connections WHERE id = 1"
    )
    assert epoch == SEEN.timestamp()
    assert (timestamp, date, time_) == ("2026-11-26T03:04:05.000678+00:00", "26-11-26", "03:04:05")
    sink.close()


def test_undecodable_bytes_are_stored_as_hex_text(tmp_path):
    path = tmp_path / "h.db"
    sink, _ = open_sink(path)
    sink.write(row_values(make_row(command="evil\udcff\nrow")))
    sink.close()
    assert query(path, "SELECT command FROM connections") == [("evil\\xff\nrow",)]


def test_every_row_field_has_a_column(tmp_path):
    path = tmp_path / "h.db"
    open_sink(path)[0].close()
    columns = [row[1] for row in query(path, "PRAGMA table_info(connections)")]
    assert columns == ["id", "run_id", *ROW_COLUMNS]


def unchanged_after_refusal(path, match):
    before = path.read_bytes()
    with pytest.raises(SinkError, match=match) as caught:
        open_sink(path)
    assert path.read_bytes() == before
    assert "\n" not in str(caught.value)
    assert sorted(os.listdir(path.parent)) == [path.name]  # no side files left


def test_newer_schema_is_refused_untouched(tmp_path):
    path = tmp_path / "h.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    unchanged_after_refusal(path, "newer")


def test_file_that_is_not_a_database_is_refused_untouched(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a database, but precious\n" * 100)
    unchanged_after_refusal(path, "not a database")


def test_another_programs_database_is_refused_untouched(tmp_path):
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE accounts (name TEXT)")
    unchanged_after_refusal(path, "not a histstat database")


@pytest.mark.parametrize("where", ["missing-dir/h.db", "."])
def test_bad_paths_are_refused(tmp_path, where):
    with pytest.raises(SinkError, match="cannot open database"):
        open_sink(tmp_path / where)


def test_existing_database_others_can_read_gets_a_warning(tmp_path):
    path = tmp_path / "h.db"
    open_sink(path)[0].close()
    path.chmod(0o644)
    sink, warnings = open_sink(path)
    sink.close()
    assert len(warnings) == 1 and "readable by group or others" in warnings[0]
    assert query(path, "SELECT count(*) FROM runs") == [(2,)]


def make_database(path, version: int) -> None:
    """A database as the histstat of schema ``version`` left it, with one run and one
    row from then (version 0: an empty file)."""
    with sqlite3.connect(path) as db:
        for step in MIGRATIONS[:version]:
            db.executescript(step)
        db.execute(f"PRAGMA user_version = {version}")
        if version:
            db.execute(
                "INSERT INTO runs (started, host, version, arguments) "
                "VALUES ('t', 'h', '1.0.0', '[]')"
            )
            db.execute(
                "INSERT INTO connections (run_id, timestamp, epoch, date, time, proto, laddr, "
                "lport, command) VALUES (1, 't', 0, 'd', 't', 'tcp', '127.0.0.1', 22, 'sshd')"
            )
    db.close()


def schema_of(path) -> list:
    return query(path, "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name")


@pytest.mark.parametrize("version", range(SCHEMA_VERSION))
def test_every_older_schema_is_migrated_keeping_its_rows(tmp_path, version):
    fresh = tmp_path / "fresh.db"
    open_sink(fresh)[0].close()
    path = tmp_path / "h.db"
    make_database(path, version)
    sink, _ = open_sink(path)
    new_row = make_row(
        event="close", duration=2.5, direction="in", command_length=22, bytes_sent=5000,
        bytes_received=7000, owners=(ProcessRef(4242, "python3"),), owners_count=1,
        ppid=1, parent="systemd", netns=4026532500, container="4f1d" * 16,
    )  # fmt: skip
    sink.write(row_values(new_row))
    sink.close()
    assert query(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert schema_of(path) == schema_of(fresh)  # the same tables, columns and indexes
    old = [(22, "sshd", "open", *[None] * 11)] if version else []
    assert query(
        path,
        "SELECT lport, command, event, duration, direction, command_length, bytes_sent, "
        "bytes_received, owners, owners_count, ppid, parent, netns, container "
        "FROM connections ORDER BY id",
    ) == [
        *old,
        (8000, "python3 -m http.server", "close", 2.5, "in", 22, 5000, 7000,
         '[{"pid": 4242, "name": "python3"}]', 1, 1, "systemd", 4026532500, "4f1d" * 16),
    ]  # fmt: skip


def test_owners_are_stored_as_json_text_with_bad_bytes_as_hex(tmp_path):
    path = tmp_path / "h.db"
    sink, _ = open_sink(path)
    holders = (ProcessRef(1, "bash"), ProcessRef(2, "x\udcff\n"), ProcessRef(3, None))
    sink.write(row_values(make_row(owners=holders, owners_count=40)))
    sink.write(row_values(make_row()))
    sink.close()
    (stored, count), unknown = query(path, "SELECT owners, owners_count FROM connections")
    assert json.loads(stored) == [
        {"pid": 1, "name": "bash"}, {"pid": 2, "name": "x\\xff\n"}, {"pid": 3, "name": None},
    ]  # fmt: skip
    assert count == 40 and unknown == (None, None)


def test_command_length_is_stored_as_an_integer(tmp_path):
    path = tmp_path / "h.db"
    sink, _ = open_sink(path)
    sink.write(row_values(make_row(command="x" * 10 + "...[+90 chars]", command_length=100)))
    sink.write(row_values(make_row(command=None, command_length=None)))
    sink.close()
    assert query(path, "SELECT command_length, typeof(command_length) FROM connections") == [
        (100, "integer"),
        (None, "null"),
    ]


def test_parent_is_stored_with_its_sql_types(tmp_path):
    path = tmp_path / "h.db"
    sink, _ = open_sink(path)
    sink.write(row_values(make_row(ppid=1, parent="init\udcff\n")))
    sink.write(row_values(make_row()))
    sink.close()
    assert query(path, "SELECT ppid, typeof(ppid), parent FROM connections ORDER BY id") == [
        (1, "integer", "init\\xff\n"),
        (None, "null", None),
    ]


def test_namespace_and_container_are_stored_with_their_sql_types(tmp_path):
    path = tmp_path / "h.db"
    sink, _ = open_sink(path)
    sink.write(row_values(make_row(netns=4026531840, container="4f1d" * 16)))
    sink.write(row_values(make_row(netns=4026531840, container="my-box")))  # a machine
    sink.write(row_values(make_row()))
    sink.close()
    assert query(path, "SELECT netns, typeof(netns), container FROM connections ORDER BY id") == [
        (4026531840, "integer", "4f1d" * 16),
        (4026531840, "integer", "my-box"),
        (None, "null", None),
    ]
    plan = query(path, "EXPLAIN QUERY PLAN SELECT * FROM connections WHERE container = 'x'")
    assert "connections_by_container" in str(plan)


def test_trigger_is_refused_by_open_itself_leaving_no_side_files(tmp_path):
    """open() checks again what check() saw: a database changed in between is refused."""
    path = tmp_path / "h.db"
    open_sink(path)[0].close()
    with sqlite3.connect(path) as db:
        db.execute("CREATE TRIGGER wipe AFTER INSERT ON runs BEGIN DELETE FROM runs; END")
    db.close()
    unchanged_after_refusal(path, "trigger 'wipe'")


def test_a_new_schema_version_is_checked_from_its_migrations(tmp_path, monkeypatch):
    """The expected schema comes from MIGRATIONS: adding a version needs no other list."""
    path = tmp_path / "h.db"
    open_sink(path)[0].close()  # a database of today's version
    extra = (
        "ALTER TABLE connections ADD COLUMN later TEXT; CREATE INDEX c_later ON connections(later)"
    )
    monkeypatch.setattr(sqlite_module, "MIGRATIONS", (*MIGRATIONS, extra))
    monkeypatch.setattr(sqlite_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    sink, _ = open_sink(path)  # migrated, then accepted as the next version
    sink.close()
    assert query(path, "PRAGMA user_version") == [(SCHEMA_VERSION + 1,)]
    open_sink(path)[0].close()  # and accepted again as it is
    with sqlite3.connect(path) as db:
        db.execute("DROP INDEX c_later")
    db.close()
    unchanged_after_refusal(
        path, f"lacks the index 'c_later' of schema version {SCHEMA_VERSION + 1}"
    )

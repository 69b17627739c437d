"""End to end: the installed histstat writing a SQLite database of real loopback rows."""

import json
import os
import signal
import sqlite3
import stat
import uuid

from support.histstat import INTERVAL, UTF8_ENV, connection_key, run_once
from support.waiting import wait_for


def db_rows(path, pid=None) -> list:
    """Rows of the connections table as dicts, read by a separate connection; none
    while histstat is still creating the schema."""
    try:
        return _db_rows(path, pid)
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise


def _db_rows(path, pid=None) -> list:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        db.row_factory = sqlite3.Row
        sql = "SELECT * FROM connections" + (" WHERE pid = ?" if pid is not None else "")
        return [dict(row) for row in db.execute(sql, () if pid is None else (pid,))]


def test_database_holds_the_same_values_as_json(spawn_child, run_histstat, tmp_path):
    db = tmp_path / "h.db"
    child = spawn_child()
    hs = run_histstat("-j", "--hash", *INTERVAL, "--pid", child.pid, "--sqlite", db, env=UTF8_ENV)
    hs.wait_for_child(child)
    result = hs.stop()
    assert result.returncode == 0, result.stderr
    json_rows = sorted(result.rows_of(child.pid), key=lambda row: str(connection_key(row)))
    stored = sorted(db_rows(db, child.pid), key=lambda row: str(connection_key(row)))
    assert len(stored) == len(json_rows) == len(child.connections())
    for in_json, in_db in zip(json_rows, stored):
        in_db["owners"] = json.loads(in_db["owners"])  # JSON text in the database
        assert {key: in_db[key] for key in in_json} == in_json
        assert (
            in_db["epoch"]
            == __import__("datetime").datetime.fromisoformat(in_json["timestamp"]).timestamp()
        )


def test_quiet_database_alone_and_private_side_files(spawn_child, run_histstat, tmp_path):
    db = tmp_path / "h.db"
    child = spawn_child()
    hs = run_histstat("-q", *INTERVAL, "--pid", child.pid, "--sqlite", db)
    wait_for(lambda: db.exists() and len(db_rows(db, child.pid)) == len(child.connections()))
    side_files = [tmp_path / "h.db-wal", tmp_path / "h.db-shm"]
    wait_for(lambda: all(path.exists() for path in side_files))
    for path in [db, *side_files]:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    result = hs.stop()
    assert (result.returncode, result.stdout_bytes, result.stderr) == (0, b"", "")


def test_a_reader_can_query_while_histstat_writes(spawn_child, run_histstat, tmp_path):
    db = tmp_path / "h.db"
    tag = uuid.uuid4().hex[:8]  # the children's names: all but the first come later
    first = spawn_child(comm=f"rd{tag}0")
    hs = run_histstat("-q", *INTERVAL, "--name", f"rd{tag}?", "--sqlite", db)
    wait_for(lambda: db.exists() and len(db_rows(db, first.pid)) == len(first.connections()))
    reader = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0)  # never waits a lock
    try:
        counts = [reader.execute("SELECT count(*) FROM connections").fetchone()[0]]
        children = [spawn_child(comm=f"rd{tag}{n}") for n in range(1, 4)]
        for child in children:
            wait_for(lambda c=child: len(db_rows(db, c.pid)) == len(c.connections()))
            counts.append(reader.execute("SELECT count(*) FROM connections").fetchone()[0])
        assert counts == sorted(counts) and counts[-1] > counts[0]
    finally:
        reader.close()
    assert hs.stop().returncode == 0


def test_sigkill_leaves_a_sound_database_with_every_row_shown(spawn_child, run_histstat, tmp_path):
    db = tmp_path / "h.db"
    tag = uuid.uuid4().hex[:8]
    first = spawn_child(comm=f"kill{tag}a")
    hs = run_histstat("-j", *INTERVAL, "--name", f"kill{tag}?", "--sqlite", db, env=UTF8_ENV)
    hs.wait_for_child(first)
    second = spawn_child(comm=f"kill{tag}b")
    hs.wait_for_child(second)
    hs.proc.send_signal(signal.SIGKILL)
    result = hs.wait()
    assert result.returncode == -signal.SIGKILL
    with sqlite3.connect(db) as check:
        assert check.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    stored = {(row["timestamp"], connection_key(row)) for row in db_rows(db)}
    shown = {(row["timestamp"], connection_key(row)) for row in result.rows}
    assert shown and shown <= stored


def test_newer_schema_is_refused_before_polling(tmp_path):
    db = tmp_path / "h.db"
    with sqlite3.connect(db) as setup:
        setup.execute("PRAGMA user_version = 99")
    before = db.read_bytes()
    done = run_once(["--sqlite", db])
    assert done.returncode == 1
    assert done.stdout == b""
    (line,) = done.stderr.decode().splitlines()
    assert "newer" in line and str(db) in line
    assert db.read_bytes() == before


def test_bad_database_paths_exit_1_with_one_line_and_touch_nothing(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("keep me\n")
    for path in (text, tmp_path, tmp_path / "missing" / "h.db"):
        done = run_once(["-q", "--sqlite", path])
        assert done.returncode == 1, path
        assert len(done.stderr.decode().splitlines()) == 1, done.stderr
        assert b"Traceback" not in done.stderr
    assert text.read_text() == "keep me\n"
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_runs_table_records_the_run(run_histstat, tmp_path):
    db = tmp_path / "h.db"
    mine = str(os.getpid())  # this test holds no socket: nothing else to write
    hs = run_histstat("-q", "--pid", mine, "--sqlite", db, "--duration", "0.3")
    assert hs.wait().returncode == 0
    with sqlite3.connect(db) as check:
        ((started, ended, arguments),) = check.execute("SELECT started, ended, arguments FROM runs")
    assert json.loads(arguments) == ["-q", "--pid", mine, "--sqlite", str(db), "--duration", "0.3"]
    assert ended is not None and ended > started

"""End to end: the log and the database on a hostile host, where another user plants links,
owns directories or files, prepares databases, or offers a FIFO in place of a log.

Each attack is made the way it was found: a real process running as another user (the
system's ``nobody``) plants what it can plant, and root's histstat must refuse in one
line, exit 1, and leave every file as it was.
"""

import os
import pwd
import signal
import socket
import sqlite3
import stat
import subprocess

import pytest

from histstat.output.sqlite import MIGRATIONS
from support.histstat import locale_env, run_once
from support.waiting import STOP_TIMEOUT, wait_for

INTERVAL = ("-i", "0.1")
UTF8_ENV = locale_env("C.UTF-8")
NO_ROWS = ("--port", "1")  # a refusal comes before any poll; nothing else to format
DECOY_BYTES = b"root's file: no row may ever land here\n"
SIDE_SUFFIXES = ("-wal", "-shm", "-journal")  # the files SQLite opens beside a database


class Stranger:
    """Another user, who plants files with real processes of their own."""

    def __init__(self, entry: pwd.struct_passwd) -> None:
        self.name = entry.pw_name
        self.uid = entry.pw_uid
        self.gid = entry.pw_gid

    def run(self, *argv, cwd, stdin=None) -> None:
        """Run a command as this user, in ``cwd`` (entered before the privileges are
        dropped: the user needs no way in through the test's private directories)."""
        subprocess.run(
            [str(arg) for arg in argv],
            cwd=cwd,
            user=self.uid,
            group=self.gid,
            extra_groups=[],
            stdin=stdin,
            check=True,
            capture_output=True,
            timeout=STOP_TIMEOUT,
        )

    def link(self, target, name, cwd) -> None:
        self.run("ln", "-s", target, name, cwd=cwd)


@pytest.fixture
def stranger() -> Stranger:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.fail("these tests need root: they run histstat as root against another user")
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        pytest.fail("these tests need an unprivileged user named 'nobody' to plant files")
    return Stranger(entry)


@pytest.fixture
def shared(tmp_path):
    """A directory like /tmp: anyone may add entries, none may touch another's."""
    path = tmp_path / "shared"
    path.mkdir()
    path.chmod(0o1777)
    return path


@pytest.fixture
def decoy(tmp_path):
    """A root file that a planted link points at, like /etc/crontab."""
    path = tmp_path / "decoy"
    path.write_bytes(DECOY_BYTES)
    path.chmod(0o600)
    return path


def refused(args, *words) -> str:
    """Run histstat to its end; it must refuse in one line naming ``words``."""
    try:
        done = run_once([*args, *NO_ROWS], timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"histstat {args} did not end within {STOP_TIMEOUT:g} s: it hangs")
    err = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 1, (done.returncode, err)
    assert done.stdout == b"", done.stdout
    lines = err.splitlines()
    assert len(lines) == 1, err
    (line,) = lines
    assert line.startswith("histstat: "), line
    for word in words:
        assert word in line, (word, line)
    return line


def made_database(path) -> bytes:
    """A database as histstat makes it (a real run), closed, its bytes."""
    done = run_once(["-q", "--once", *NO_ROWS, "--sqlite", path])
    assert done.returncode == 0, done.stderr
    return path.read_bytes()


# Links and directories (finding 2).


def test_log_link_planted_in_a_shared_directory_is_refused(stranger, shared, decoy):
    stranger.link(decoy, "x.log", cwd=shared)
    refused(["-l", shared / "x.log"], "symbolic link")
    assert decoy.read_bytes() == DECOY_BYTES
    assert (shared / "x.log").is_symlink()


def test_dangling_log_link_creates_nothing_where_it_points(stranger, shared, tmp_path):
    target = tmp_path / "made-by-root"
    stranger.link(target, "x.log", cwd=shared)
    refused(["-l", shared / "x.log"], "symbolic link")
    assert not os.path.lexists(target)


def test_database_link_planted_in_a_shared_directory_is_refused(stranger, shared, tmp_path):
    empty = tmp_path / "empty-root-file"
    empty.write_bytes(b"")
    stranger.link(empty, "h.db", cwd=shared)
    refused(["-q", "--sqlite", shared / "h.db"], "symbolic link")
    assert empty.read_bytes() == b""
    assert sorted(os.listdir(shared)) == ["h.db"]
    assert sorted(os.listdir(tmp_path)) == ["empty-root-file", "shared"]


@pytest.mark.parametrize("suffix", SIDE_SUFFIXES)
def test_side_file_link_planted_beside_a_database_is_refused(stranger, shared, decoy, suffix):
    db = shared / "h.db"
    before = made_database(db)
    stranger.link(decoy, f"h.db{suffix}", cwd=shared)
    refused(["-q", "--sqlite", db], suffix, "symbolic link")
    assert decoy.read_bytes() == DECOY_BYTES
    assert db.read_bytes() == before
    assert sorted(os.listdir(shared)) == sorted(["h.db", f"h.db{suffix}"])


@pytest.mark.parametrize("suffix", SIDE_SUFFIXES)
def test_side_file_planted_by_another_user_is_refused(stranger, shared, suffix):
    db = shared / "h.db"
    before = made_database(db)
    stranger.run("touch", f"h.db{suffix}", cwd=shared)
    refused(["-q", "--sqlite", db], suffix, "another user", f"uid {stranger.uid}")
    assert db.read_bytes() == before
    assert (shared / f"h.db{suffix}").read_bytes() == b""


def test_link_to_a_directory_planted_in_a_shared_directory_is_refused(stranger, shared, tmp_path):
    """As with /tmp/logs -> /etc/cron.d: the log would land in a root directory."""
    private = tmp_path / "private"
    private.mkdir(mode=0o755)
    stranger.link(private, "logs", cwd=shared)
    line = refused(["-l", shared / "logs" / "x.log"], "symbolic link", "another user")
    assert "logs" in line
    assert os.listdir(private) == []


def directory_of_another_user(path, stranger):
    path.mkdir()
    os.chown(path, stranger.uid, stranger.gid)
    path.chmod(0o755)


def world_writable(path, stranger):
    path.mkdir()
    path.chmod(0o777)  # without the sticky bit anyone may rename or replace a file


def group_writable(path, stranger):
    path.mkdir()
    os.chown(path, 0, stranger.gid)
    path.chmod(0o775)


@pytest.mark.parametrize(
    "make", [directory_of_another_user, world_writable, group_writable], ids=lambda f: f.__name__
)
@pytest.mark.parametrize("option", ["-l", "--sqlite"])
def test_directory_another_user_can_write_is_refused(stranger, tmp_path, make, option):
    directory = tmp_path / "dir"
    make(directory, stranger)
    refused([option, directory / "rows"], "can be changed by", str(directory))
    assert os.listdir(directory) == []


def test_home_of_another_user_with_a_planted_link_is_refused(stranger, tmp_path, decoy):
    """The finding as it was made: /home/USER/x.log -> /etc/decoy, as root."""
    home = tmp_path / "home"
    directory_of_another_user(home, stranger)
    stranger.link(decoy, "x.log", cwd=home)
    refused(["-l", home / "x.log"], "can be changed by", f"uid {stranger.uid}")
    assert decoy.read_bytes() == DECOY_BYTES


def test_log_in_a_shared_sticky_directory_is_accepted(spawn_child, stranger, shared):
    child = spawn_child()
    log = shared / "x.log"
    done = run_once(["-j", "--once", "--pid", child.pid, "-l", log], env=UTF8_ENV)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(os.stat(log).st_mode) == 0o600
    assert os.stat(log).st_uid == 0
    logged = log.read_bytes().splitlines()
    assert len(logged) == len(child.connections())
    assert logged == done.stdout.splitlines()


def test_database_in_a_shared_sticky_directory_keeps_its_side_files_private(
    spawn_child, run_histstat, stranger, shared
):
    child = spawn_child()
    db = shared / "h.db"
    hs = run_histstat("-q", *INTERVAL, "--pid", child.pid, "--sqlite", db)

    def child_rows_stored():
        if not db.exists():
            return False
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as reader:
            try:
                found = reader.execute(
                    "SELECT count(*) FROM connections WHERE pid = ?", (child.pid,)
                )
            except sqlite3.OperationalError:  # no table yet
                return False
            count = found.fetchone()[0]
        reader.close()
        return count == len(child.connections())

    wait_for(child_rows_stored, describe="the child's rows in the database")
    for path in (db, f"{db}-wal", f"{db}-shm"):
        info = os.lstat(path)
        assert stat.S_ISREG(info.st_mode) and info.st_uid == 0, path
        assert stat.S_IMODE(info.st_mode) == 0o600, path
    assert not os.path.lexists(f"{db}-journal")
    assert hs.stop().returncode == 0


# Files another user owns, or that have another name.


def test_log_another_user_made_is_refused(stranger, shared):
    stranger.run("touch", "x.log", cwd=shared)
    refused(["-l", shared / "x.log"], "belongs to another user", f"uid {stranger.uid}")
    assert (shared / "x.log").read_bytes() == b""


def test_database_another_user_made_is_refused(stranger, shared, tmp_path):
    prepared = tmp_path / "prepared.db"
    before = made_database(prepared)
    with open(prepared, "rb") as source:
        stranger.run("sh", "-c", "cat > h.db", cwd=shared, stdin=source)
    refused(["-q", "--sqlite", shared / "h.db"], "belongs to another user")
    assert (shared / "h.db").read_bytes() == before
    assert os.listdir(shared) == ["h.db"]


def test_log_with_another_name_is_refused(shared, decoy):
    """A hard link gives a root file a second name in a directory anyone can write to."""
    os.link(decoy, shared / "x.log")
    refused(["-l", shared / "x.log"], "2 hard links")
    assert decoy.read_bytes() == DECOY_BYTES


def test_sighup_reopen_refuses_a_link_planted_after_rotation(
    spawn_child, run_histstat, stranger, shared, decoy
):
    child = spawn_child()
    log = shared / "x.log"
    hs = run_histstat("-j", *INTERVAL, "--pid", child.pid, "-l", log)
    hs.wait_for_child(child)
    wait_for(lambda: len(log.read_bytes().splitlines()) >= len(child.connections()))
    os.rename(log, shared / "x.log.1")  # what logrotate does
    stranger.link(decoy, "x.log", cwd=shared)
    hs.send(signal.SIGHUP)
    result = hs.wait()
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.splitlines()
    assert "symbolic link" in line, line
    assert decoy.read_bytes() == DECOY_BYTES


# Databases that run their own SQL (finding 3).


def add_trigger_that_deletes_every_row(db):
    db.execute("CREATE TRIGGER wipe AFTER INSERT ON connections BEGIN DELETE FROM connections; END")


def put_a_view_in_place_of_the_table(db):
    db.execute("ALTER TABLE connections RENAME TO kept")
    db.execute("CREATE VIEW connections AS SELECT * FROM kept")


def add_trigger_that_never_ends(db):
    db.execute(
        "CREATE TRIGGER spin AFTER INSERT ON runs BEGIN SELECT count(*) FROM ("
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT i FROM n); END"
    )


def add_an_index(db):
    db.execute("CREATE INDEX connections_by_lport ON connections(lport)")


def add_a_table(db):
    db.execute("CREATE TABLE notes (text TEXT)")


def add_a_column(db):
    db.execute("ALTER TABLE connections ADD COLUMN note TEXT")


def drop_an_index(db):
    db.execute("DROP INDEX connections_by_pid")


HOSTILE = {
    add_trigger_that_deletes_every_row: "trigger 'wipe'",
    put_a_view_in_place_of_the_table: "view 'connections'",
    add_trigger_that_never_ends: "trigger 'spin'",
    add_an_index: "index 'connections_by_lport'",
    add_a_table: "table 'notes'",
    add_a_column: "table 'connections'",
    drop_an_index: "index 'connections_by_pid'",
}


@pytest.mark.parametrize("change", list(HOSTILE), ids=lambda f: f.__name__)
def test_database_with_anything_histstat_does_not_make_is_refused_untouched(tmp_path, change):
    db = tmp_path / "h.db"
    made_database(db)
    with sqlite3.connect(db) as setup:
        change(setup)
    setup.close()
    before = db.read_bytes()
    refused(["-q", "--sqlite", db], "not a histstat database", HOSTILE[change])
    assert db.read_bytes() == before
    assert os.listdir(tmp_path) == ["h.db"]


def test_older_database_with_a_trigger_is_refused_before_migrating(tmp_path):
    db = tmp_path / "h.db"
    with sqlite3.connect(db) as setup:
        setup.executescript(MIGRATIONS[0])
        setup.execute("PRAGMA user_version = 1")
        add_trigger_that_deletes_every_row(setup)
    setup.close()
    before = db.read_bytes()
    refused(["-q", "--sqlite", db], "trigger 'wipe'")
    assert db.read_bytes() == before
    assert os.listdir(tmp_path) == ["h.db"]


def test_analysed_database_is_still_accepted(tmp_path):
    db = tmp_path / "h.db"
    made_database(db)
    with sqlite3.connect(db) as setup:
        setup.execute("ANALYZE")
    setup.close()
    done = run_once(["-q", "--once", *NO_ROWS, "--sqlite", db])
    assert done.returncode == 0, done.stderr
    with sqlite3.connect(db) as check:
        assert check.execute("SELECT count(*) FROM runs").fetchone() == (2,)
    check.close()


# FIFOs, sockets and devices (findings 7 and 9).


def test_fifo_as_log_without_reader_is_refused_at_once(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    refused(["-l", fifo], "FIFO", "stdout")


def test_fifo_as_log_with_a_reader_is_refused_and_gets_nothing(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        refused(["-l", fifo], "FIFO", "stdout")
        try:
            assert os.read(reader, 4096) == b""
        except BlockingIOError:
            pass  # nothing was written
    finally:
        os.close(reader)


def test_socket_as_log_is_refused(tmp_path):
    path = tmp_path / "sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        listener.listen(1)
        refused(["-l", path], "socket", "stdout")
    finally:
        listener.close()


def test_null_device_is_still_a_log(spawn_child):
    child = spawn_child()
    done = run_once(["-j", "--once", "--pid", child.pid, "-l", "/dev/null"], env=UTF8_ENV)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == len(child.connections())


def test_full_device_is_still_a_log_that_fails_to_write():
    line = refused(["-l", "/dev/full"], "/dev/full", "No space left on device")
    assert "not a regular file" not in line


@pytest.mark.parametrize("device", ["/dev/null", "/dev/full"])
def test_device_as_database_says_what_it_is(device):
    refused(["-q", "--sqlite", device], "not a regular file: character device", device)


def test_fifo_as_database_is_refused_at_once(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    refused(["-q", "--sqlite", fifo], "not a regular file: FIFO")


# Every output checked before any is made (finding 9).


def test_refused_database_leaves_no_log(tmp_path):
    log = tmp_path / "x.log"
    refused(["-l", log, "--sqlite", "/dev/null"], "character device")
    assert os.listdir(tmp_path) == []


def test_hostile_database_leaves_no_log(tmp_path):
    db = tmp_path / "h.db"
    made_database(db)
    with sqlite3.connect(db) as setup:
        add_trigger_that_deletes_every_row(setup)
    setup.close()
    before = db.read_bytes()
    refused(["-l", tmp_path / "x.log", "--sqlite", db], "trigger 'wipe'")
    assert os.listdir(tmp_path) == ["h.db"]
    assert db.read_bytes() == before


def test_refused_log_leaves_no_database(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    refused(["-l", fifo, "--sqlite", tmp_path / "h.db"], "FIFO")
    assert os.listdir(tmp_path) == ["fifo"]

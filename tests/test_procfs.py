"""/proc/<pid>/stat: the fields after a name that may hold anything."""

import os

from histstat.procfs import ProcessStat, read_stat


def write_stat(root, pid: int, name: bytes, state: bytes = b"S") -> None:
    fields = [state, b"77"] + [str(n).encode() for n in range(5, 22)] + [b"123456"]
    fields += [b"0"] * 30
    (root / str(pid)).mkdir()
    (root / str(pid) / "stat").write_bytes(b"%d (%s) " % (pid, name) + b" ".join(fields))


def test_the_fields_after_a_hostile_name(tmp_path):
    write_stat(tmp_path, 42, b"a) Z 1 (b\n\xff", state=b"R")
    assert read_stat(42, str(tmp_path)) == ProcessStat(b"R", 77, 123456)


def test_a_zombie_says_so_and_a_process_gone_is_none(tmp_path):
    write_stat(tmp_path, 43, b"sleep", state=b"Z")
    assert read_stat(43, str(tmp_path)).state == b"Z"
    assert read_stat(44, str(tmp_path)) is None
    (tmp_path / "45").mkdir()
    (tmp_path / "45" / "stat").write_bytes(b"45 (cut")
    assert read_stat(45, str(tmp_path)) is None


def test_this_process_reads_as_itself():
    stat = read_stat(os.getpid())
    assert stat is not None and stat.ppid == os.getppid() and stat.start_time > 0

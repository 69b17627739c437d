"""Executable hashes: right digests, each file read once, identity beyond mtime."""

import hashlib
import os
import threading

import pytest

from histstat.hashing import ExecutableHasher, Hashes, hash_open_file


def expected(path) -> Hashes:
    data = open(path, "rb").read()
    return Hashes(hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest())


def test_hashes_match_hashlib(tmp_path):
    path = tmp_path / "tool"
    path.write_bytes(os.urandom(3 * (1 << 20) + 17))  # several read chunks and a tail
    hasher = ExecutableHasher()
    try:
        assert hasher.hashes_of(str(path)).result(timeout=30) == expected(path)
    finally:
        hasher.close()


def test_each_file_is_hashed_once(tmp_path):
    path = tmp_path / "tool"
    path.write_bytes(b"binary")
    link = tmp_path / "link"
    link.symlink_to(path)
    hasher = ExecutableHasher()
    try:
        first = hasher.hashes_of(str(path))
        assert hasher.hashes_of(str(link)) is first
        assert hasher.hashed == 1
    finally:
        hasher.close()


def test_content_changed_behind_a_forged_mtime_is_hashed_again(tmp_path):
    path = tmp_path / "tool"
    path.write_bytes(b"good")
    hasher = ExecutableHasher()
    try:
        before = hasher.hashes_of(str(path)).result(timeout=30)
        info = os.stat(path)
        path.write_bytes(b"evil")  # same size
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))  # mtime put back
        after = hasher.hashes_of(str(path)).result(timeout=30)
        assert after == expected(path) != before
        assert hasher.hashed == 2
    finally:
        hasher.close()


def test_unreadable_executable_is_unknown_not_an_error(tmp_path):
    hasher = ExecutableHasher()
    try:
        assert hasher.hashes_of(str(tmp_path / "missing")) is None
    finally:
        hasher.close()


def test_deleted_file_is_hashed_through_an_open_path(tmp_path):
    # /proc/<pid>/fd/N, like /proc/<pid>/exe, still reaches a file after unlink.
    path = tmp_path / "tool"
    path.write_bytes(b"deleted but running")
    want = expected(path)
    with open(path, "rb") as held:
        path.unlink()
        hasher = ExecutableHasher()
        try:
            got = hasher.hashes_of(f"/proc/self/fd/{held.fileno()}").result(timeout=30)
        finally:
            hasher.close()
    assert got == want


def test_stopping_abandons_a_file_being_read(tmp_path):
    path = tmp_path / "huge"
    with open(path, "wb") as handle:
        handle.truncate(64 << 20)  # sparse: many chunks, no disk
    stopping = threading.Event()
    stopping.set()
    fd = os.open(path, os.O_RDONLY)
    assert hash_open_file(fd, stopping) == Hashes()
    with pytest.raises(OSError):
        os.fstat(fd)  # closed all the same

"""Hashes of process executables, computed off the poll loop and cached by file identity."""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

from histstat.shortage import note_shortage

_CHUNK = 1 << 20
# Distinct executables on one machine number in the hundreds; the cap only guards
# against a machine that keeps producing new binaries for weeks.
_MAX_IDENTITIES = 4096


class Hashes(NamedTuple):
    md5: str | None = None
    sha256: str | None = None


UNKNOWN_HASHES = Hashes()


def file_identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What makes two opens the same file content: mtime alone can be forged."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def hash_open_file(fd: int, stopping: threading.Event | None = None) -> Hashes:
    """md5 and sha256 of an open file descriptor's content, which it then closes.

    ``stopping`` is checked between chunks, so histstat's exit never waits for a huge
    file to be read to its end.
    """
    md5 = hashlib.md5(usedforsecurity=False)  # an identifier here, not a safeguard
    sha256 = hashlib.sha256()
    try:
        with os.fdopen(fd, "rb") as handle:
            for chunk in iter(lambda: handle.read(_CHUNK), b""):
                if stopping is not None and stopping.is_set():
                    return UNKNOWN_HASHES
                md5.update(chunk)
                sha256.update(chunk)
    except OSError:
        return UNKNOWN_HASHES
    return Hashes(md5.hexdigest(), sha256.hexdigest())


class ExecutableHasher:
    """Hashes each distinct executable once, in worker threads.

    The file is opened on the caller's thread, so a process that exits (or a binary
    deleted) right after the lookup is still hashed from the open descriptor.
    """

    def __init__(self, workers: int = 2) -> None:
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="histstat-hash")
        self._stopping = threading.Event()
        self._by_identity: dict[tuple[int, int, int, int, int], Future[Hashes]] = {}
        self.hashed = 0  # how many files were actually read, for tests and figures

    def hashes_of(self, path: str) -> Future[Hashes] | None:
        """A future of the file's Hashes, or None when it cannot be opened (unknown)."""
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except OSError as exc:
            note_shortage(exc)
            return None
        try:
            identity = file_identity(os.fstat(fd))
        except OSError:
            os.close(fd)
            return None
        future = self._by_identity.get(identity)
        if future is not None:
            os.close(fd)
            return future
        if len(self._by_identity) >= _MAX_IDENTITIES:
            del self._by_identity[next(iter(self._by_identity))]
        self.hashed += 1
        future = self._pool.submit(hash_open_file, fd, self._stopping)
        self._by_identity[identity] = future
        return future

    def close(self) -> None:
        """Stop hashing: files being read are dropped within one chunk."""
        self._stopping.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

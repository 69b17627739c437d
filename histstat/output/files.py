"""Opening output files on a hostile host without following what another user planted.

histstat runs as root and writes other users' command lines, some chosen by an attacker.
So a log or a database must be the file the user named: never a symbolic link, never in a
directory where another user can add, rename or replace entries, never a file another
user owns; and a log must not be a FIFO or a socket, which can block histstat for good.
"""

from __future__ import annotations

import os
import stat
from typing import NamedTuple

from histstat.output.base import SinkError

MAX_LINKS = 40  # as the kernel's own limit on links in one path lookup

DATABASE_KINDS = frozenset({stat.S_IFREG})
LOG_KINDS = frozenset({stat.S_IFREG, stat.S_IFCHR})  # /dev/null, /dev/full, a terminal

_KIND_NAMES = {
    stat.S_IFREG: "regular file",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFIFO: "FIFO",
    stat.S_IFSOCK: "socket",
    stat.S_IFDIR: "directory",
    stat.S_IFLNK: "symbolic link",
}

# Where the system offers them (Linux and the BSDs), every step of a path is opened
# relative to the directory checked before it, so nothing can be swapped in between.
CAN_WALK = (
    hasattr(os, "O_NOFOLLOW")
    and hasattr(os, "O_DIRECTORY")
    and hasattr(os, "geteuid")
    and os.open in os.supports_dir_fd
    and os.stat in os.supports_dir_fd
)
_DIRECTORY_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | getattr(os, "O_DIRECTORY", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _kind_name(mode: int) -> str:
    return _KIND_NAMES.get(stat.S_IFMT(mode), "special file")


def _describe(exc: OSError) -> str:
    return exc.strerror or str(exc)


class Directory(NamedTuple):
    """An open directory whose entries only root and we can change, and the file's name
    in it. The caller closes ``fd``."""

    fd: int
    name: str


def _euid() -> int:
    return os.geteuid()


def other_writer(info: os.stat_result) -> str | None:
    """Who, besides root and us, can add, remove or rename entries in this directory
    (None: nobody). A sticky directory owned by root or us, such as /tmp, is safe: there
    another user can add entries, but not remove or rename ours."""
    if info.st_uid not in (0, _euid()):
        return f"its owner (uid {info.st_uid})"
    if info.st_mode & stat.S_ISVTX:
        return None
    if info.st_mode & stat.S_IWOTH:
        return "every user"
    # logrotate's rule: a group-writable directory is safe only if the group is root's.
    if info.st_mode & stat.S_IWGRP and info.st_gid != 0:
        return f"group {info.st_gid}"
    return None


def _trusted(euid: int) -> str:
    return "root" if euid == 0 else f"root and uid {euid}"


def open_directory(path: str, what: str) -> Directory:
    """The directory that holds ``path``, reached one name at a time from / (or the
    current directory), each looked up only in a directory that no other user can change;
    a symbolic link on the way is followed only if root or we made it.

    ``what`` names the file in messages ("log '/var/log/x'"); every refusal is a
    ``SinkError`` of one line.
    """
    head, name = os.path.split(path)
    if name in ("", ".", ".."):
        raise SinkError(f"cannot open {what}: Is a directory")
    start = os.sep if path.startswith(os.sep) else os.curdir
    pending = _parts(head)
    links = 0
    try:
        fd = os.open(start, _DIRECTORY_FLAGS | _CLOEXEC)
    except OSError as exc:
        raise SinkError(f"cannot open {what}: {_describe(exc)}") from exc
    where = _display(start)
    try:
        while True:
            info = os.fstat(fd)
            writer = other_writer(info)
            if writer is not None:
                raise SinkError(
                    f"cannot open {what}: directory {where!r} can be changed by {writer}; "
                    f"use a directory that only {_trusted(_euid())} can write to"
                )
            if not pending:
                return Directory(fd, name)
            part = pending.pop()
            entry = os.stat(part, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISLNK(entry.st_mode):
                links += 1
                if links > MAX_LINKS:
                    raise SinkError(f"cannot open {what}: Too many levels of symbolic links")
                if entry.st_uid not in (0, _euid()):
                    # Only a sticky directory lets a stranger put a link in ours.
                    raise SinkError(
                        f"cannot open {what}: {os.path.join(where, part)!r} is a symbolic "
                        f"link made by another user (uid {entry.st_uid})"
                    )
                target = os.readlink(part, dir_fd=fd)
                pending.extend(_parts(target))
                if target.startswith(os.sep):
                    fd = _replace(fd, os.open(os.sep, _DIRECTORY_FLAGS | _CLOEXEC))
                    where = os.sep
                continue
            step = os.open(part, _DIRECTORY_FLAGS | os.O_NOFOLLOW | _CLOEXEC, dir_fd=fd)
            fd = _replace(fd, step)
            where = os.path.normpath(os.path.join(where, part))
    except OSError as exc:
        os.close(fd)
        raise SinkError(f"cannot open {what}: {_describe(exc)}") from exc
    except BaseException:
        os.close(fd)
        raise


def _display(start: str) -> str:
    try:
        return os.path.abspath(start)
    except OSError:  # the current directory was removed
        return start


def _parts(path: str) -> list[str]:
    """The names of a path, last first (a stack to pop from)."""
    return [part for part in reversed(path.split(os.sep)) if part not in ("", os.curdir)]


def _replace(old: int, new: int) -> int:
    os.close(old)
    return new


def check_entry(info: os.stat_result, what: str, kinds: frozenset[int]) -> None:
    """Refuse a file of the wrong kind, with another name (a hard link that may have been
    planted), or, as root, owned by another user."""
    kind = stat.S_IFMT(info.st_mode)
    if kind == stat.S_IFLNK:
        raise SinkError(
            f"cannot open {what}: it is a symbolic link, which histstat does not follow "
            "(another user may have planted it); give the path of the file itself"
        )
    if kind in (stat.S_IFIFO, stat.S_IFSOCK) and kinds == LOG_KINDS:
        raise SinkError(
            f"cannot open {what}: it is a {_kind_name(info.st_mode)}, which can block "
            "histstat; to feed another program, pipe stdout to it (histstat | program)"
        )
    if kind == stat.S_IFDIR:
        raise SinkError(f"cannot open {what}: Is a directory")
    if kind not in kinds:
        raise SinkError(f"cannot open {what}: not a regular file: {_kind_name(info.st_mode)}")
    if kind == stat.S_IFREG and info.st_nlink > 1:
        raise SinkError(
            f"cannot open {what}: it has {info.st_nlink} hard links, and another user "
            "may have made one; give a file with a single name"
        )
    if _euid() == 0 and info.st_uid != 0:
        raise SinkError(
            f"cannot open {what}: it belongs to another user (uid {info.st_uid}), who "
            "could read every row or change the file; remove it or choose another path"
        )


def lstat_entry(directory: Directory, name: str) -> os.stat_result | None:
    """The entry as it is (a link not followed), or None if there is none."""
    try:
        return os.stat(name, dir_fd=directory.fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def check_path(path: str, what: str, kinds: frozenset[int]) -> None:
    """Refuse, creating nothing, what ``open_path`` would refuse."""
    if not CAN_WALK:
        return
    directory = open_directory(path, what)
    try:
        info = lstat_entry(directory, directory.name)
        if info is not None:
            check_entry(info, what, kinds)
        check_access(directory, info, what)
    except OSError as exc:
        raise SinkError(f"cannot open {what}: {_describe(exc)}") from exc
    finally:
        os.close(directory.fd)


def check_access(directory: Directory, info: os.stat_result | None, what: str) -> None:
    """Without root, say now that a file cannot be written, before any output is made."""
    if _euid() == 0 or os.access not in os.supports_dir_fd:
        return
    name, wanted = (directory.name, os.W_OK) if info is not None else (".", os.W_OK | os.X_OK)
    if not os.access(name, wanted, dir_fd=directory.fd):
        raise SinkError(f"cannot open {what}: Permission denied")


def open_checked(
    directory: Directory, name: str, what: str, flags: int, kinds: frozenset[int]
) -> tuple[int, os.stat_result]:
    """Open ``name`` in a checked directory (creating it 0600 if missing) without
    following a link or waiting for a FIFO's reader; what ``fstat`` says of the opened
    file is checked, so a swap after any earlier look cannot slip through."""
    before = lstat_entry(directory, name)
    if before is not None:
        check_entry(before, what, kinds)  # the clear reason, before opening anything
    flags |= os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | _CLOEXEC
    try:
        fd = os.open(name, flags, 0o600, dir_fd=directory.fd)
    except OSError as exc:
        raise SinkError(f"cannot open {what}: {_describe(exc)}") from exc
    try:
        info = os.fstat(fd)
        check_entry(info, what, kinds)
        os.set_blocking(fd, True)  # a terminal must not refuse a row with EAGAIN
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def open_path(
    path: str, what: str, flags: int, kinds: frozenset[int]
) -> tuple[int, os.stat_result]:
    """``open_checked`` from a path: (descriptor, what fstat says of it)."""
    if not CAN_WALK:  # pragma: no cover - not POSIX: no links, modes or owners to check
        try:
            fd = os.open(path, flags | os.O_CREAT, 0o600)
            return fd, os.fstat(fd)
        except OSError as exc:
            raise SinkError(f"cannot open {what}: {_describe(exc)}") from exc
    directory = open_directory(path, what)
    try:
        return open_checked(directory, directory.name, what, flags, kinds)
    finally:
        os.close(directory.fd)

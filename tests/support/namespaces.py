"""Network namespaces and cgroups that tests make for their children, and a minimal
sock_diag dump to look inside a namespace."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import struct
import sys
import uuid

import pytest

from support.children import SocketChild, child_script
from support.waiting import END_TIMEOUT, wait_for


def need_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.fail(f"{what} needs root; run the tests as root", pytrace=False)


def need_tools(*names: str) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        pytest.fail(f"these tests need {', '.join(missing)} (util-linux, iproute2)", pytrace=False)


# The child's shell brings the new namespace's loopback up, then becomes the socket child:
# unshare and sh exec, so the child's pid is the Popen's.
_IN_NEW_NETNS = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$0" "$@"']


def netns_child_argv(*extra: str) -> list:
    """argv of a socket child (see support.children) alone in a new network namespace."""
    return [*_IN_NEW_NETNS, sys.executable, "-c", child_script(), *extra]


def start_netns_child() -> SocketChild:
    need_root("a child in its own network namespace")
    need_tools("unshare", "ip")
    return SocketChild(netns_child_argv())


def netns_inode(pid: int | str) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def netns_inode_if_entered(pid: int, host: int) -> int | None:
    """The child's namespace once unshare has made it (until then it is the host's)."""
    with contextlib.suppress(OSError):
        inode = netns_inode(pid)
        if inode != host:
            return inode
    return None


def socket_inodes(pid: int) -> set[int]:
    """The socket inodes among a process's descriptors."""
    found = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{name}")
            if target.startswith("socket:["):
                found.add(int(target[8:-1]))
    return found


def as_nobody(work) -> dict:
    """What ``work()`` returns (a JSON-able dict) when run in a forked child that dropped
    root for the user nobody; {} when the child failed before reporting."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(reader)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            os.write(writer, json.dumps(work()).encode())
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        seen = json.loads(pipe.read() or b"{}")
    os.waitpid(pid, 0)
    return seen


def descriptor_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


# A minimal sock_diag dump of one family's TCP sockets, written for the tests alone so
# that they do not depend on the Linux source's parser (linux/inet_diag.h).
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_REQUEST = struct.Struct("=BBBBI48x")  # inet_diag_req_v2 with a zeroed sockid
# inet_diag_msg: family, state, timer, retrans, sport, dport (big endian), src, dst
# (16 bytes each), if, cookie (8), expires, rqueue, wqueue, uid, inode.
_ANSWER = struct.Struct("=BBBB2s2s16s16sI8sIIIII")


def tcp_sockets(sock: socket.socket, family: int = socket.AF_INET) -> dict[int, tuple]:
    """inode → (laddr, lport, raddr, rport, state) of every TCP socket of ``family`` in
    the namespace of the netlink sock_diag socket ``sock``."""
    size = 4 if family == socket.AF_INET else 16
    request = _REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, 0xFFF)
    sock.settimeout(END_TIMEOUT)
    sock.send(_HEADER.pack(_HEADER.size + len(request), 20, 0x301, 1, 0) + request)
    found: dict[int, tuple] = {}
    while True:
        data = sock.recv(1 << 16)
        offset = 0
        while offset + _HEADER.size <= len(data):
            length, kind, _, _, _ = _HEADER.unpack_from(data, offset)
            if length < _HEADER.size:
                raise OSError("malformed netlink message")
            if kind == 3:  # NLMSG_DONE
                return found
            if kind == 2:  # NLMSG_ERROR
                (code,) = struct.unpack_from("=i", data, offset + _HEADER.size)
                raise OSError(-code, os.strerror(-code))
            fields = _ANSWER.unpack_from(data, offset + _HEADER.size)
            _, state, _, _, sport, dport, src, dst, *_, inode = fields
            found[inode] = (
                socket.inet_ntop(family, src[:size]),
                int.from_bytes(sport, "big"),
                socket.inet_ntop(family, dst[:size]),
                int.from_bytes(dport, "big"),
                state,
            )
            offset += (length + 3) & ~3


def cgroup2_mount() -> str:
    """Where the unified (cgroup2) hierarchy is mounted: /sys/fs/cgroup on a pure v2
    host, /sys/fs/cgroup/unified on a hybrid one."""
    with open("/proc/self/mountinfo", "rb") as handle:
        for line in handle.read().decode(errors="replace").splitlines():
            before, _, after = line.partition(" - ")
            if after.split(" ", 1)[0] == "cgroup2":
                return before.split(" ")[4].replace("\\040", " ")
    pytest.fail("these tests need a mounted cgroup2 (unified) hierarchy", pytrace=False)


@contextlib.contextmanager
def docker_like_cgroup():
    """A cgroup2 directory named like Docker's systemd-driver layout, under a private
    parent: yields (its path, the 64-hex container id). At the end its processes go back
    to the hierarchy's root and the directories are removed, even after a failure."""
    need_root("a cgroup of the test's own")
    root = cgroup2_mount()
    container = uuid.uuid4().hex + uuid.uuid4().hex
    top = os.path.join(root, f"histstat-test-{uuid.uuid4().hex[:12]}")
    slice_ = os.path.join(top, "system.slice")
    scope = os.path.join(slice_, f"docker-{container}.scope")
    os.makedirs(scope)
    try:
        yield scope, container
    finally:
        with contextlib.suppress(OSError):
            with open(os.path.join(scope, "cgroup.procs")) as handle:
                pids = handle.read().split()
            for pid in pids:
                with contextlib.suppress(OSError):
                    join_cgroup(root, int(pid))

        def removed() -> bool:
            for path in (scope, slice_, top):
                with contextlib.suppress(FileNotFoundError):
                    try:
                        os.rmdir(path)
                    except OSError:
                        return False  # busy while its last process is being reaped
            return True

        wait_for(removed, END_TIMEOUT, f"could not remove {scope}")


def join_cgroup(path: str, pid: int) -> None:
    with open(os.path.join(path, "cgroup.procs"), "w") as handle:
        handle.write(str(pid))

"""The kernel's socket destroy broadcasts, received on a thread of their own as End records."""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable

from histstat.shortage import note_shortage
from histstat.sources.base import End, Ends
from histstat.sources.sock_diag import DESTROY_GROUPS, NETLINK_SOCK_DIAG, parse_destroys

_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
# The receive buffer asked for. The kernel doubles the value and charges each event's
# whole allocation against it: about 1,280 bytes for a TCP end (measured on Linux 6.18:
# 166 ends survived a stalled reader with the default 212,992 bytes, 6,500 with 8 MiB),
# so 8 MiB (16 MiB charged) keeps about 13,000 ends for a reader that falls behind; the
# memory is taken only while they wait. SO_RCVBUFFORCE (CAP_NET_ADMIN) sets it;
# otherwise SO_RCVBUF gets at most net.core.rmem_max (doubled).
RECEIVE_BUFFER = 8 << 20
# Ends waiting for the caller, at most: what a caller that does not ask can cost (an End
# with its counters takes about 340 bytes: 11 MiB in all).
MAX_QUEUED = 1 << 15
_DATAGRAM_SIZE = 1 << 16  # a destroy message is under 400 bytes; room for any future one
_SAFETY_WAKEUP = 1000  # ms: poll() wakes this often even if the wake-up byte were lost


class DestroyWatcher:
    """Receives the destroy broadcasts of the given tables (tcp, tcp6, udp, udp6) from
    the moment ``start`` returns True, in histstat's own network namespace (``netns``),
    and in each other namespace from the moment ``join`` returns True for it. One
    daemon thread blocks in poll() on every namespace's netlink socket and a wake-up
    pipe, stamps each message with the wall-clock time it arrived and the namespace of
    the socket it came on, and queues it, so an End's ``time`` does not depend on when
    the caller asks.

    ``ends`` hands over what arrived, oldest first for each namespace; ``lost`` says the
    kernel reported ENOBUFS on any socket (its receive buffer overflowed: some
    broadcasts were dropped) or the queue reached ``max_queued``, since the previous
    call. A message is queued at most once, so an overflow loses ends but never repeats
    one.

    Only the reader thread registers and closes the sockets it polls (a descriptor
    closed under a poll() could come back as another file): ``join`` and ``leave`` hand
    it their change through the wake-up pipe. A namespace left is drained before its
    socket is closed, so the ends of a container's last moments are kept.
    """

    def __init__(
        self,
        protos: Iterable[str],
        receive_buffer: int | None = RECEIVE_BUFFER,
        force_buffer: bool = True,
        max_queued: int = MAX_QUEUED,
        clock: Callable[[], float] = time.time,
        netns: int | None = None,
    ) -> None:
        self.groups = sorted(DESTROY_GROUPS[proto] for proto in set(protos))
        self.receive_buffer = receive_buffer
        self.force_buffer = force_buffer
        self.max_queued = max_queued
        self.clock = clock
        self.netns = netns  # histstat's own namespace, stamped on the ends heard there
        self.buffer_size: int | None = None  # what the kernel granted (SO_RCVBUF)
        self.buffer_forced = False
        self.error: OSError | None = None  # why joining failed, or why the thread stopped
        self._wake: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._queue: list[End] = []
        self._lost = False
        self._running = False
        self._stopping = False
        # Guarded by _lock: namespace → its socket (None: histstat's own), and the changes
        # for the reader to make, as (namespace, socket, joined).
        self._sockets: dict[int | None, socket.socket] = {}
        self._changes: list[tuple[int | None, socket.socket, bool]] = []

    @property
    def watching(self) -> bool:
        """Joined, and the reader still runs."""
        return self._running

    @property
    def namespaces(self) -> frozenset[int]:
        """The other namespaces joined (histstat's own is not among them)."""
        with self._lock:
            return frozenset(inode for inode in self._sockets if inode is not None)

    def start(self) -> bool:
        """Join the groups and start the reader; False (with ``error`` set) when the
        kernel or the process's limits refuse it."""
        if self._thread is not None or not self.groups:
            return self._running
        sock = None
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
            self._bind(sock)
            self._wake = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            note_shortage(exc)
            self.error = exc
            if sock is not None:
                sock.close()
            return False
        self._sockets[None] = sock
        self._running = True
        self._thread = threading.Thread(target=self._read, name="histstat-destroy", daemon=True)
        try:
            self._thread.start()
        except RuntimeError as exc:  # no thread left to the process
            self._running = False
            self._thread = None
            self.error = OSError(str(exc))
            self.close()
            return False
        return True

    def join(self, netns: int, sock: socket.socket) -> bool:
        """Receive the broadcasts of namespace ``netns`` on ``sock``, a sock_diag socket
        created inside it, which the watcher now owns. Joined when this returns True, so
        a dump after it misses no end; False (the socket closed) when the reader does not
        run or the kernel refuses."""
        try:
            if not self._running:
                raise OSError("the destroy broadcasts are not received")
            self._bind(sock)
        except OSError as exc:
            note_shortage(exc)
            sock.close()
            return False
        with self._lock:
            handed = self._running and netns not in self._sockets
            if handed:  # the reader's now
                self._sockets[netns] = sock
                self._changes.append((netns, sock, True))
        if not handed:
            sock.close()
            return False
        self._wake_reader()
        return True

    def leave(self, netns: int) -> None:
        """Stop receiving namespace ``netns``'s broadcasts: its socket (which keeps the
        namespace alive) is drained and closed by the reader, at once."""
        with self._lock:
            sock = self._sockets.pop(netns, None)
            if sock is None:
                return
            handed = self._running
            if handed:
                self._changes.append((netns, sock, False))
        if handed:
            self._wake_reader()
        else:  # no reader left to poll it
            sock.close()

    def _wake_reader(self) -> None:
        if self._wake is not None:
            try:
                os.write(self._wake[1], b"x")
            except OSError:  # the pipe is full: a wake-up is already pending
                pass

    def _bind(self, sock: socket.socket) -> None:
        self._size_buffer(sock)
        # The groups are bits of the bind address (group N is bit N - 1).
        sock.bind((0, sum(1 << (group - 1) for group in self.groups)))
        sock.setblocking(False)

    def _size_buffer(self, sock: socket.socket) -> None:
        """Ask for ``receive_buffer`` bytes (None: leave the kernel's default)."""
        forced = False
        if self.receive_buffer is not None:
            if self.force_buffer:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, self.receive_buffer)
                    forced = True
                except OSError:  # EPERM without CAP_NET_ADMIN
                    pass
            if not forced:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
        if self.buffer_size is None:  # histstat's own namespace's, the first joined
            self.buffer_forced = forced
            self.buffer_size = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    def ends(self) -> Ends:
        """The ends received since the previous call, oldest first."""
        with self._lock:
            ends, self._queue = self._queue, []
            lost, self._lost = self._lost, False
        return Ends(ends, lost)

    def close(self) -> None:
        """Stop the reader and close its descriptors; prompt, as the thread is woken."""
        thread, wake = self._thread, self._wake
        self._stopping = True
        self._wake_reader()
        if thread is not None:
            thread.join()
        self._running = False
        with self._lock:
            sockets = list(self._sockets.values())
            sockets += [sock for _, sock, joined in self._changes if not joined]
            self._sockets.clear()
            self._changes.clear()
        for sock in sockets:
            sock.close()
        if wake is not None:
            os.close(wake[0])
            os.close(wake[1])
            self._wake = None

    def _read(self) -> None:
        assert self._wake is not None
        wake = self._wake[0]
        poller = select.poll()
        poller.register(wake, select.POLLIN)
        with self._lock:
            own = self._sockets[None]
        polled: dict[int, tuple[socket.socket, int | None]] = {own.fileno(): (own, self.netns)}
        poller.register(own.fileno(), select.POLLIN)
        buffer = bytearray(_DATAGRAM_SIZE)
        addresses: dict[bytes, str] = {}
        try:
            while True:
                for fd, _ in poller.poll(_SAFETY_WAKEUP):
                    if fd == wake:
                        if self._take_changes(wake, poller, polled, buffer, addresses):
                            return
                    elif fd in polled:
                        # One datagram per wake-up: the kernel sends one message per
                        # datagram, and a poll() that finds more waiting returns at once,
                        # where a recv that finds none raises (costly, at every end).
                        sock, netns = polled[fd]
                        self._receive(sock, buffer, addresses, netns)
        except Exception as exc:  # noqa: BLE001 - a thread's traceback would reach stderr
            # Not foreseen: the caller learns it from ``watching`` and ``lost``.
            self.error = exc if isinstance(exc, OSError) else OSError(str(exc))
            with self._lock:
                self._lost = True
        finally:
            # From here on ``leave`` closes sockets itself; what is still waiting to be
            # left is closed here (``close`` closes the rest).
            with self._lock:
                self._running = False
                left = [sock for _, sock, joined in self._changes if not joined]
                self._changes = [change for change in self._changes if change[2]]
            for sock in left:
                sock.close()

    def _take_changes(
        self,
        wake: int,
        poller: select.poll,
        polled: dict[int, tuple[socket.socket, int | None]],
        buffer: bytearray,
        addresses: dict[bytes, str],
    ) -> bool:
        """Empty the wake-up pipe and make the joins and leaves asked for; True when
        the watcher is closing."""
        with contextlib.suppress(BlockingIOError):
            while os.read(wake, 4096):
                pass
        if self._stopping:
            return True
        with self._lock:
            changes, self._changes = self._changes, []
        failed: BaseException | None = None
        for netns, sock, joined in changes:
            if joined:
                polled[sock.fileno()] = (sock, netns)
                poller.register(sock.fileno(), select.POLLIN)
            else:
                polled.pop(sock.fileno(), None)
                poller.unregister(sock.fileno())
                try:
                    self._drain(sock, buffer, addresses, netns)
                except Exception as exc:  # noqa: BLE001 - every other leave closes its socket first
                    failed = failed or exc
                finally:
                    sock.close()  # it alone keeps its namespace alive
        if failed is not None:
            raise failed
        return False

    def _drain(
        self,
        sock: socket.socket,
        buffer: bytearray,
        addresses: dict[bytes, str],
        netns: int | None,
    ) -> None:
        """Receive every datagram waiting, one message each."""
        while self._receive(sock, buffer, addresses, netns):
            pass

    def _receive(
        self,
        sock: socket.socket,
        buffer: bytearray,
        addresses: dict[bytes, str],
        netns: int | None,
    ) -> bool:
        """Receive one datagram, if one waits (False when none did), and queue its ends."""
        try:
            size = sock.recv_into(buffer)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:
                raise
            # The kernel dropped broadcasts; the socket itself goes on working.
            with self._lock:
                self._lost = True
            return True
        ends = parse_destroys(buffer, size, self.clock(), addresses, netns)
        if ends:
            with self._lock:
                room = self.max_queued - len(self._queue)
                if len(ends) > room:
                    ends = ends[: max(room, 0)]
                    self._lost = True
                self._queue += ends
        return True

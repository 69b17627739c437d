"""The kernel's socket destroy broadcasts, received on a thread of their own as End records."""

from __future__ import annotations

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
    the moment ``start`` returns True. A daemon thread blocks in poll() on the netlink
    socket and a wake-up pipe, stamps each message with the wall-clock time it arrived
    and queues it, so an End's ``time`` does not depend on when the caller asks.

    ``ends`` hands over what arrived, oldest first; ``lost`` says the kernel reported
    ENOBUFS (its receive buffer overflowed: some broadcasts were dropped) or the queue
    reached ``max_queued``, since the previous call. A message is queued at most once,
    so an overflow loses ends but never repeats one.
    """

    def __init__(
        self,
        protos: Iterable[str],
        receive_buffer: int | None = RECEIVE_BUFFER,
        force_buffer: bool = True,
        max_queued: int = MAX_QUEUED,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.groups = sorted(DESTROY_GROUPS[proto] for proto in set(protos))
        self.receive_buffer = receive_buffer
        self.force_buffer = force_buffer
        self.max_queued = max_queued
        self.clock = clock
        self.buffer_size: int | None = None  # what the kernel granted (SO_RCVBUF)
        self.buffer_forced = False
        self.error: OSError | None = None  # why joining failed, or why the thread stopped
        self._sock: socket.socket | None = None
        self._wake: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._queue: list[End] = []
        self._lost = False
        self._running = False

    @property
    def watching(self) -> bool:
        """Joined, and the reader still runs."""
        return self._running

    def start(self) -> bool:
        """Join the groups and start the reader; False (with ``error`` set) when the
        kernel or the process's limits refuse it."""
        if self._thread is not None or not self.groups:
            return self._running
        sock = None
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
            self._size_buffer(sock)
            # The groups are bits of the bind address (group N is bit N - 1).
            sock.bind((0, sum(1 << (group - 1) for group in self.groups)))
            sock.setblocking(False)
            self._wake = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            note_shortage(exc)
            self.error = exc
            if sock is not None:
                sock.close()
            return False
        self._sock = sock
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

    def _size_buffer(self, sock: socket.socket) -> None:
        """Ask for ``receive_buffer`` bytes (None: leave the kernel's default)."""
        if self.receive_buffer is not None:
            if self.force_buffer:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, self.receive_buffer)
                    self.buffer_forced = True
                except OSError:  # EPERM without CAP_NET_ADMIN
                    pass
            if not self.buffer_forced:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
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
        if wake is not None:
            try:
                os.write(wake[1], b"x")
            except OSError:  # the pipe is full: a wake-up is already pending
                pass
        if thread is not None:
            thread.join()
        self._running = False
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if wake is not None:
            os.close(wake[0])
            os.close(wake[1])
            self._wake = None

    def _read(self) -> None:
        assert self._sock is not None and self._wake is not None
        sock, wake = self._sock, self._wake[0]
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        poller.register(wake, select.POLLIN)
        buffer = bytearray(_DATAGRAM_SIZE)
        addresses: dict[bytes, str] = {}
        try:
            while True:
                ready = poller.poll(_SAFETY_WAKEUP)
                if any(fd == wake for fd, _ in ready):
                    return
                if ready:
                    self._drain(sock, buffer, addresses)
        except Exception as exc:  # noqa: BLE001 - a thread's traceback would reach stderr
            # Not foreseen: the caller learns it from ``watching`` and ``lost``.
            self.error = exc if isinstance(exc, OSError) else OSError(str(exc))
            with self._lock:
                self._lost = True
        finally:
            self._running = False

    def _drain(self, sock: socket.socket, buffer: bytearray, addresses: dict[bytes, str]) -> None:
        """Receive every datagram waiting, one message each."""
        while True:
            try:
                size = sock.recv_into(buffer)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                # The kernel dropped broadcasts; the socket itself goes on working.
                with self._lock:
                    self._lost = True
                continue
            ends = parse_destroys(buffer, size, self.clock(), addresses)
            if ends:
                with self._lock:
                    room = self.max_queued - len(self._queue)
                    if len(ends) > room:
                        ends = ends[: max(room, 0)]
                        self._lost = True
                    self._queue += ends

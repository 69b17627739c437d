"""Reverse DNS of remote addresses for --resolve, looked up off the poll loop and cached."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import Future
from typing import Callable

from histstat.addresses import parse_ip, unmapped

# The errors a failed reverse lookup raises: no PTR record, no resolver, or a name
# that does not decode.
_LOOKUP_ERRORS = (socket.herror, socket.gaierror, OSError, UnicodeError)


def ptr_address(address: str) -> str | None:
    """The address a PTR query is for, in canonical form; None when there is none to make.

    The zone of a link-local IPv6 address ("%eth0") names an interface of this machine,
    not part of the address; an IPv4-mapped address (a dual-stack socket's IPv4 peer) is
    the IPv4 address. Anything that is not an IP address gets no query at all: given a
    name, gethostbyaddr would first resolve it forwards.
    """
    ip = parse_ip(address)
    if ip is None:
        return None
    ip = unmapped(ip)
    if ip.is_unspecified:
        return None  # "any address" is no peer: there is nobody to name
    return str(ip)


def reverse_lookup(address: str) -> str | None:
    """The PTR name of ``address`` through the system resolver, or None when it has none."""
    try:
        name = socket.gethostbyaddr(address)[0]
    except _LOOKUP_ERRORS:
        return None
    return name or None


def _done(name: str | None) -> Future[str | None]:
    future: Future[str | None] = Future()
    future.set_result(name)
    return future


class ReverseResolver:
    """Names of remote addresses, looked up by a few daemon threads and cached.

    A PTR record is chosen by whoever owns the remote network and can claim any name (a
    bank's, this machine's own), and it is not checked against the forward zone: the
    name is a hint shown beside the address, never in its place. Each query also tells
    that network's DNS servers that this machine looked at their address, and when.

    The threads are daemons fed from a queue of our own, not a ThreadPoolExecutor, whose
    workers are joined at interpreter exit: a resolver that never answers would then
    keep histstat from exiting.
    """

    def __init__(
        self,
        workers: int = 4,
        ttl: float = 300.0,
        failure_ttl: float = 60.0,
        max_entries: int = 4096,
        lookup: Callable[[str], str | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if workers < 1 or max_entries < 1:
            raise ValueError("workers and max_entries must be at least 1")
        self._workers = workers
        self._ttl = ttl
        self._failure_ttl = failure_ttl
        self._max_entries = max_entries
        self._lookup = reverse_lookup if lookup is None else lookup
        self._clock = clock
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        # address -> (future, expiry); expiry None while the lookup is queued or running.
        # Insertion order is age, so the first entry is the one to drop.
        self._entries: dict[str, tuple[Future[str | None], float | None]] = {}
        # The queue, oldest first: a dict so that an evicted address leaves it at once.
        self._pending: dict[str, Future[str | None]] = {}
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._closed = False

    def name_of(self, address: str | None) -> Future[str | None] | None:
        """A future of the PTR name of ``address`` (str, or None when it has none / the
        lookup failed); None for no address.

        Never blocks: a cached answer comes back as an already-done future; a lookup in
        flight for the same address is shared (one query per address at a time).
        """
        if address is None:
            return None
        key = ptr_address(address)
        if key is None:
            return _done(None)
        evicted: list[Future[str | None]] = []
        with self._lock:
            if self._closed:
                return _done(None)
            entry = self._entries.get(key)
            if entry is not None:
                future, expiry = entry
                if not future.cancelled() and (expiry is None or self._clock() < expiry):
                    return future
                del self._entries[key]  # looked up again below, as the newest entry
            while len(self._entries) >= self._max_entries:
                oldest = next(iter(self._entries))
                del self._entries[oldest]
                queued = self._pending.pop(oldest, None)
                if queued is not None:
                    evicted.append(queued)
            future = Future()
            self._entries[key] = (future, None)
            self._pending[key] = future
            if len(self._threads) < self._workers and self._idle < len(self._pending):
                self._start_worker()
            self._wakeup.notify()
        # Outside the lock: a done callback that asks for another name must not deadlock.
        for queued in evicted:
            queued.set_result(None)  # dropped unasked: unknown, like a failed lookup
        return future

    def close(self) -> None:
        """Stop: queued lookups are cancelled; lookups already running are abandoned to
        their daemon threads, which never hold up the exit."""
        with self._lock:
            self._closed = True
            queued = list(self._pending.values())
            self._pending.clear()
            self._wakeup.notify_all()
        for future in queued:
            future.cancel()

    def _start_worker(self) -> None:
        thread = threading.Thread(
            target=self._work, name=f"histstat-dns-{len(self._threads)}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._closed:
                    self._idle += 1
                    self._wakeup.wait()
                    self._idle -= 1
                if self._closed:
                    return
                address = next(iter(self._pending))
                future = self._pending.pop(address)
                if not future.set_running_or_notify_cancel():
                    continue  # a caller cancelled it: nobody wants the answer
            try:
                name = self._lookup(address)
            except Exception:
                name = None  # a broken lookup is a failed one, never an error for the caller
            with self._lock:
                # The entry may have been dropped or replaced meanwhile; then no expiry.
                entry = self._entries.get(address)
                if entry is not None and entry[0] is future:
                    ttl = self._ttl if name is not None else self._failure_ttl
                    self._entries[address] = (future, self._clock() + ttl)
            future.set_result(name)

"""Reverse DNS: never blocking, one query per address, answers and failures cached a while.

Every lookup here is a fake, except one of 127.0.0.1 that /etc/hosts answers: no query
leaves this machine. Waits are on futures and events with deadlines, never fixed sleeps.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from histstat.resolve import ReverseResolver, ptr_address, reverse_lookup

WAIT = 5.0  # seconds; the longest any future or event is waited for
PROMPT = 0.2  # what "returns at once" allows, even on a loaded machine


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeLookup:
    """Answers from a table, counting every query; optionally held until ``gate`` opens."""

    def __init__(self, names: dict | None = None, gate: threading.Event | None = None) -> None:
        self.names = names or {}
        self.gate = gate
        self.calls: list[str] = []
        self.started = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, address: str) -> str | None:
        with self._lock:
            self.calls.append(address)
        self.started.set()
        if self.gate is not None:
            self.gate.wait(timeout=30)  # a daemon thread: a failed test cannot hang on it
        return self.names.get(address)


@pytest.fixture
def make():
    """Builds resolvers and closes them all, releasing any held fake lookup, at the end."""
    made: list[ReverseResolver] = []
    gates: list[threading.Event] = []

    def build(lookup: FakeLookup, **options) -> ReverseResolver:
        resolver = ReverseResolver(lookup=lookup, **options)
        made.append(resolver)
        if lookup.gate is not None:
            gates.append(lookup.gate)
        return resolver

    yield build
    for resolver in made:
        resolver.close()
    for gate in gates:
        gate.set()


def test_no_address_gets_no_future(make):
    lookup = FakeLookup()
    assert make(lookup).name_of(None) is None
    assert lookup.calls == []


def test_a_hanging_lookup_never_blocks_the_caller_nor_close(make):
    gate = threading.Event()
    lookup = FakeLookup({"192.0.2.1": "slow.example"}, gate)
    resolver = make(lookup, workers=1)

    start = time.monotonic()
    hanging = resolver.name_of("192.0.2.1")
    assert time.monotonic() - start < PROMPT
    assert not hanging.done()
    assert lookup.started.wait(WAIT)

    start = time.monotonic()
    queued = resolver.name_of("192.0.2.2")  # the only worker is stuck: this one waits
    again = resolver.name_of("192.0.2.1")
    assert time.monotonic() - start < PROMPT
    assert again is hanging and not queued.done()

    start = time.monotonic()
    resolver.close()
    assert time.monotonic() - start < PROMPT
    assert queued.cancelled()
    assert not hanging.done()  # still stuck in the lookup

    gate.set()
    assert hanging.result(timeout=WAIT) == "slow.example"
    assert lookup.calls == ["192.0.2.1"]  # the cancelled one was never asked


def test_a_closed_resolver_answers_unknown_without_asking(make):
    lookup = FakeLookup({"192.0.2.1": "host.example"})
    resolver = make(lookup)
    resolver.close()
    assert resolver.name_of("192.0.2.1").result(timeout=0) is None
    assert lookup.calls == []


HANGS_FOREVER = """
import threading
from histstat.resolve import ReverseResolver

started = threading.Event()

def lookup(address):
    started.set()
    threading.Event().wait()  # never set: a resolver that never answers

resolver = ReverseResolver(lookup=lookup)
resolver.name_of("192.0.2.1")
assert started.wait(5)
if {close}:
    resolver.close()
print("done", flush=True)
"""


@pytest.mark.parametrize("close", [True, False])
def test_a_lookup_hanging_forever_does_not_hold_up_the_exit(close):
    child = subprocess.run(
        [sys.executable, "-c", HANGS_FOREVER.format(close=close)],
        capture_output=True,
        text=True,
        timeout=10 * WAIT,
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout == "done\n"


def test_answers_are_cached_until_their_ttl(make):
    clock = FakeClock()
    lookup = FakeLookup({"192.0.2.1": "host.example"})
    resolver = make(lookup, ttl=300.0, failure_ttl=60.0, clock=clock)

    assert resolver.name_of("192.0.2.1").result(timeout=WAIT) == "host.example"
    clock.now = 299.9
    cached = resolver.name_of("192.0.2.1")
    assert cached.done() and cached.result() == "host.example"
    assert lookup.calls == ["192.0.2.1"]

    clock.now = 300.0
    lookup.names["192.0.2.1"] = "renamed.example"
    assert resolver.name_of("192.0.2.1").result(timeout=WAIT) == "renamed.example"
    assert lookup.calls == ["192.0.2.1"] * 2


def test_failures_are_cached_until_their_own_ttl(make):
    clock = FakeClock()
    lookup = FakeLookup()  # no names: every lookup fails
    resolver = make(lookup, ttl=300.0, failure_ttl=60.0, clock=clock)

    assert resolver.name_of("192.0.2.1").result(timeout=WAIT) is None
    clock.now = 59.9
    cached = resolver.name_of("192.0.2.1")
    assert cached.done() and cached.result() is None
    assert lookup.calls == ["192.0.2.1"]

    clock.now = 60.0
    lookup.names["192.0.2.1"] = "late.example"
    assert resolver.name_of("192.0.2.1").result(timeout=WAIT) == "late.example"
    assert lookup.calls == ["192.0.2.1"] * 2


def test_concurrent_requests_for_one_address_share_one_lookup(make):
    gate = threading.Event()
    lookup = FakeLookup({"192.0.2.1": "host.example", "192.0.2.2": "other.example"}, gate)
    resolver = make(lookup, workers=1)

    running = resolver.name_of("192.0.2.1")
    assert lookup.started.wait(WAIT)
    queued = resolver.name_of("192.0.2.2")  # behind the running one

    callers = 8
    barrier = threading.Barrier(callers)
    futures: list = []

    def ask() -> None:
        barrier.wait(timeout=WAIT)
        futures.append(resolver.name_of("192.0.2.1"))
        futures.append(resolver.name_of("192.0.2.2"))

    threads = [threading.Thread(target=ask) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=WAIT)
    assert {id(future) for future in futures} == {id(running), id(queued)}

    gate.set()
    assert running.result(timeout=WAIT) == "host.example"
    assert queued.result(timeout=WAIT) == "other.example"
    assert sorted(lookup.calls) == ["192.0.2.1", "192.0.2.2"]


def test_the_cache_stays_bounded(make):
    lookup = FakeLookup()
    resolver = make(lookup, max_entries=8)
    addresses = [f"10.0.{i // 256}.{i % 256}" for i in range(500)]
    for address in addresses:
        resolver.name_of(address).result(timeout=WAIT)
    assert len(resolver._entries) <= 8
    assert resolver.name_of(addresses[-1]).done()  # the newest stayed
    resolver.name_of(addresses[0]).result(timeout=WAIT)  # the oldest went: asked again
    assert lookup.calls.count(addresses[0]) == 2
    assert len(resolver._entries) <= 8


def test_queued_lookups_dropped_from_a_full_cache_become_unknown_unasked(make):
    gate = threading.Event()
    lookup = FakeLookup({f"192.0.2.{i}": f"h{i}.example" for i in range(10)}, gate)
    resolver = make(lookup, workers=1, max_entries=3)

    futures = [resolver.name_of("192.0.2.0")]
    assert lookup.started.wait(WAIT)  # the only worker is held by the first address
    futures += [resolver.name_of(f"192.0.2.{i}") for i in range(1, 10)]
    for dropped in futures[1:7]:
        assert dropped.done() and dropped.result() is None
    assert len(resolver._pending) == 3

    gate.set()
    answers = [future.result(timeout=WAIT) for future in futures[7:]]
    assert answers == ["h7.example", "h8.example", "h9.example"]
    assert futures[0].result(timeout=WAIT) == "h0.example"
    assert lookup.calls == ["192.0.2.0", "192.0.2.7", "192.0.2.8", "192.0.2.9"]


@pytest.mark.parametrize(
    ("address", "queried"),
    [
        ("fe80::1%eth0", "fe80::1"),
        ("FE80:0::1%2", "fe80::1"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("::FFFF:C000:0207", "192.0.2.7"),
        ("2001:db8::1", "2001:db8::1"),
        ("192.0.2.7", "192.0.2.7"),
    ],
)
def test_zones_are_stripped_and_mapped_addresses_asked_as_ipv4(make, address, queried):
    lookup = FakeLookup({queried: "host.example"})
    resolver = make(lookup)
    assert resolver.name_of(address).result(timeout=WAIT) == "host.example"
    assert resolver.name_of(queried).done()  # one cache entry for both spellings
    assert lookup.calls == [queried]


@pytest.mark.parametrize("address", ["", "*", "example.com", "0.0.0.0", "::", "1.2.3.4.5"])
def test_what_is_no_peer_address_is_never_asked(make, address):
    lookup = FakeLookup()
    future = make(lookup).name_of(address)
    assert future.done() and future.result() is None
    assert lookup.calls == []
    assert ptr_address(address) is None


def test_a_lookup_that_raises_resolves_to_unknown():
    calls = []

    def broken(address: str) -> str | None:
        calls.append(address)
        raise RuntimeError("resolver bug")

    resolver = ReverseResolver(lookup=broken)
    try:
        future = resolver.name_of("192.0.2.1")
        assert future.exception(timeout=WAIT) is None
        assert future.result() is None
        assert resolver.name_of("192.0.2.1").done()  # cached as a failure
        assert calls == ["192.0.2.1"]
    finally:
        resolver.close()


@pytest.mark.parametrize(
    "error",
    [socket.herror(1, "Unknown host"), socket.gaierror(-2, "Name or service not known"),
     OSError("network unreachable"), UnicodeError("bad label")],
)  # fmt: skip
def test_the_default_lookup_turns_resolver_errors_into_none(monkeypatch, error):
    def failing(address: str):
        raise error

    monkeypatch.setattr(socket, "gethostbyaddr", failing)
    assert reverse_lookup("192.0.2.1") is None


def test_the_default_lookup_takes_the_primary_name(monkeypatch):
    monkeypatch.setattr(socket, "gethostbyaddr", lambda a: ("host.example", ["alias"], [a]))
    assert reverse_lookup("192.0.2.1") == "host.example"


def _hosts_names_of_loopback() -> set:
    """Names /etc/hosts gives 127.0.0.1, when the resolver reads that file first."""
    try:
        hosts = Path("/etc/hosts").read_text().splitlines()
        nsswitch = Path("/etc/nsswitch.conf").read_text().splitlines()
    except OSError:
        return set()
    sources = next((line.split()[1:] for line in nsswitch if line.startswith("hosts:")), [])
    if sources[:1] != ["files"]:
        return set()  # the answer might come from DNS or multicast DNS, off this machine
    names = set()
    for line in hosts:
        fields = line.split("#", 1)[0].split()
        if fields and fields[0] == "127.0.0.1":
            names.update(fields[1:])
    return names


def test_the_real_lookup_names_loopback_from_etc_hosts():
    names = _hosts_names_of_loopback()
    if not names:
        pytest.skip("127.0.0.1 is not answered from /etc/hosts here")
    resolver = ReverseResolver()
    try:
        assert resolver.name_of("127.0.0.1").result(timeout=WAIT) in names
    finally:
        resolver.close()

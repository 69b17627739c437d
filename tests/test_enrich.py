"""The process cache: facts per (pid, create time), unknown fields instead of crashes."""

import os
import pwd

import psutil
import pytest

from histstat.enrich import ProcessCache, as_utf8
from histstat.records import UNKNOWN_PROCESS, ProcessFacts

# Above the kernel's pid_max, so /proc/<pid> can never exist for these fakes.
FAKE_PID = 99_999_999


class FakeProcess:
    """Stands in for psutil.Process; ``fail`` maps a method name to the error it raises."""

    reads = 0

    def __init__(self, pid, created=1000.0, name="worker", fail=None, cmdline=None):
        self.pid = pid
        self._created = created
        self._name = name
        self._fail = fail or {}
        self._cmdline = ["worker", "--serve", "8080"] if cmdline is None else cmdline

    def _answer(self, method, value):
        if method in self._fail:
            raise self._fail[method]
        return value

    def create_time(self):
        return self._answer("create_time", self._created)

    def name(self):
        FakeProcess.reads += 1
        return self._answer("name", self._name)

    def username(self):
        return self._answer("username", "bob")

    def cmdline(self):
        return self._answer("cmdline", self._cmdline)

    def exe(self):
        return self._answer("exe", "/usr/bin/worker")


def factory(*processes):
    """A psutil.Process stand-in that hands out the given processes in turn."""
    queue = list(processes)

    def make(pid):
        proc = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(proc, Exception):
            raise proc
        return proc

    return make


def test_no_pid_gives_unknown_facts():
    assert ProcessCache(process=factory(FakeProcess(FAKE_PID))).lookup(None) == UNKNOWN_PROCESS


def test_process_gone_before_lookup_gives_unknown_facts():
    cache = ProcessCache(process=factory(psutil.NoSuchProcess(FAKE_PID)))
    assert cache.lookup(FAKE_PID) == UNKNOWN_PROCESS


@pytest.mark.parametrize(
    "error",
    [
        psutil.AccessDenied(FAKE_PID),
        psutil.NoSuchProcess(FAKE_PID),
        psutil.ZombieProcess(FAKE_PID),
    ],  # fmt: skip
    ids=["access-denied", "exited-mid-lookup", "zombie"],
)
def test_one_refused_field_leaves_the_others_intact(error):
    proc = FakeProcess(FAKE_PID, fail={"cmdline": error})
    facts = ProcessCache(process=factory(proc)).lookup(FAKE_PID)
    assert facts.name == "worker"
    assert facts.user == "bob"
    assert facts.command is None


def test_command_joins_arguments_with_single_spaces():
    proc = FakeProcess(FAKE_PID, cmdline=["sh", "-c", "echo  two  spaces"])
    facts = ProcessCache(process=factory(proc)).lookup(FAKE_PID)
    assert facts.command == "sh -c echo  two  spaces"


def test_empty_command_line_is_unknown():
    facts = ProcessCache(process=factory(FakeProcess(FAKE_PID, cmdline=[]))).lookup(FAKE_PID)
    assert facts.command is None


def test_same_process_is_read_once():
    FakeProcess.reads = 0
    cache = ProcessCache(process=factory(FakeProcess(FAKE_PID)))
    first = cache.lookup(FAKE_PID)
    second = cache.lookup(FAKE_PID)
    assert first == second
    assert FakeProcess.reads == 1


def test_reused_pid_with_another_create_time_is_a_new_process():
    old = FakeProcess(FAKE_PID, created=1000.0, name="old")
    new = FakeProcess(FAKE_PID, created=2000.0, name="new")
    cache = ProcessCache(process=factory(old, new))
    assert cache.lookup(FAKE_PID).name == "old"
    assert cache.lookup(FAKE_PID).name == "new"


def test_unreadable_create_time_is_never_cached():
    hidden = FakeProcess(FAKE_PID, name="first", fail={"create_time": psutil.AccessDenied()})
    later = FakeProcess(FAKE_PID, name="second", fail={"create_time": psutil.AccessDenied()})
    cache = ProcessCache(process=factory(hidden, later))
    assert cache.lookup(FAKE_PID).name == "first"
    assert cache.lookup(FAKE_PID).name == "second"
    assert len(cache) == 0


def test_processes_without_sockets_are_forgotten():
    cache = ProcessCache(process=lambda pid: FakeProcess(pid))
    for pid in (FAKE_PID, FAKE_PID + 1, FAKE_PID + 2):
        cache.lookup(pid)
    cache.retain({FAKE_PID + 1})
    assert len(cache) == 1
    cache.retain(set())
    assert len(cache) == 0


def test_real_process_facts_match_the_kernel():
    cache = ProcessCache()
    facts = cache.lookup(os.getpid())
    hashes = cache.hashes(os.getpid(), facts)
    with open("/proc/self/cmdline", "rb") as handle:
        argv = handle.read().rstrip(b"\0").split(b"\0")
    assert facts.command == " ".join(os.fsdecode(arg) for arg in argv)
    assert facts.user == pwd.getpwuid(os.geteuid()).pw_name
    assert facts.exe == os.readlink("/proc/self/exe")
    assert facts.name == psutil.Process().name()
    assert hashes is None  # hashing is off unless asked for
    assert isinstance(facts, ProcessFacts)


def test_text_decoded_as_ascii_is_read_again_as_utf8():
    # What psutil hands over under LC_ALL=C without UTF-8 mode: every high byte escaped.
    as_ascii = b"caf\xc3\xa9 \xf0\x9f\x98\x80 \xff".decode("ascii", "surrogateescape")
    assert as_utf8(as_ascii) == "café \U0001f600 \udcff"  # only the bad byte stays escaped
    assert as_utf8("plain") == "plain" and as_utf8(None) is None

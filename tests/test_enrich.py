"""The process cache: facts per (pid, create time), unknown fields instead of crashes."""

import contextlib
import datetime
import os
import pwd
import subprocess
import sys

import psutil
import pytest

from histstat.enrich import (
    COMMAND_MARKER,
    ProcessCache,
    _linux_arguments,
    as_utf8,
    cut_arguments,
    cut_command,
    read_linux_process_facts,
    read_process_facts,
    read_process_name,
)
from histstat.records import UNKNOWN_PROCESS, ProcessFacts
from support.children import end_child
from support.namespaces import docker_like_cgroup, join_cgroup
from support.waiting import read_line

# Above the kernel's pid_max, so /proc/<pid> can never exist for these fakes.
FAKE_PID = 99_999_999


class FakeProcess:
    """Stands in for psutil.Process; ``fail`` maps a method name to the error it raises."""

    reads = 0

    def __init__(self, pid, created=1000.0, name="worker", fail=None, cmdline=None, ppid=0):
        self.pid = pid
        self._created = created
        self._name = name
        self._fail = fail or {}
        self._cmdline = ["worker", "--serve", "8080"] if cmdline is None else cmdline
        self._ppid = ppid

    def _answer(self, method, value):
        if method in self._fail:
            raise self._fail[method]
        return value

    def oneshot(self):
        return contextlib.nullcontext()

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

    def ppid(self):
        return self._answer("ppid", self._ppid)


def factory(*processes):
    """A psutil.Process stand-in that hands out the given processes in turn."""
    queue = list(processes)

    def make(pid):
        proc = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(proc, Exception):
            raise proc
        return proc

    return make


def fake_cache(process) -> ProcessCache:
    """A cache over fake processes, read through psutil's interface (the Linux reader
    reads /proc, where the fakes do not exist)."""
    return ProcessCache(process=process, read=read_process_facts, read_name=read_process_name)


def test_no_pid_gives_unknown_facts():
    assert fake_cache(factory(FakeProcess(FAKE_PID))).lookup(None) == UNKNOWN_PROCESS


def test_process_gone_before_lookup_gives_unknown_facts():
    cache = fake_cache(factory(psutil.NoSuchProcess(FAKE_PID)))
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
    facts = fake_cache(factory(proc)).lookup(FAKE_PID)
    assert facts.name == "worker"
    assert facts.user == "bob"
    assert facts.command is None


def test_command_joins_arguments_with_single_spaces():
    proc = FakeProcess(FAKE_PID, cmdline=["sh", "-c", "echo  two  spaces"])
    facts = fake_cache(factory(proc)).lookup(FAKE_PID)
    assert facts.command == "sh -c echo  two  spaces"


def test_empty_command_line_is_unknown():
    facts = fake_cache(factory(FakeProcess(FAKE_PID, cmdline=[]))).lookup(FAKE_PID)
    assert facts.command is None


def test_same_process_is_read_once():
    FakeProcess.reads = 0
    cache = fake_cache(factory(FakeProcess(FAKE_PID)))
    first = cache.lookup(FAKE_PID)
    second = cache.lookup(FAKE_PID)
    assert first == second
    assert FakeProcess.reads == 1


def test_reused_pid_with_another_create_time_is_a_new_process():
    old = FakeProcess(FAKE_PID, created=1000.0, name="old")
    new = FakeProcess(FAKE_PID, created=2000.0, name="new")
    cache = fake_cache(factory(old, new))
    assert cache.lookup(FAKE_PID).name == "old"
    cache.retain({FAKE_PID})  # a later poll
    cache.begin_poll()
    assert cache.lookup(FAKE_PID).name == "new"


def test_unreadable_create_time_is_never_cached():
    hidden = FakeProcess(FAKE_PID, name="first", fail={"create_time": psutil.AccessDenied()})
    later = FakeProcess(FAKE_PID, name="second", fail={"create_time": psutil.AccessDenied()})
    cache = fake_cache(factory(hidden, later))
    assert cache.lookup(FAKE_PID).name == "first"
    assert cache.lookup(FAKE_PID).name == "second"
    assert len(cache) == 0


def test_start_and_facts_of_the_same_process_reads_it_once():
    FakeProcess.reads = 0
    cache = fake_cache(factory(FakeProcess(FAKE_PID, created=1000.0)))
    created, first = cache.start_and_facts(FAKE_PID)
    assert (created, first.name) == (1000.0, "worker")
    assert cache.start_and_facts(FAKE_PID, lambda start: start == 1000.0) == (1000.0, first)
    assert cache.lookup(FAKE_PID) is first
    assert FakeProcess.reads == 1


def test_start_and_facts_refused_for_a_reused_pid_reads_nothing_of_the_new_process():
    FakeProcess.reads = 0
    old = FakeProcess(FAKE_PID, created=1000.0, name="old")
    new = FakeProcess(FAKE_PID, created=2000.0, name="new")
    cache = fake_cache(factory(old, new))
    cache.start_and_facts(FAKE_PID)
    cache.retain({FAKE_PID})  # a later poll
    cache.begin_poll()
    assert cache.start_and_facts(FAKE_PID, lambda start: start == 1000.0) == (2000.0, None)
    assert FakeProcess.reads == 1  # the old process's name only
    assert cache.lookup(FAKE_PID).name == "new"


@pytest.mark.parametrize(
    "gone",
    [
        psutil.NoSuchProcess(FAKE_PID),
        FakeProcess(FAKE_PID, fail={"create_time": psutil.NoSuchProcess(FAKE_PID)}),
        FakeProcess(FAKE_PID, fail={"create_time": psutil.AccessDenied()}),
    ],
    ids=["gone", "gone-while-read", "start-hidden"],
)
def test_start_and_facts_of_a_gone_or_hidden_process_are_unknown(gone):
    cache = fake_cache(factory(gone))
    assert cache.start_and_facts(FAKE_PID) == (None, UNKNOWN_PROCESS)
    assert len(cache) == 0


def test_a_cached_process_is_recognised_by_its_start_in_ticks_alone():
    """Where a quick start check is given (/proc's, on Linux), a cached process is not
    built again through psutil; another start (the pid reused) reads the new process."""
    ticks = {FAKE_PID: 100}
    built = []
    old = FakeProcess(FAKE_PID, created=1000.0, name="old")
    new = FakeProcess(FAKE_PID, created=2000.0, name="new")

    def process(pid):
        built.append(pid)
        return old if ticks[pid] == 100 else new

    cache = ProcessCache(process=process, read=read_process_facts, read_name=read_process_name,
                         start_ticks=ticks.get)  # fmt: skip
    created, facts = cache.start_and_facts(FAKE_PID)
    assert (created, facts.name, len(built)) == (1000.0, "old", 1)
    cache.retain({FAKE_PID})  # a later poll
    cache.begin_poll()
    assert cache.start_and_facts(FAKE_PID) == (1000.0, facts)
    assert len(built) == 1
    ticks[FAKE_PID] = 200
    cache.retain({FAKE_PID})
    cache.begin_poll()
    assert cache.start_and_facts(FAKE_PID, lambda start: start == 1000.0) == (2000.0, None)
    assert cache.lookup(FAKE_PID).name == "new"
    cache.retain({FAKE_PID})
    cache.begin_poll()
    del ticks[FAKE_PID]  # gone
    assert cache.start_and_facts(FAKE_PID) == (None, UNKNOWN_PROCESS)
    assert cache.lookup(FAKE_PID) == UNKNOWN_PROCESS


def test_a_processs_start_is_read_once_a_poll():
    """Within a poll (until ``retain``) a pid's start, once read, is not read again: the
    kernel gives a pid out again only after its whole range."""
    reads = []
    proc = FakeProcess(FAKE_PID, created=1000.0)
    cache = ProcessCache(process=factory(proc), read=read_process_facts,
                         read_name=read_process_name,
                         start_ticks=lambda pid: reads.append(pid) or 100)  # fmt: skip
    facts = cache.lookup(FAKE_PID)
    assert len(reads) == 2  # before and after its facts were read
    assert cache.start_and_facts(FAKE_PID) == (1000.0, facts)
    assert cache.lookup(FAKE_PID) is facts
    assert len(reads) == 2
    cache.retain({FAKE_PID})
    cache.begin_poll()
    assert cache.start_and_facts(FAKE_PID) == (1000.0, facts)
    assert cache.start_and_facts(FAKE_PID, lambda start: start < 1000.0) == (1000.0, None)
    assert len(reads) == 3


def test_a_pid_that_changes_hands_while_read_is_not_checked_by_its_ticks():
    """The start in ticks read before the facts is kept only when it is still the pid's
    after them: otherwise the facts may be another process's than those ticks say."""
    ticks = iter([100, 200, 100])
    built = []
    proc = FakeProcess(FAKE_PID, created=1000.0)
    cache = ProcessCache(process=lambda pid: built.append(pid) or proc, read=read_process_facts,
                         read_name=read_process_name,
                         start_ticks=lambda pid: next(ticks))  # fmt: skip
    cache.start_and_facts(FAKE_PID)  # 100 before the read, 200 after it
    # Not trusted within the poll either, and 100 again is not taken on trust.
    assert cache.start_and_facts(FAKE_PID)[0] == 1000.0
    assert len(built) == 2


def test_a_real_process_is_cached_by_its_start_and_gone_once_reaped(sleepers):
    require_linux()
    child = sleepers([sys.executable])
    reads = []

    def read(proc, limit):
        reads.append(proc.pid)
        return read_linux_process_facts(proc, limit)

    cache = ProcessCache(read=read)
    created, facts = cache.start_and_facts(child.pid)
    assert created == psutil.Process(child.pid).create_time()
    assert facts is not None and facts.name == psutil.Process(child.pid).name()
    cache.retain({child.pid})  # a later poll
    cache.begin_poll()
    assert cache.start_and_facts(child.pid) == (created, facts)
    assert reads == [child.pid]
    end_child(child)
    cache.retain({child.pid})
    cache.begin_poll()
    assert cache.start_and_facts(child.pid) == (None, UNKNOWN_PROCESS)


def test_processes_without_sockets_are_forgotten():
    cache = fake_cache(lambda pid: FakeProcess(pid))
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


def test_command_longer_than_the_limit_is_cut_with_a_marker_and_its_length():
    proc = FakeProcess(FAKE_PID, cmdline=["x" * 60, "y" * 39])  # 100 characters
    cut = ProcessCache(process=factory(proc), read=read_process_facts, command_limit=10)
    facts = cut.lookup(FAKE_PID)
    assert facts.command == "x" * 10 + COMMAND_MARKER.format(removed=90)
    assert facts.command == "xxxxxxxxxx...[+90 chars]"
    assert facts.command_length == 100
    whole = ProcessCache(process=factory(proc), read=read_process_facts, command_limit=0)
    assert whole.lookup(FAKE_PID)[2:5] == (proc.cmdline()[0] + " " + "y" * 39, None, 100)
    exact = ProcessCache(process=factory(proc), read=read_process_facts, command_limit=100)
    assert exact.lookup(FAKE_PID).command == " ".join(proc.cmdline())


def test_cut_counts_characters_not_bytes():
    command = "\u00e9" * 8 + "\udcff" * 4  # 16 + 4 bytes of command line, 12 characters
    assert cut_command(command, 10) == ("\u00e9" * 8 + "\udcff" * 2 + "...[+2 chars]", 12)
    assert cut_command(command, 12) == (command, 12)
    assert cut_command(None, 10) == (None, None)


def test_empty_process_name_is_kept_apart_from_unknown():
    assert fake_cache(factory(FakeProcess(FAKE_PID, name=""))).lookup(FAKE_PID).name == ""
    hidden = FakeProcess(FAKE_PID, fail={"name": psutil.AccessDenied(FAKE_PID)})
    assert fake_cache(factory(hidden)).lookup(FAKE_PID).name is None


def start_sleeper(argv: list, comm: bytes | None = None, executable=None) -> subprocess.Popen:
    """A child that renames itself to ``comm``, says so, and waits for its stdin to close."""
    rename = "" if comm is None else (
        f"fd = os.open('/proc/self/comm', os.O_WRONLY); os.write(fd, {comm!r}); os.close(fd)\n"
    )  # fmt: skip
    script = f"import os, sys\n{rename}print('ready', flush=True)\nsys.stdin.read()\n"
    proc = subprocess.Popen(
        [argv[0], "-c", script, *argv[1:]],
        executable=executable or sys.executable,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert read_line(proc.stdout) == b"ready\n"
    return proc


@pytest.fixture
def sleepers():
    started: list = []

    def start(*args, **kwargs) -> subprocess.Popen:
        started.append(start_sleeper(*args, **kwargs))
        return started[-1]

    yield start
    for proc in started:
        end_child(proc)


def require_linux() -> None:
    if not sys.platform.startswith("linux"):
        pytest.fail("this test reads /proc: it needs Linux")


def test_linux_reader_keeps_carriage_returns_that_psutil_turns_into_newlines(sleepers):
    require_linux()
    proc = sleepers([sys.executable, "cr\rhere", "crlf\r\nthere", b"bad-\xff", "caf\u00e9"])
    facts = read_linux_process_facts(psutil.Process(proc.pid))
    with open(f"/proc/{proc.pid}/cmdline", "rb") as handle:
        raw = handle.read()
    assert facts.command == raw[:-1].replace(b"\0", b" ").decode("utf-8", "surrogateescape")
    assert facts.command.endswith(" cr\rhere crlf\r\nthere bad-\udcff caf\u00e9")
    assert facts.command_length == len(facts.command)
    through_psutil = read_process_facts(psutil.Process(proc.pid))
    assert through_psutil.command.endswith(" cr\nhere crlf\nthere bad-\udcff caf\u00e9")


def test_linux_reader_names_processes_as_psutil_does(sleepers):
    require_linux()
    short = sleepers([sys.executable], comm=b"worker")
    long_name = b"a-fifteen-bytes"
    extended = sleepers([f"/opt/{long_name.decode()}-daemon"], comm=long_name)
    for proc, name in ((short, "worker"), (extended, "a-fifteen-bytes-daemon")):
        facts = read_linux_process_facts(psutil.Process(proc.pid))
        assert facts.name == name == psutil.Process(proc.pid).name()
        assert facts.command == " ".join(psutil.Process(proc.pid).cmdline())


def test_a_first_argument_longer_than_any_file_name_is_not_taken_as_the_name(sleepers):
    require_linux()
    long_name = b"a-fifteen-bytes"
    proc = sleepers(["/opt/" + long_name.decode() + "x" * 1000], comm=long_name)
    assert len(psutil.Process(proc.pid).name()) > 1000  # psutil would take it
    assert read_linux_process_facts(psutil.Process(proc.pid)).name == long_name.decode()


def test_linux_reader_keeps_an_empty_name_and_undecodable_bytes(sleepers):
    require_linux()
    empty = sleepers([sys.executable], comm=b"")
    assert read_linux_process_facts(psutil.Process(empty.pid)).name == ""
    bad = sleepers([sys.executable], comm=b"x\xffy")
    assert read_linux_process_facts(psutil.Process(bad.pid)).name == "x\udcffy"


@pytest.mark.parametrize(
    ("raw", "joined", "first"),
    [
        (b"ls\0-l\0", b"ls -l", b"ls"),
        (b"ls\0\0", b"ls ", b"ls"),  # an empty argument
        (b"nginx: master process\0", b"nginx: master process", b"nginx:"),  # setproctitle
        (b"chrome --type=renderer", b"chrome --type=renderer", b"chrome"),
        (b"a b \0c", b"a b \0c", b"a"),  # not NUL-terminated: NUL is not a separator
        (b"\0", b"", b""),
    ],
)
def test_arguments_split_as_psutil_splits_them(raw, joined, first):
    assert _linux_arguments(raw) == (joined, first)


@pytest.mark.parametrize("limit", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 50])
def test_arguments_are_cut_where_the_command_is_cut(limit):
    args = ["ab", "", "cd", "efgh"]  # "ab  cd efgh": 11 characters
    cut = cut_arguments(args, limit)
    command, _ = cut_command(" ".join(args), limit)
    assert " ".join(cut) == command
    if limit and limit < 11:
        assert cut[-1].endswith(COMMAND_MARKER.format(removed=11 - limit))
        assert len(cut) <= len(args)
    else:
        assert cut == tuple(args)
    assert cut_arguments(None, limit) is None


def test_facts_carry_arguments_cut_like_the_command():
    proc = FakeProcess(FAKE_PID, cmdline=["x" * 6, "y y", "z" * 90])  # 101 characters
    cut = ProcessCache(process=factory(proc), read=read_process_facts, command_limit=10)
    facts = cut.lookup(FAKE_PID)
    assert facts.args == ("x" * 6, "y y" + COMMAND_MARKER.format(removed=91))
    assert " ".join(facts.args) == facts.command
    assert facts.args_count == 3  # the process's argc, not what the limit kept
    whole = ProcessCache(process=factory(proc), read=read_process_facts, command_limit=0)
    assert whole.lookup(FAKE_PID).args == tuple(proc.cmdline())
    unknown = FakeProcess(FAKE_PID, fail={"cmdline": psutil.AccessDenied(FAKE_PID)})
    assert fake_cache(factory(unknown)).lookup(FAKE_PID).args is None


def family(*processes):
    """A psutil.Process stand-in that finds each of ``processes`` by its pid."""
    by_pid = {proc.pid: proc for proc in processes}

    def make(pid):
        if pid not in by_pid:
            raise psutil.NoSuchProcess(pid)
        return by_pid[pid]

    return make


def test_parent_pid_name_and_start_are_read_once_per_process():
    parent = FakeProcess(FAKE_PID, created=900.0, name="bash")
    child = FakeProcess(FAKE_PID + 1, created=1000.5, name="curl", ppid=FAKE_PID)
    cache = fake_cache(family(parent, child))
    FakeProcess.reads = 0
    facts = cache.lookup(FAKE_PID + 1)
    assert (facts.ppid, facts.parent) == (FAKE_PID, "bash")
    assert facts.started == datetime.datetime.fromtimestamp(1000.5).astimezone()
    assert facts.started.utcoffset() is not None
    sibling = FakeProcess(FAKE_PID + 2, created=1001.0, name="wget", ppid=FAKE_PID)
    cache._process = family(parent, child, sibling)
    assert cache.lookup(FAKE_PID + 2).parent == "bash"
    assert FakeProcess.reads == 3  # the parent's name once, each child's once


def test_a_parent_that_owns_sockets_is_named_from_its_own_entry():
    parent = FakeProcess(FAKE_PID, created=900.0, name="sshd")
    child = FakeProcess(FAKE_PID + 1, created=1000.0, name="bash", ppid=FAKE_PID)
    cache = fake_cache(family(parent, child))
    cache.lookup(FAKE_PID)
    FakeProcess.reads = 0
    assert cache.lookup(FAKE_PID + 1).parent == "sshd"
    assert FakeProcess.reads == 1  # the child's name only


def test_a_parent_started_after_its_child_is_another_process():
    """The parent died and its pid went to a newer process: that one is not named."""
    impostor = FakeProcess(FAKE_PID, created=2000.0, name="impostor")
    child = FakeProcess(FAKE_PID + 1, created=1000.0, name="orphan", ppid=FAKE_PID)
    facts = fake_cache(family(impostor, child)).lookup(FAKE_PID + 1)
    assert (facts.ppid, facts.parent) == (FAKE_PID, None)


@pytest.mark.parametrize(
    "parent",
    [psutil.NoSuchProcess(FAKE_PID), FakeProcess(FAKE_PID, fail={"name": psutil.AccessDenied()})],
    ids=["gone", "name-hidden"],
)
def test_a_parent_gone_or_hidden_leaves_its_name_unknown(parent):
    child = FakeProcess(FAKE_PID + 1, created=1000.0, ppid=FAKE_PID)

    def make(pid):
        found = child if pid == FAKE_PID + 1 else parent
        if isinstance(found, Exception):
            raise found
        return found

    facts = fake_cache(make).lookup(FAKE_PID + 1)
    assert (facts.ppid, facts.parent, facts.name) == (FAKE_PID, None, "worker")


def test_parent_names_are_forgotten_with_their_children():
    parent = FakeProcess(FAKE_PID, created=900.0, name="bash")
    child = FakeProcess(FAKE_PID + 1, created=1000.0, ppid=FAKE_PID)
    cache = fake_cache(family(parent, child))
    cache.lookup(FAKE_PID + 1)
    cache.retain({FAKE_PID + 1})
    FakeProcess.reads = 0
    cache._entries.clear()  # the child read again: its parent's name is still known
    cache.lookup(FAKE_PID + 1)
    assert FakeProcess.reads == 1
    cache.retain(set())
    assert (len(cache), cache._parent_names) == (0, {})


def test_real_child_has_its_parent_arguments_and_start(sleepers):
    hostile = ["two  spaces", "tab\there", "nl\nline", b"bad-\xff", "\x1b[2J", ""]
    proc = sleepers([sys.executable, *hostile])
    facts = ProcessCache().lookup(proc.pid)
    assert facts.ppid == os.getpid()
    assert facts.parent == ProcessCache().lookup(os.getpid()).name == psutil.Process().name()
    assert facts.args[-len(hostile) :] == (
        "two  spaces", "tab\there", "nl\nline", "bad-\udcff", "\x1b[2J", "",
    )  # fmt: skip
    assert " ".join(facts.args) == facts.command
    created = psutil.Process(proc.pid).create_time()
    assert facts.started == datetime.datetime.fromtimestamp(created).astimezone()
    assert abs(facts.started.timestamp() - datetime.datetime.now().timestamp()) < 600


CONTAINER = "4f1d" * 16  # a runtime's 64 hex digits


def test_a_young_processs_container_is_read_again_until_it_settles():
    # A runtime forks, then moves the child into its container's cgroup: what the first
    # read saw may change while the process is young, never after.
    clock = [1000.0]
    cgroup = {FAKE_PID: None}
    proc = FakeProcess(FAKE_PID, created=1000.0)
    reads = []

    def read_container(pid):
        reads.append(pid)
        return cgroup[pid]

    cache = ProcessCache(process=factory(proc), read=read_process_facts,
                         read_name=read_process_name, read_container=read_container,
                         clock=lambda: clock[0])  # fmt: skip
    assert cache.lookup(FAKE_PID).container is None
    cgroup[FAKE_PID] = CONTAINER
    clock[0] = 1001.0
    assert cache.lookup(FAKE_PID).container == CONTAINER
    clock[0] = 1002.5  # old enough: read once more, then never again
    assert cache.lookup(FAKE_PID).container == CONTAINER
    cgroup[FAKE_PID] = "e" * 64
    assert cache.lookup(FAKE_PID).container == CONTAINER
    assert len(reads) == 2


def test_a_settled_process_is_read_with_its_container_once():
    reads = []
    proc = FakeProcess(FAKE_PID, created=1000.0)
    cache = ProcessCache(process=factory(proc), read=read_process_facts,
                         read_name=read_process_name, read_container=reads.append,
                         clock=lambda: 5000.0)  # fmt: skip
    cache.lookup(FAKE_PID)
    cache.lookup(FAKE_PID)
    assert reads == []  # the reader's own read was the only one


def test_a_process_in_a_docker_like_cgroup_has_that_container_in_its_facts():
    with docker_like_cgroup() as (scope, container):
        child = subprocess.Popen(["cat"], stdin=subprocess.PIPE)
        try:
            join_cgroup(scope, child.pid)
            facts = ProcessCache().lookup(child.pid)
            psutil_facts = read_process_facts(psutil.Process(child.pid))
        finally:
            child.stdin.close()
            child.wait()
    assert (facts.name, facts.container) == ("cat", container)
    assert psutil_facts.container is None  # the portable reader knows no containers


def test_a_step_of_the_wall_clock_makes_the_cache_start_over():
    """psutil's start is its boot time plus the start in ticks, and the boot time moves
    with the wall clock: after a step, a process known by its ticks alone would keep a
    start off by the step (an owner then taken for a newer process). The cache starts
    over instead, and reads the start anew."""
    boot = [500.0]
    proc = FakeProcess(FAKE_PID, created=1000.0, name="implant")
    cache = ProcessCache(process=factory(proc), read=read_process_facts,
                         read_name=read_process_name, start_ticks=lambda pid: 100,
                         boot_clock=lambda: boot[0])  # fmt: skip
    cache.begin_poll()
    assert cache.start_and_facts(FAKE_PID)[0] == 1000.0
    boot[0] += 0.3  # the clock slewed: the same process, its start cached
    proc._created = 400.0  # (what psutil would say only after a step)
    cache.begin_poll()
    assert cache.start_and_facts(FAKE_PID)[0] == 1000.0
    boot[0] -= 600.0  # set back ten minutes
    cache.begin_poll()
    assert cache.start_and_facts(FAKE_PID)[0] == 400.0
    assert cache.lookup(FAKE_PID).name == "implant"


def test_a_poll_cut_short_leaves_no_start_trusted_into_the_next():
    """A start read in a poll that ended early (an error before ``retain``) is read again
    in the next: only ``begin_poll`` says a poll began."""
    ticks = {FAKE_PID: 100}
    old = FakeProcess(FAKE_PID, created=1000.0, name="old")
    new = FakeProcess(FAKE_PID, created=2000.0, name="new")
    cache = ProcessCache(process=lambda pid: old if ticks[pid] == 100 else new,
                         read=read_process_facts, read_name=read_process_name,
                         start_ticks=ticks.get)  # fmt: skip
    cache.begin_poll()
    assert cache.lookup(FAKE_PID).name == "old"
    ticks[FAKE_PID] = 200  # the pid taken by another process; no retain came
    cache.begin_poll()
    assert cache.lookup(FAKE_PID).name == "new"

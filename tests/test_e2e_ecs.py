"""End-to-end: --ecs documents and the parent process, with the installed histstat.

A parent with a hostile name starts a child that makes a loopback connection to its own
listener; histstat (--ecs, and -j) watches that port only. Everything runs on loopback,
waits by polling with a deadline and is bounded in time; the only PTR lookups are for
127.0.0.1, which /etc/hosts answers.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import socket
import subprocess
import sys
import time

import psutil
import pytest
from geoip_db import write_asn_db, write_country_db

from histstat import __version__
from histstat.output.ecs import ECS_VERSION
from support.children import USER, end_child, new_marker, new_tag, one_line_script, renaming
from support.ecs_fields import problems
from support.histstat import INTERVAL, INTERVAL_SECONDS, assert_clean_end
from support.waiting import read_line

HOST = "127.0.0.1"
SLACK = 1.0  # seconds a loaded machine may add to what the interval bounds

# The child: a listener on 127.0.0.1, driven line by line on its stdin.
#   (start)  -> "ready LPORT PID"
#   connect  -> "open CPORT": a client connected to the listener, and its accepted end
#   close    -> "closed": both ends closed
#   (EOF)    -> exits
CHILD_SOURCE = """
import os
import socket
import sys

server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(4)
print("ready", server.getsockname()[1], os.getpid(), flush=True)
sys.stdin.readline()
client = socket.create_connection(server.getsockname())
accepted, _ = server.accept()
print("open", client.getsockname()[1], flush=True)
sys.stdin.readline()
client.close()
accepted.close()
print("closed", flush=True)
sys.stdin.read()
"""

# The parent: renames itself, then runs the child on its own stdin and stdout.
PARENT_SOURCE = """
import subprocess
import sys

subprocess.run([sys.executable, "-c", sys.argv[1], sys.argv[2]])
"""


class Family:
    """A parent named ``parent_name`` (bytes a process may choose) and its socket child."""

    def __init__(self, parent_comm: bytes) -> None:
        self.child_argv = [sys.executable, "-c", one_line_script(CHILD_SOURCE), new_marker()]
        parent_script = one_line_script(renaming(parent_comm) + PARENT_SOURCE)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", parent_script, *self.child_argv[2:]],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        words = read_line(self.proc.stdout).split()
        assert words[0] == b"ready", words
        self.lport, self.child_pid = int(words[1]), int(words[2])
        self.parent_pid = self.proc.pid
        self.cport: int | None = None

    def tell(self, command: str) -> list[bytes]:
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        return read_line(self.proc.stdout).split()

    def stop(self) -> None:
        end_child(self.proc)


@pytest.fixture
def family():
    started: list = []

    def start(parent_comm: bytes) -> Family:
        started.append(Family(parent_comm))
        return started[-1]

    yield start
    for one in started:
        one.stop()


@pytest.fixture
def geoip_files(tmp_path) -> list:
    return [
        write_country_db(tmp_path / "country.mmdb", {"127.0.0.0/8": "ZZ"}),
        write_asn_db(tmp_path / "asn.mmdb", {"127.0.0.0/8": (64512, "Loopback Net")}),
    ]


def reference_community_id(saddr: str, sport: int, daddr: str, dport: int) -> str:
    try:
        import communityid
    except ImportError:
        pytest.fail("the reference package communityid is missing: pip install -e '.[test]'")
    flow = communityid.FlowTuple.make_tcp(saddr, daddr, sport, dport)
    return communityid.CommunityID().calc(flow)


def file_hashes(path: str) -> tuple[str, str]:
    with open(path, "rb") as handle:
        data = handle.read()
    return hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest()


def action_of(doc: dict) -> str:
    """An ECS document's event.action; "" for anything else (a -j row's event is text)."""
    event = doc.get("event")
    return event.get("action", "") if isinstance(event, dict) else ""


def of_child(doc: dict, pid: int, action: str) -> bool:
    return doc.get("process", {}).get("pid") == pid and action_of(doc) == action


def test_ecs_documents_of_a_child_of_a_known_parent(family, run_histstat, geoip_files):
    tag = new_tag()
    parent_comm = b"ecs\x1b\xff" + tag.encode()  # an escape sequence, a byte not UTF-8
    parent_name = "ecs\x1b\\xff" + tag  # its true text in JSON: the bad byte as \xff
    kin = family(parent_comm)
    geoip = [arg for path in geoip_files for arg in ("--geoip", path)]
    watch = ("--closed", *INTERVAL, "--port", str(kin.lport))
    ecs = run_histstat("--ecs", "--hash", "-r", *geoip, *watch, output="json")
    js = run_histstat("-j", *watch)
    for histstat in (ecs, js):  # both know the listener before the connection is made
        histstat.wait_for_rows(lambda row: row.get("status") == "LISTEN"
                               or action_of(row) == "listen")  # fmt: skip
    connected = time.monotonic()
    kin.cport = int(kin.tell("connect")[1])
    opened = ecs.wait_for_rows(lambda doc: of_child(doc, kin.child_pid, "connection-open"), 2)
    js.wait_for_rows(lambda row: row["pid"] == kin.child_pid and row["rport"] == kin.lport)
    assert kin.tell("close") == [b"closed"]
    lifetime = time.monotonic() - connected
    ecs.wait_for_rows(lambda doc: of_child(doc, kin.child_pid, "connection-close"), 2)
    js.wait_for_rows(lambda row: row["event"] == "close" and row["pid"] == kin.child_pid, 2)
    child = psutil.Process(kin.child_pid)
    created, exe_hashes = child.create_time(), file_hashes(f"/proc/{kin.child_pid}/exe")
    try:
        rhost = socket.gethostbyaddr(HOST)[0]
    except OSError:
        rhost = None
    results = {"ecs": ecs.stop(), "json": js.stop()}
    for result in results.values():
        assert_clean_end(result)
    docs = results["ecs"].rows
    rows = results["json"].rows

    # Every document: one line of ECS fields of the right types, only our port's.
    assert len(docs) == len(results["ecs"].lines)
    for doc in docs:
        assert problems(doc) == [], doc
        assert doc["ecs"]["version"] == ECS_VERSION
        assert doc["agent"] == {"type": "histstat", "version": __version__}
        assert doc["host"] == {"name": socket.gethostname(), "hostname": socket.gethostname()}

    (listener,) = [d for d in docs if action_of(d) == "listen"]
    assert listener["server"] == {"ip": HOST, "port": kin.lport}
    assert listener["event"]["type"] == ["info"]  # it was there before histstat
    assert listener["histstat"]["duration_from_start"] is True
    assert "source" not in listener and "destination" not in listener

    flow = reference_community_id(HOST, kin.cport, HOST, kin.lport)
    remote = {
        "geo": {"country_iso_code": "ZZ"},
        "as": {"number": 64512, "organization": {"name": "Loopback Net"}},
        **({"domain": rhost} if rhost else {}),
    }
    closes = [d for d in docs if of_child(d, kin.child_pid, "connection-close")]
    ends = [d for d in opened + closes if d["histstat"]["status"] == "ESTABLISHED"]
    # Each end's payload bytes, as the -j rows of the same ends say (null without end
    # events: the psutil source).
    sent = {
        row["lport"]: (row["bytes_sent"], row["bytes_received"])
        for row in rows
        if row["event"] == "close" and row["pid"] == kin.child_pid
    }
    for doc in ends:
        # Both ends' documents name the client as source, the listener's port as
        # destination; the remote side (the other end) carries its name and place.
        egress = doc["network"]["direction"] == "egress"
        source = {"ip": HOST, "port": kin.cport, **({} if egress else remote)}
        destination = {"ip": HOST, "port": kin.lport, **(remote if egress else {})}
        network = {
            "transport": "tcp", "type": "ipv4", "direction": doc["network"]["direction"],
            "community_id": flow,
        }  # fmt: skip
        mine, theirs = sent.get(kin.cport if egress else kin.lport, (None, None))
        if doc in closes and mine is not None:  # the initiator's bytes are the source's
            source["bytes"], destination["bytes"] = (mine, theirs) if egress else (theirs, mine)
            network["bytes"] = mine + theirs
        assert doc["source"] == source, doc
        assert doc["destination"] == destination, doc
        assert doc["network"] == network, doc
        assert doc["process"] == {
            "pid": kin.child_pid,
            "name": child.name(),
            "executable": os.readlink(f"/proc/{kin.child_pid}/exe"),
            "command_line": " ".join(kin.child_argv),
            "args": kin.child_argv,
            "args_count": len(kin.child_argv),
            "start": doc["process"]["start"],
            "parent": {"pid": kin.parent_pid, "name": parent_name},
            "hash": dict(zip(("md5", "sha256"), exe_hashes)),
        }
        start = datetime.datetime.fromisoformat(doc["process"]["start"])
        assert abs(start.timestamp() - created) < 0.01
        assert doc["user"] == {"name": USER, "id": str(os.geteuid())}
        assert doc["related"]["ip"] == [HOST] and doc["related"]["user"] == [USER]
        # A poll that sees the socket before its holder's descriptor is scanned leaves
        # the kernel's connect event (the client) or the listener (the accepted end) to
        # name the same process.
        assert doc["histstat"]["attribution"] in ("socket", "connect", "listener"), doc
    for phase, group in (("start", opened), ("end", closes)):
        ours = [d for d in group if d["histstat"]["status"] == "ESTABLISHED"]
        assert {d["network"]["direction"] for d in ours} == {"egress", "ingress"}, group
        assert all(d["event"]["type"] == ["connection", phase] for d in group)

    for doc in closes:
        event = doc["event"]
        assert isinstance(event["duration"], int) and event["duration"] >= 0
        end = datetime.datetime.fromisoformat(event["end"])
        begin = datetime.datetime.fromisoformat(event["start"])
        assert (end - begin) // datetime.timedelta(microseconds=1) * 1000 == event["duration"]
        assert event["duration"] <= (lifetime + 2 * INTERVAL_SECONDS + SLACK) * 1e9
        assert doc["@timestamp"] == event["end"]

    # -j names the same parent.
    ours = [row for row in rows if row["pid"] == kin.child_pid]
    assert ours, rows
    for row in ours:
        assert (row["ppid"], row["parent"]) == (kin.parent_pid, parent_name), row
    assert all("\x1b" not in line for line in results["json"].lines)  # escaped, not raw

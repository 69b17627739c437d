"""End-to-end: filters, capture limits, chosen fields, CSV and the terminal view (issue 3).

The installed histstat runs against real loopback sockets held by real child processes.
The machine has other sockets too, whose processes may put anything in their names and
command lines: each run is narrowed to the test's own children (--pid, or --name for the
cases that test --pid), so histstat never formats another process's rows, and every row
printed must obey the filter under test.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import ipaddress
import json
import os
import pty
import pwd
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
import unicodedata
from dataclasses import dataclass

import psutil
import pytest

from support.children import USER, SocketChild, child_argv, new_marker, new_tag, one_line_script
from support.contract import COLUMNS, KEY_FIELDS, PRETTY_COLUMNS
from support.histstat import (
    ENDPOINT_COLUMNS,
    INTERVAL,
    UTF8_ENV,
    connection_key,
    histstat_command,
    parse_pretty_line,
    run_once,
)
from support.waiting import DEFAULT_TIMEOUT, END_TIMEOUT

ANSI = re.compile(r"\x1b\[[0-9;]*m")
ELLIPSIS = "\u2026"
STYLES = {"plain": (), "pretty": ("-p",), "json": ("-j",), "csv": ("--csv",)}
# The csv module refuses fields over 128 KiB by default; a command line may be longer.
csv.field_size_limit(1 << 30)


# --------------------------------------------------------------------------- helpers


def clean_run(args, **kwargs) -> subprocess.CompletedProcess:
    """histstat run to its end (``--once`` and friends), which must exit 0 cleanly."""
    done = run_once(args, **kwargs)
    err = done.stderr.decode(errors="replace")
    assert done.returncode == 0, f"histstat {args} exited {done.returncode}: {err}"
    assert "Traceback" not in err, err
    return done


def text_of(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def json_rows(data: bytes) -> list:
    return [json.loads(line) for line in text_of(data).splitlines() if line]


def once_json(*args) -> list:
    return json_rows(clean_run(["--once", "-j", *args]).stdout)


def csv_records(data: bytes) -> list:
    return list(csv.reader(io.StringIO(text_of(data), newline="")))


def row_id(row: dict) -> tuple:
    """pid and connection key: one row's identity, comparable across formats."""
    return (int(row["pid"]),) + connection_key(row)


def sorted_ids(rows) -> list:
    return sorted((row_id(row) for row in rows), key=str)


def exe_hashes(pid: int) -> tuple:
    with open(f"/proc/{pid}/exe", "rb") as handle:
        data = handle.read()
    return hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest()


def display_width(text: str) -> int:
    """Terminal columns of ``text`` without its colour codes."""
    width = 0
    for char in ANSI.sub("", text):
        if unicodedata.combining(char):
            continue
        width += 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1
    return width


def in_networks(address: str | None, *networks: str) -> bool:
    """The issue's address semantics: IPv4-mapped IPv6 is its IPv4 address."""
    if address is None:
        return False
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for text in networks:
        net = ipaddress.ip_network(text, strict=False)
        if net.version == 6 and net.subnet_of(ipaddress.ip_network("::ffff:0:0/96")):
            net = ipaddress.ip_network(
                f"{net.network_address.ipv4_mapped}/{net.prefixlen - 96}", strict=False
            )
        if ip.version == net.version and ip in net:
            return True
    return False


def hold_on_pty(args, cols: int, rows: int = 24, env: dict | None = None, timeout=DEFAULT_TIMEOUT):
    """Run histstat to its end with stdout on a pseudo-terminal of ``rows`` x ``cols``;
    returns (exit status, what the terminal received with CRLF as LF, stderr)."""
    master, slave = pty.openpty()
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        proc = subprocess.Popen(
            [histstat_command(), *[str(arg) for arg in args]],
            stdin=subprocess.DEVNULL,
            stdout=slave,
            stderr=subprocess.PIPE,
            env=env,
        )
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    received = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"histstat on a pty did not end within {timeout:g} s: {received!r}")
            readable, _, _ = select.select([master], [], [], remaining)
            if not readable:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every holder of the terminal's slave end is gone
                break
            if not chunk:
                break
            received += chunk
        rc = proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
        err = proc.stderr.read().decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(END_TIMEOUT)
        proc.stderr.close()
        os.close(master)
    return rc, received.decode("utf-8", "replace").replace("\r\n", "\n"), err


def no_color_env(**extra) -> dict:
    env = {key: value for key, value in UTF8_ENV.items() if key != "NO_COLOR"}
    env.update(extra)
    return env


# --------------------------------------------------------------------------- children


@dataclass
class Kid:
    child: SocketChild
    name: str  # the process name (comm) it gave itself
    user: str

    @property
    def pid(self) -> int:
        return self.child.pid

    def rows(self) -> list:
        """The rows histstat must report for this child, as JSON would carry them."""
        return [
            dict(zip(KEY_FIELDS, key), pid=self.pid, pname=self.name, user=self.user)
            for key in self.child.connections()
        ]


@dataclass
class Kids:
    a: Kid
    b: Kid
    c: Kid | None  # a child of another user (needs root), else None
    tag: str

    @property
    def all(self) -> list:
        return [kid for kid in (self.a, self.b, self.c) if kid is not None]


def other_user() -> tuple | None:
    """(name, uid, gid) of 'nobody' when this test may start a process as it."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return None
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return None
    return entry.pw_name, entry.pw_uid, entry.pw_gid


@pytest.fixture(scope="module")
def kids():
    """Two children of this user with distinct names and ports, and (as root) a third
    child running as 'nobody'; they hold their sockets for the whole module."""
    tag = new_tag()
    started: list = []
    try:
        a = Kid(SocketChild(child_argv("alpha", comm=f"hsa-{tag}")), f"hsa-{tag}", USER)
        started.append(a)
        b = Kid(SocketChild(child_argv("beta", comm=f"hsb-{tag}")), f"hsb-{tag}", USER)
        started.append(b)
        c = None
        nobody = other_user()
        if nobody is not None:
            name, uid, gid = nobody
            wrapper = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
            argv = wrapper + child_argv("gamma", comm=f"hsc-{tag}")
            c = Kid(SocketChild(argv), f"hsc-{tag}", name)
            started.append(c)
        yield Kids(a, b, c, tag)
    finally:
        for kid in started:
            kid.child.stop()


def v6(port):
    if port is None:
        pytest.skip("::1 cannot be bound here")
    return port


def need_c(k: Kids) -> Kid:
    if k.c is None:
        pytest.skip("a child of another user needs root and setpriv")
    return k.c


# --------------------------------------------------------------------------- 1. filters


def tcp(r):
    return r["proto"] in ("tcp", "tcp6")


def udp(r):
    return r["proto"] in ("udp", "udp6")


def ipv4(r):
    return r["proto"] in ("tcp", "udp")


def ipv6(r):
    return r["proto"] in ("tcp6", "udp6")


def status(r):
    return r["status"] or "NONE"


def on_port(*ports):
    return lambda r: r["lport"] in ports or r["rport"] in ports


def in_range(port, low, high):
    return port is not None and low <= port <= high


# id → builder(kids) → (extra argv, predicate on a JSON row, may the children's rows be none)
FILTER_CASES = {
    "tcp": lambda k: (["--tcp"], tcp, False),
    "udp": lambda k: (["--udp"], udp, False),
    "ipv4": lambda k: (["-4"], ipv4, False),
    "ipv6": lambda k: (["-6"], ipv6, not k.a.child.has_v6),
    "tcp-and-udp": lambda k: (["--tcp", "--udp"], lambda r: tcp(r) or udp(r), False),
    "ipv4-and-ipv6": lambda k: (["-4", "-6"], lambda r: ipv4(r) or ipv6(r), False),
    "tcp-ipv6": lambda k: (["--tcp", "-6"], lambda r: r["proto"] == "tcp6", False),
    "udp-ipv4": lambda k: (["--udp", "-4"], lambda r: r["proto"] == "udp", False),
    "port-listener": lambda k: (["--port", k.a.child.lport], on_port(k.a.child.lport), False),
    "port-udp": lambda k: (["--port", k.b.child.uport], on_port(k.b.child.uport), False),
    "port-list": lambda k: (
        ["--port", f"{k.a.child.uport},{v6(k.b.child.lport6)}"],
        on_port(k.a.child.uport, k.b.child.lport6),
        False,
    ),
    "port-range": lambda k: (
        ["--port", "{}-{}".format(*sorted((k.a.child.lport, k.a.child.cport)))],
        lambda r: any(
            in_range(p, *sorted((k.a.child.lport, k.a.child.cport)))
            for p in (r["lport"], r["rport"])
        ),
        False,
    ),
    "port-list-and-ranges": lambda k: (
        ["--port", f"{k.b.child.uport},{k.a.child.cport}-{k.a.child.cport}"],
        on_port(k.b.child.uport, k.a.child.cport),
        False,
    ),
    "lport-listener": lambda k: (
        ["--lport", k.a.child.lport],
        lambda r: r["lport"] == k.a.child.lport,
        False,
    ),
    "lport-client": lambda k: (
        ["--lport", k.b.child.cport],
        lambda r: r["lport"] == k.b.child.cport,
        False,
    ),
    "rport": lambda k: (
        ["--rport", k.a.child.lport],
        lambda r: r["rport"] == k.a.child.lport,
        False,
    ),
    "rport-list": lambda k: (
        ["--rport", f"{k.a.child.cport},{v6(k.b.child.lport6)}"],
        lambda r: r["rport"] in (k.a.child.cport, k.b.child.lport6),
        False,
    ),
    "laddr-ipv4": lambda k: (
        ["--laddr", "127.0.0.1"],
        lambda r: in_networks(r["laddr"], "127.0.0.1"),
        False,
    ),
    "laddr-cidr-ipv4": lambda k: (
        ["--laddr", "127.0.0.0/8"],
        lambda r: in_networks(r["laddr"], "127.0.0.0/8"),
        False,
    ),
    "laddr-ipv6": lambda k: (
        ["--laddr", "::1"],
        lambda r: in_networks(r["laddr"], "::1"),
        not k.a.child.has_v6,
    ),
    "laddr-cidr-ipv6": lambda k: (
        ["--laddr", "::/127"],
        lambda r: in_networks(r["laddr"], "::/127"),
        not k.a.child.has_v6,
    ),
    "laddr-ipv4-mapped-network": lambda k: (
        ["--laddr", "::ffff:127.0.0.0/104"],
        lambda r: in_networks(r["laddr"], "127.0.0.0/8"),
        False,
    ),
    "laddr-list": lambda k: (
        ["--laddr", "::1,127.0.0.1"],
        lambda r: in_networks(r["laddr"], "::1", "127.0.0.1"),
        False,
    ),
    "laddr-elsewhere": lambda k: (
        ["--laddr", "192.0.2.0/24"],  # TEST-NET-1: never a local address
        lambda r: in_networks(r["laddr"], "192.0.2.0/24"),
        True,
    ),
    "raddr-ipv4": lambda k: (
        ["--raddr", "127.0.0.1"],
        lambda r: in_networks(r["raddr"], "127.0.0.1"),
        False,
    ),
    "raddr-cidr-ipv6": lambda k: (
        ["--raddr", "::1/128"],
        lambda r: in_networks(r["raddr"], "::1"),
        not k.a.child.has_v6,
    ),
    "pid": lambda k: (["--pid", k.a.pid], lambda r: r["pid"] == k.a.pid, False),
    "pid-list": lambda k: (
        ["--pid", f"{k.a.pid},{k.b.pid}"],
        lambda r: r["pid"] in (k.a.pid, k.b.pid),
        False,
    ),
    "name-exact": lambda k: (["--name", k.b.name], lambda r: r["pname"] == k.b.name, False),
    "name-glob-one": lambda k: (
        ["--name", f"hsa-{k.tag[:3]}*"],
        lambda r: (r["pname"] or "").startswith(f"hsa-{k.tag[:3]}"),
        False,
    ),
    "name-glob-all": lambda k: (
        ["--name", f"hs?-{k.tag}"],
        lambda r: re.fullmatch(f"hs.-{k.tag}", r["pname"] or "") is not None,
        False,
    ),
    "name-list": lambda k: (
        ["--name", f"{k.a.name},hs[bc]-{k.tag}"],
        lambda r: r["pname"] in (k.a.name, f"hsb-{k.tag}", f"hsc-{k.tag}"),
        False,
    ),
    "user-self": lambda k: (["--user", USER], lambda r: r["user"] == USER, False),
    "user-other": lambda k: (
        ["--user", need_c(k).user],
        lambda r: r["user"] == need_c(k).user,
        False,
    ),
    "user-list": lambda k: (
        ["--user", f"{need_c(k).user},{USER}"],
        lambda r: r["user"] in (need_c(k).user, USER),
        False,
    ),
    "status-listen": lambda k: (["--status", "listen"], lambda r: status(r) == "LISTEN", False),
    "status-list": lambda k: (
        ["--status", "Established,LISTEN"],
        lambda r: status(r) in ("ESTABLISHED", "LISTEN"),
        False,
    ),
    "status-none-is-udp": lambda k: (["--status", "NONE"], lambda r: status(r) == "NONE", False),
    "exclude-status": lambda k: (
        ["--exclude-status", "established"],
        lambda r: status(r) != "ESTABLISHED",
        False,
    ),
    "exclude-status-list": lambda k: (
        ["--exclude-status", "none,LISTEN"],
        lambda r: status(r) not in ("NONE", "LISTEN"),
        False,
    ),
    "status-and-exclude": lambda k: (
        ["--status", "LISTEN,none", "--exclude-status", "listen"],
        lambda r: status(r) == "NONE",
        False,
    ),
    "and-pid-tcp-ipv4-established": lambda k: (
        ["--pid", k.a.pid, "--tcp", "-4", "--status", "ESTABLISHED"],
        lambda r: r["pid"] == k.a.pid and r["proto"] == "tcp" and status(r) == "ESTABLISHED",
        False,
    ),
    "and-name-port": lambda k: (
        ["--name", f"hs?-{k.tag}", "--port", k.b.child.uport],
        lambda r: (
            re.fullmatch(f"hs.-{k.tag}", r["pname"] or "") is not None
            and k.b.child.uport in (r["lport"], r["rport"])
        ),
        False,
    ),
    "and-disjoint": lambda k: (
        ["--name", k.b.name, "--pid", k.a.pid],
        lambda r: False,
        True,
    ),
    "and-laddr-lport-rport": lambda k: (
        ["--laddr", "127.0.0.0/8", "--lport", k.a.child.lport, "--rport", k.a.child.cport],
        lambda r: (
            in_networks(r["laddr"], "127.0.0.0/8")
            and r["lport"] == k.a.child.lport
            and r["rport"] == k.a.child.cport
        ),
        False,
    ),
}


def only_kids(args: list, k: Kids) -> list:
    """An option that keeps histstat to the children's rows, which the filter under test
    then narrows: --pid, or --name where the case tests --pid (a repeated option would
    replace the case's own)."""
    if "--pid" not in args:
        return ["--pid", ",".join(str(kid.pid) for kid in k.all)]
    if "--name" not in args:
        return ["--name", f"hs?-{k.tag}"]
    return []


@pytest.mark.parametrize("case", list(FILTER_CASES))
def test_filter_selects_exactly_the_matching_rows(kids, case):
    args, keeps, may_be_empty = FILTER_CASES[case](kids)
    rows = once_json(*args, *only_kids(args, kids))
    pids = {kid.pid for kid in kids.all}
    expected = [row for kid in kids.all for row in kid.rows() if keeps(row)]
    if not may_be_empty:
        assert expected, f"case {case} selects none of the children's rows: not a test"
    got = [row for row in rows if row["pid"] in pids]
    assert sorted_ids(got) == sorted_ids(expected), args
    # The process facts of what was kept are the child's own.
    for row in got:
        kid = next(kid for kid in kids.all if kid.pid == row["pid"])
        assert (row["pname"], row["user"]) == (kid.name, kid.user)
    # Everything printed obeys the filter.
    disobeying = [row for row in rows if not keeps(row)]
    assert not disobeying, f"rows that do not match {args}: {disobeying[:5]}"


MAPPED_SOURCE = """
import socket
import sys

MAPPED = "::ffff:127.0.0.1"


def dual(kind):
    sock = socket.socket(socket.AF_INET6, kind)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    return sock


server = dual(socket.SOCK_STREAM)
server.bind((MAPPED, 0))
server.listen(4)
client = dual(socket.SOCK_STREAM)
client.connect((MAPPED, server.getsockname()[1]))
accepted, _ = server.accept()
datagram = dual(socket.SOCK_DGRAM)
datagram.bind((MAPPED, 0))
ports = [s.getsockname()[1] for s in (server, client, datagram)]
print(*ports, "-", "-", "-", flush=True)
sys.stdin.buffer.read()
"""


@pytest.fixture
def mapped_child():
    """A child holding IPv6 sockets on the IPv4-mapped address ::ffff:127.0.0.1."""
    script = one_line_script(MAPPED_SOURCE)
    child = SocketChild([sys.executable, "-c", script, new_marker(), "mapped"])
    yield child
    child.stop()


def mapped_keys(child: SocketChild) -> set:
    host = "::ffff:127.0.0.1"
    lport, cport, uport = child.lport, child.cport, child.uport
    return {
        ("tcp6", host, lport, None, None, "LISTEN"),
        ("tcp6", host, cport, host, lport, "ESTABLISHED"),
        ("tcp6", host, lport, host, cport, "ESTABLISHED"),
        ("udp6", host, uport, None, None, None),
    }


@pytest.mark.parametrize(
    "args, wanted",
    [
        (["--laddr", "127.0.0.1"], "all"),
        (["--laddr", "127.0.0.0/8", "--raddr", "127.0.0.1"], "established"),
        (["--laddr", "::ffff:127.0.0.1"], "all"),
        (["--raddr", "::ffff:127.0.0.0/104"], "established"),
        (["--laddr", "::1"], "none"),
        (["--laddr", "10.0.0.0/8"], "none"),
    ],
    ids=["laddr-v4", "laddr-raddr-v4-cidr", "laddr-mapped", "raddr-mapped-cidr", "v6", "other"],
)
def test_ipv4_mapped_rows_match_their_ipv4_network(mapped_child, args, wanted):
    everything = mapped_keys(mapped_child)
    plain = once_json("--pid", mapped_child.pid)
    assert {connection_key(row) for row in plain} == everything  # the setting is real
    expected = {
        "all": everything,
        "established": {key for key in everything if key[5] == "ESTABLISHED"},
        "none": set(),
    }[wanted]
    rows = once_json(*args, "--pid", mapped_child.pid)
    assert sorted(map(connection_key, rows), key=str) == sorted(expected, key=str)


# --------------------------------------------------------------------------- 2. usage errors

# In-process against the parser, with one end-to-end smoke test: see tests/test_cli.py.


# --------------------------------------------------------------------------- 3. --once

SS_STATES = {
    "ESTAB": "ESTABLISHED", "LISTEN": "LISTEN", "UNCONN": None, "SYN-SENT": "SYN_SENT",
    "SYN-RECV": "SYN_RECV", "FIN-WAIT-1": "FIN_WAIT1", "FIN-WAIT-2": "FIN_WAIT2",
    "TIME-WAIT": "TIME_WAIT", "CLOSE-WAIT": "CLOSE_WAIT", "LAST-ACK": "LAST_ACK",
    "CLOSING": "CLOSING", "CLOSED": "CLOSE",
}  # fmt: skip


def ss_endpoint(text: str) -> tuple:
    """ss's ``127.0.0.1:80``, ``[::1]:80``, ``0.0.0.0:*``, ``*:*`` as (address, port)."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]").split("%", 1)[0]
    port = None if port == "*" else int(port)
    if port is None and host in ("*", "0.0.0.0", "::"):
        host = None
    return host, port


def ss_key(line: str) -> tuple:
    netid, state, _, _, local, peer = line.split()[:6]
    laddr, lport = ss_endpoint(local)
    raddr, rport = ss_endpoint(peer)
    proto = netid + ("6" if ":" in laddr else "")
    return (proto, laddr, lport, raddr, rport, SS_STATES[state])


def test_once_lists_the_sockets_ss_shows(spawn_child):
    if shutil.which("ss") is None:
        pytest.skip("ss (iproute2) is not installed")
    child = spawn_child()
    started = time.monotonic()
    rows = once_json("--pid", child.pid)
    assert time.monotonic() - started < 10
    shown = subprocess.run(
        ["ss", "-tunapH"], capture_output=True, timeout=10, check=True
    ).stdout.decode("utf-8", "replace")  # other processes' names may be any bytes
    owned = [line for line in shown.splitlines() if f"pid={child.pid}," in line]
    ss_keys = sorted(map(ss_key, owned), key=str)
    assert ss_keys, f"ss shows no socket of pid {child.pid}:\n{shown}"
    assert sorted(map(connection_key, rows), key=str) == ss_keys
    assert set(ss_keys) == child.connections()  # both agree with what the child holds


@pytest.mark.parametrize("style", list(STYLES))
def test_once_prints_the_table_once_in_every_format(spawn_child, style):
    child = spawn_child()
    marker = child.argv[3]
    done = clean_run([*STYLES[style], "--once", "--pid", child.pid], env=UTF8_ENV)
    lines = text_of(done.stdout).splitlines()
    mine = [line for line in lines if marker in line]
    assert len(mine) == len(child.connections())  # every socket once, none twice
    assert len(lines) == len(mine) + (style != "json")
    if style != "json":
        header = PRETTY_COLUMNS if style == "pretty" else COLUMNS
        assert lines[0].replace(",", " ").split() == list(header)
        assert sum(line == lines[0] for line in lines) == 1


# --------------------------------------------------------------------------- 4. limits


def check_text_capture(style: str, data: bytes, rows: int) -> list:
    """The lines of one capture: header (text formats) then ``rows`` rows."""
    newline = b"\r\n" if style == "csv" else b"\n"
    assert data.endswith(newline), data[-200:]
    lines = data[: -len(newline)].split(newline)
    if style == "csv":
        assert data.count(b"\n") == data.count(b"\r\n"), "CSV lines must end with CRLF"
    if style == "json":
        assert len(lines) == rows
        for line in lines:
            json.loads(line)
    else:
        assert len(lines) == rows + 1
        header = text_of(lines[0])
        if style == "pretty":
            assert header.split() == list(PRETTY_COLUMNS)
        else:
            assert header == ("\t" if style == "plain" else ",").join(COLUMNS)
    return lines


@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("style", list(STYLES))
def test_count_stops_after_n_rows_and_logs_them(spawn_child, run_histstat, tmp_path, style, count):
    child = spawn_child()
    log = tmp_path / f"capture.{style}"
    marker = child.argv[3]
    hs = run_histstat(
        *STYLES[style], *INTERVAL, "--pid", child.pid, "-c", count, "-l", log, env=UTF8_ENV
    )
    result = hs.wait()  # ends by itself
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = check_text_capture(style, result.stdout_bytes, count)
    body = lines if style == "json" else lines[1:]
    assert all(marker.encode() in line for line in body)
    assert log.read_bytes() == result.stdout_bytes


def test_count_spans_polls(run_histstat, spawn_child, tmp_path):
    """Rows found in later polls count too: it waits for them, then stops at N."""
    tag = new_tag()
    first = spawn_child(comm=f"hc{tag}a")
    n_first = len(first.connections())
    log = tmp_path / "capture.json"
    hs = run_histstat("-j", *INTERVAL, "--name", f"hc{tag}*", "-c", n_first + 2, "-l", log)
    hs.wait_for_child(first)
    # Fewer than N rows so far: it must still be running.
    assert hs.proc.poll() is None, hs.describe()
    second = spawn_child(comm=f"hc{tag}b")
    result = hs.wait()
    assert result.returncode == 0, result.stderr
    rows = result.rows
    assert len(rows) == n_first + 2
    assert sorted_ids(rows[:n_first]) == sorted(
        ((first.pid,) + key for key in first.connections()), key=str
    )
    later = rows[n_first:]
    assert all(row["pid"] == second.pid for row in later)
    assert {connection_key(row) for row in later} <= second.connections()
    assert len({connection_key(row) for row in later}) == 2
    assert log.read_bytes() == result.stdout_bytes


@pytest.mark.parametrize("style", list(STYLES))
def test_duration_stops_after_that_long_with_log_complete(
    spawn_child, run_histstat, tmp_path, style
):
    duration = 1.0
    child = spawn_child()
    marker = child.argv[3]
    log = tmp_path / f"capture.{style}"
    started = time.monotonic()
    hs = run_histstat(
        *STYLES[style], *INTERVAL, "--pid", child.pid, "--duration", duration, "-l", log,
        env=UTF8_ENV,
    )  # fmt: skip
    result = hs.wait(timeout=duration + 10)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed >= duration, f"ended after {elapsed:.2f} s, before --duration {duration}"
    assert elapsed < duration + 8, f"ended only after {elapsed:.2f} s"
    data = result.stdout_bytes
    newline = b"\r\n" if style == "csv" else b"\n"
    lines = data[: -len(newline)].split(newline)
    assert sum(marker.encode() in line for line in lines) == len(child.connections())
    if style != "json":
        assert sum(line == lines[0] for line in lines) == 1
    logged = log.read_bytes()
    assert logged == data  # every stdout row is in the log, and nothing else


# --------------------------------------------------------------------------- 5. fields


def text_cell(row: dict, field: str, style: str) -> str:
    """What a text or CSV cell must hold for a child's row (no escapes needed here)."""
    value = row[field]
    if value is None:
        if style == "csv":
            return ""
        return "*" if field in ("raddr", "rport") else "-"
    return str(value)


def parse_capture(style: str, data: bytes, nfields: int) -> tuple:
    """(header cells or None, rows as lists of cells)."""
    if style == "json":
        return None, json_rows(data)
    if style == "csv":
        records = csv_records(data)
        return records[0], records[1:]
    lines = text_of(data).splitlines()
    if style == "plain":
        return lines[0].split("\t"), [line.split("\t") for line in lines[1:]]
    # Pretty: local and remote come back as the two fields each one joins.
    columns = lines[0].split()
    names = [name for column in columns for name in ENDPOINT_COLUMNS.get(column, (column,))]
    rows = [parse_pretty_line(line, columns) for line in lines[1:]]
    return names, [[row[name] for name in names] for row in rows]


FIELD_CHOICES = [
    ("time", "pname", "raddr", "rport"),
    ("rport", "pid", "proto", "lport", "status"),
    ("command", "laddr", "user"),
]


@pytest.mark.parametrize("fields", FIELD_CHOICES, ids=",".join)
@pytest.mark.parametrize("style", list(STYLES))
def test_fields_choose_and_order_columns(kids, style, fields):
    kid = kids.a
    listed = ",".join(fields)
    done = clean_run([*STYLES[style], "--once", "--pid", kid.pid, "-f", listed])
    header, rows = parse_capture(style, done.stdout, len(fields))
    comparable = [f for f in fields if f != "time"]
    expected = [dict(row, command=kid.child.command) for row in kid.rows()]
    if style == "json":
        assert header is None
        assert all(list(row) == list(fields) for row in rows), rows[:2]
        got = [tuple(row[f] for f in comparable) for row in rows]
        want = [tuple(row[f] for f in comparable) for row in expected]
        times = [row["time"] for row in rows if "time" in fields]
    else:
        assert header == list(fields)
        if style == "pretty" and {"raddr", "rport"} <= set(fields):
            shown = text_of(done.stdout).splitlines()[0].split()
            assert "remote" in shown and "raddr" not in shown, shown  # one joined column
        assert all(len(cells) == len(fields) for cells in rows), rows[:2]
        got = [tuple(c for c, f in zip(cells, fields) if f != "time") for cells in rows]
        want = [tuple(text_cell(row, f, style) for f in comparable) for row in expected]
        times = [cells[fields.index("time")] for cells in rows if "time" in fields]
    assert sorted(got, key=str) == sorted(want, key=str)
    assert all(re.fullmatch(r"\d\d:\d\d:\d\d", t) for t in times), times


@pytest.mark.parametrize(
    "style, fields",
    [("json", "pid,sha256,md5"), ("plain", "md5,pid"), ("csv", "sha256,pid"), ("json", "md5")],
)
def test_hash_fields_turn_hashing_on(kids, style, fields):
    kid = kids.b
    md5, sha256 = exe_hashes(kid.pid)
    done = clean_run([*STYLES[style], "--once", "--pid", kid.pid, "-f", fields])
    names = fields.split(",")
    header, rows = parse_capture(style, done.stdout, len(names))
    assert len(rows) == len(kid.child.connections())
    for row in rows:
        if style == "json":
            assert list(row) == names
            values = row
        else:
            assert header == names
            values = dict(zip(names, row))
        if "md5" in names:
            assert values["md5"] == md5
        if "sha256" in names:
            assert values["sha256"] == sha256
        if "pid" in names:
            assert str(values["pid"]) == str(kid.pid)


def test_fields_exe_and_timestamp_in_json(kids):
    kid = kids.a
    rows = once_json("--pid", kid.pid, "-f", "timestamp,exe,pid")
    assert len(rows) == len(kid.child.connections())
    exe = os.readlink(f"/proc/{kid.pid}/exe")
    for row in rows:
        assert list(row) == ["timestamp", "exe", "pid"]
        assert row["exe"] == exe and row["pid"] == kid.pid
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}[+-]\d\d:\d\d", row["timestamp"])


# --------------------------------------------------------------------------- 6. CSV

TRICKY_ARG = 'a,b "q" \x1b end'
FORMULA_ARG = "=1+2"


@pytest.mark.parametrize("comm", ["=cmd|x", "@sum(A1)", "+1+2", "-2+3"])
def test_csv_round_trips_to_the_json_values(spawn_child, comm):
    child = spawn_child(TRICKY_ARG, FORMULA_ARG, comm=comm)
    assert psutil.Process(child.pid).name() == comm
    csv_done = clean_run(["--once", "--csv", "--pid", child.pid])
    json_done = clean_run(["--once", "-j", "--pid", child.pid])
    data = csv_done.stdout
    assert data.endswith(b"\r\n") and data.count(b"\n") == data.count(b"\r\n")
    assert b"\x1b" not in data
    records = csv_records(data)
    assert records[0] == list(COLUMNS)
    json_by_id = {row_id(row): row for row in json_rows(json_done.stdout)}
    csv_rows = [dict(zip(records[0], cells)) for cells in records[1:]]
    assert all(len(cells) == len(COLUMNS) for cells in records[1:])
    assert len(csv_rows) == len(json_by_id) == len(child.connections())
    shown_command = child.command.replace("\x1b", "\\x1b")
    assert shown_command.endswith(' a,b "q" \\x1b end =1+2')
    for cells in csv_rows:
        key = (int(cells["pid"]),) + connection_key({f: (cells[f] or None) for f in KEY_FIELDS})
        row = json_by_id[key]  # the same row in both formats
        for field in COLUMNS:
            value, cell = row[field], cells[field]
            if field in ("time", "date"):
                assert re.fullmatch(r"\d\d[:-]\d\d[:-]\d\d", cell), cell
            elif field == "pname":
                assert value == comm
                assert cell == "'" + comm  # never a spreadsheet formula
            elif field == "command":
                assert value == child.command
                assert cell == shown_command  # quotes, commas and the escape survive
            elif value is None:
                assert cell == "", (field, cell)
            else:
                assert cell == str(value), (field, cell, value)


# --------------------------------------------------------------------------- 7. terminal

LONG_ARG = "long-" + "x" * 400


def child_rows_on_screen(text: str, pid: int) -> list:
    """The rows of ``pid`` in a pretty view, read with the columns its header names."""
    lines = [ANSI.sub("", line) for line in text.splitlines()]
    columns = lines[0].split()
    rows = [parse_pretty_line(line, columns) for line in lines[1:]]
    return [row for row in rows if row.get("pid") == str(pid)]


@pytest.mark.parametrize(
    "cols, fields",
    [(100, None), (160, None), (100, "pid,status,pname,command")],
    ids=["100-default", "160-default", "100-few-fields"],
)
def test_pretty_view_fits_the_terminal_width(spawn_child, cols, fields):
    child = spawn_child(LONG_ARG)
    chosen = ["-f", fields, "--pid", child.pid] if fields else ["--pid", child.pid]
    args = ["-p", "--once", *chosen]
    rc, text, err = hold_on_pty(args, cols=cols, env=no_color_env())
    assert rc == 0, err
    lines = text.splitlines()
    too_wide = [line for line in lines if display_width(line) > cols]
    assert not too_wide, f"{len(too_wide)} of {len(lines)} lines exceed {cols} columns:\n" + (
        "\n".join(too_wide[:3])
    )
    mine = child_rows_on_screen(text, child.pid)
    assert len(mine) == len(child.connections())
    for cells in mine:
        # The command is cut first; when the columns before it fill the terminal, the
        # line is cut there instead. Either way the cut shows as an ellipsis.
        assert list(cells.values())[-1].endswith(ELLIPSIS), cells
        if "command" in cells:
            assert child.command.startswith(cells["command"][:-1])
    # The same run through a pipe carries every character of the command.
    piped = clean_run(args)
    piped_rows = child_rows_on_screen(text_of(piped.stdout), child.pid)
    assert len(piped_rows) == len(child.connections())
    assert all(cells["command"] == child.command for cells in piped_rows)
    assert ELLIPSIS not in text_of(piped.stdout)


@pytest.mark.parametrize("closed", [False, True], ids=["default", "closed"])
def test_100_columns_show_pid_user_and_the_start_of_the_command(spawn_child, closed):
    """What ss does not show fits a 100-column terminal: each row of the child has its
    joined endpoints, pid, process name, user and the start of its command line."""
    child = spawn_child(LONG_ARG)
    story = ["--closed"] if closed else []
    args = ["-p", "--once", *story, "--pid", child.pid]
    rc, text, err = hold_on_pty(args, cols=100, env=no_color_env())
    assert rc == 0, err
    lines = text.splitlines()
    assert all(display_width(line) <= 100 for line in lines), text
    event = ["event"] if closed else []
    assert lines[0].split() == [PRETTY_COLUMNS[0], *event, *PRETTY_COLUMNS[1:]]
    mine = child_rows_on_screen(text, child.pid)
    assert sorted(map(connection_key, mine), key=str) == sorted(child.connections(), key=str)
    pname = psutil.Process(child.pid).name()
    for row in mine:
        shown = row["pname"]
        assert shown == pname or (shown.endswith(ELLIPSIS) and pname.startswith(shown[:-1]))
        assert row["user"] == USER
        command = row["command"]
        assert command.endswith(ELLIPSIS) and len(command) >= 9, row
        assert child.command.startswith(command[:-1]), row


COLORED_STATUS = re.compile(r"\x1b\[[0-9;]+m(LISTEN|ESTABLISHED)\x1b\[0m")


def assert_status_colored(text: str, style: str, pid: int) -> None:
    """The child's TCP rows carry colour around their status, and only there."""
    names = PRETTY_COLUMNS if style == "pretty" else COLUMNS
    tcp_rows = 0
    for line in text.splitlines()[1:]:
        if style == "plain":
            cells = line.split("\t")
        else:
            cells = line.split(None, len(names) - 1)
        values = dict(zip(names, cells))
        if ANSI.sub("", values.get("pid", "")) != str(pid):
            continue
        status = ANSI.sub("", values["status"])
        if status in ("LISTEN", "ESTABLISHED"):
            tcp_rows += 1
            assert COLORED_STATUS.fullmatch(values["status"]), repr(line)
            assert ANSI.sub("", values["status"]) == status
        others = [cell for name, cell in values.items() if name != "status"]
        assert not any("\x1b" in cell for cell in others), repr(line)
    assert tcp_rows >= 3, f"no coloured TCP rows of pid {pid} in:\n{text}"


@pytest.mark.parametrize("style", ["plain", "pretty"])
def test_color_always_on_a_pipe_colours_the_status(kids, style):
    done = clean_run([*STYLES[style], "--once", "--color", "always", "--pid", kids.a.pid])
    text = text_of(done.stdout)
    assert "\x1b" not in text.splitlines()[0]  # the header stays plain
    assert_status_colored(text, style, kids.a.pid)


@pytest.mark.parametrize("style", ["json", "csv"])
def test_color_always_leaves_json_and_csv_alone(kids, style):
    done = clean_run([*STYLES[style], "--once", "--color", "always", "--pid", kids.a.pid])
    assert b"\x1b" not in done.stdout
    assert str(kids.a.pid).encode() in done.stdout


@pytest.mark.parametrize(
    "color, env_extra, colored",
    [
        ([], {}, True),
        (["--color", "auto"], {}, True),
        (["--color", "auto"], {"NO_COLOR": "1"}, False),
        ([], {"NO_COLOR": "1"}, False),
        (["--color", "never"], {}, False),
        (["--color", "always"], {"NO_COLOR": "1"}, True),
    ],
    ids=["default", "auto", "auto-NO_COLOR", "default-NO_COLOR", "never", "always-NO_COLOR"],
)
@pytest.mark.parametrize("style", ["plain", "pretty"])
def test_color_on_a_terminal(kids, style, color, env_extra, colored):
    pid = kids.b.pid
    args = [*STYLES[style], "--once", *color, "--pid", pid]
    rc, text, err = hold_on_pty(args, cols=250, env=no_color_env(**env_extra))
    assert rc == 0, err
    assert str(pid) in text
    if colored:
        assert_status_colored(text, style, pid)
    else:
        assert "\x1b" not in text, repr(text[:500])


@pytest.mark.parametrize("on_pty", [False, True], ids=["pipe", "pty"])
@pytest.mark.parametrize("style", ["plain", "pretty"])
def test_log_never_gets_colour(spawn_child, tmp_path, style, on_pty):
    child = spawn_child(LONG_ARG)
    log = tmp_path / "capture.log"
    args = [*STYLES[style], "--once", "--color", "always", "--pid", child.pid, "-l", log]
    if on_pty:
        rc, text, err = hold_on_pty(args, cols=160, env=no_color_env())
        assert rc == 0, err
    else:
        text = text_of(clean_run(args, env=no_color_env()).stdout)
    assert "\x1b" in text  # stdout did get colour
    logged = log.read_text()
    assert "\x1b" not in logged
    log_lines = logged.splitlines()
    assert len(log_lines) == 1 + len(child.connections())
    # The log holds whole rows: the full command, never the terminal's shortened view.
    assert all(line.endswith(child.command) for line in log_lines[1:])
    if not on_pty:
        assert [ANSI.sub("", line) for line in text.splitlines()] == log_lines


def test_terminal_of_unknown_size_gets_whole_rows(spawn_child):
    """A pty whose size was never set reports 0 columns (serial consoles, some ssh -t):
    that is an unknown width, not a zero one."""
    child = spawn_child(LONG_ARG)
    rc, text, err = hold_on_pty(["-p", "--once", "--pid", child.pid], cols=0, rows=0)
    assert rc == 0, err
    mine = child_rows_on_screen(text, child.pid)
    assert len(mine) == len(child.connections())
    assert all(cells["command"] == child.command for cells in mine)

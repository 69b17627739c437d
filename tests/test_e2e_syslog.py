"""End to end: the installed histstat sending its rows to a real rsyslogd, through a
private socket, while the receiver restarts, gets a huge row or stops reading."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections import Counter

import pytest

from support.histstat import INTERVAL
from support.waiting import END_TIMEOUT, STOP_TIMEOUT, wait_for

# Records go through histstat's poll, a datagram and rsyslogd's queue to its file: on a
# busy host with the psutil source, that can take longer than the usual wait.
TIMEOUT = 30.0

# A private rsyslogd: its own socket (no /dev/log, no kernel log), a file action whose
# template writes app-name, facility, severity and the message, and rsyslog's default
# message size (8096 bytes), which --syslog-size's default must fit.
CONFIG = """
global(workDirectory="{work}")
module(load="imuxsock" SysSock.Use="off")
input(type="imuxsock" Socket="{socket}" RateLimit.Interval="0")
template(name="fields" type="list") {{
  property(name="app-name") constant(value=" ")
  property(name="syslogfacility-text") constant(value=" ")
  property(name="syslogseverity-text") constant(value=" ")
  property(name="msg" droplastlf="on") constant(value="\\n")
}}
*.* action(type="omfile" file="{received}" template="fields")
"""


def rsyslogd_command() -> str:
    found = shutil.which("rsyslogd") or next(
        (path for path in ("/usr/sbin/rsyslogd", "/sbin/rsyslogd") if os.access(path, os.X_OK)),
        None,
    )
    if found is None:
        pytest.fail(
            "rsyslogd is not installed: these tests need a real receiver "
            "(apt-get install rsyslog; .ci/run installs it when missing)",
            pytrace=False,
        )
    return found


class Rsyslogd:
    """rsyslogd in the foreground with a private configuration under ``directory``."""

    def __init__(self, directory) -> None:
        self.directory = directory
        self.socket = str(directory / "log.sock")
        self.received = directory / "received.log"
        self.config = directory / "rsyslog.conf"
        work = directory / "work"
        work.mkdir()
        self.config.write_text(CONFIG.format(work=work, socket=self.socket, received=self.received))
        self.command = rsyslogd_command()
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = open(self.directory / f"rsyslogd-{self.starts}.out", "wb")
        self.proc = subprocess.Popen(
            [self.command, "-n", "-f", str(self.config), "-i", str(self.directory / "pid")],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_for(
            lambda: os.path.exists(self.socket) or self.proc.poll() is not None,
            describe="rsyslogd to create its socket",
        )
        if self.proc.poll() is not None:
            pytest.fail(f"rsyslogd ended at start:\n{self.output()}", pytrace=False)

    def output(self) -> str:
        return (self.directory / f"rsyslogd-{self.starts}.out").read_text(errors="replace")

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)  # a stopped one must be able to end
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(END_TIMEOUT)
        if os.path.exists(self.socket):  # a killed rsyslogd leaves it: none must be found
            os.unlink(self.socket)

    def records(self) -> list[tuple[str, str, str, str]]:
        """(app-name, facility, severity, message) of every record written so far."""
        if not self.received.exists():
            return []
        text = self.received.read_bytes().decode("utf-8", "replace")
        found = []
        for line in text.split("\n")[:-1]:  # the last one may still be being written
            app, facility, severity, message = line.split(" ", 3)
            found.append((app, facility, severity, message.lstrip(" ")))
        return found

    def documents(self) -> list[dict]:
        """histstat's messages, as JSON (a message that is not JSON fails the test)."""
        return [json.loads(message) for app, _, _, message in self.records() if app == "histstat"]


@pytest.fixture
def rsyslog(tmp_path):
    receiver = Rsyslogd(tmp_path)
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()


def syslog_notices(stderr: str) -> list[str]:
    """The lines of stderr about syslog (not a loop that fell behind on a busy host)."""
    return [line for line in stderr.splitlines() if "syslog" in line]


def key(document: dict) -> str:
    return json.dumps(document, sort_keys=True)


def test_every_row_arrives_once_as_json_with_app_name_histstat(
    hold_connections, run_histstat, rsyslog
):
    child = hold_connections(5)
    hs = run_histstat(
        "-j", *INTERVAL, "--port", child.port, "--syslog", rsyslog.socket,
        "--syslog-facility", "local5",
    )  # fmt: skip
    shown = hs.until(lambda: len(hs.rows()) >= 11 and hs.rows(), TIMEOUT, "11 rows on stdout")
    wait_for(
        lambda: len(rsyslog.documents()) >= len(shown),
        TIMEOUT,
        describe=lambda: f"{len(shown)} records, got {rsyslog.records()}\n{hs.describe()}",
    )
    result = hs.stop()
    assert result.returncode == 0 and syslog_notices(result.stderr) == [], result.stderr
    records = [record for record in rsyslog.records() if record[0] == "histstat"]
    assert {(facility, severity) for _, facility, severity, _ in records} == {("local5", "info")}
    assert Counter(key(doc) for doc in rsyslog.documents()) == Counter(
        key(row) for row in result.rows
    )
    assert {row["pid"] for row in result.rows} == {child.pid}


def test_rows_still_arrive_after_rsyslogd_restarts(hold_connections, run_histstat, rsyslog):
    child = hold_connections(2, churn=0.1)  # a new connection, and so a row, every 0.1 s
    hs = run_histstat("-j", *INTERVAL, "--port", child.port, "--syslog", rsyslog.socket)
    wait_for(lambda: len(rsyslog.documents()) >= 5, TIMEOUT, hs.describe)
    rsyslog.stop()
    rsyslog.start()
    after = len(hs.rows())  # rows shown from now on were found after the restart
    wait_for(
        lambda: {key(row) for row in hs.rows()[after:]} & {key(d) for d in rsyslog.documents()},
        TIMEOUT,
        describe=lambda: f"a row found after the restart, in rsyslog\n{hs.describe()}",
    )
    result = hs.stop()
    assert result.returncode == 0, result.stderr
    received = Counter(key(doc) for doc in rsyslog.documents())
    assert max(received.values()) == 1  # none twice
    assert set(received) <= {key(row) for row in result.rows}
    # Rows sent while no socket was there are dropped for syslog only, and said so (a
    # busy host may add notices of a loop that fell behind).
    for line in syslog_notices(result.stderr):
        assert "dropped for syslog only" in line and "socket gone" in line, result.stderr


def test_a_one_megabyte_command_line_arrives_as_one_valid_shortened_message(
    hold_connections, run_histstat, rsyslog, tmp_path
):
    arguments = ["a" * 100_000] * 10  # 1 MB: one argument may hold 128 KiB at most
    child = hold_connections(1, *arguments)
    log = tmp_path / "rows.log"  # 3 MB a poll: a file, which never waits for a reader
    hs = run_histstat(
        "-j", "-q", "-l", log, *INTERVAL, "--command-limit", "0", "--port", child.port,
        "--syslog", rsyslog.socket,
    )  # fmt: skip
    wait_for(lambda: len(rsyslog.documents()) >= 3, TIMEOUT, hs.describe)
    result = hs.stop()
    assert result.returncode == 0 and syslog_notices(result.stderr) == [], result.stderr
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    whole = child.command
    assert len(whole) > 1_000_000
    assert {row["command"] for row in logged} == {whole}  # the log: not cut
    for document in rsyslog.documents():
        command = document["command"]
        kept, marker = command.rsplit("...", 1)
        assert whole.startswith(kept) and len(kept) > 6000
        assert marker == f"[+{len(whole) - len(kept)} chars]"
        assert document["command_length"] == len(whole)
    header = len(f"<14>Nov 26 13:14:15 histstat[{hs.proc.pid}]: ")
    for *_, message in rsyslog.records():  # the default fits rsyslog's default limit
        assert 8000 < header + len(message.encode()) <= 8096


def test_a_stopped_receiver_never_stalls_stdout(hold_connections, run_histstat, rsyslog):
    child = hold_connections(2, churn=0.05)  # rows keep coming, 20 a second
    hs = run_histstat("-j", *INTERVAL, "--port", child.port, "--syslog", rsyslog.socket)
    wait_for(lambda: len(rsyslog.documents()) >= 3, TIMEOUT, hs.describe)
    rsyslog.proc.send_signal(signal.SIGSTOP)  # its socket fills: 10 datagrams, here
    try:
        before = len(hs.rows())
        hs.until(lambda: "dropped for syslog only" in hs.stderr(), TIMEOUT, "the notice")
        hs.until(lambda: len(hs.rows()) >= before + 60, TIMEOUT, "60 more rows on stdout")
        assert hs.stderr().count("dropped for syslog only") == 1  # at most once a minute
    finally:
        rsyslog.proc.send_signal(signal.SIGCONT)
    shown = len(hs.rows())
    wait_for(  # it reads again: the rows found now reach it again
        lambda: {key(row) for row in hs.rows()[shown:]} & {key(d) for d in rsyslog.documents()},
        TIMEOUT,
        describe=hs.describe,
    )
    result = hs.stop()
    assert result.returncode == 0
    notices = syslog_notices(result.stderr)
    assert notices and all(
        line.startswith(f"histstat: syslog socket {rsyslog.socket!r}: ") and "socket full" in line
        for line in notices
    ), result.stderr


def test_a_missing_socket_is_one_line_and_exit_1_leaving_no_log(run_histstat, tmp_path):
    log = tmp_path / "rows.log"
    missing = tmp_path / "none.sock"
    hs = run_histstat("-q", "--once", "-l", log, "--syslog", missing)
    result = hs.wait()
    assert result.returncode == 1
    assert result.stderr == (
        f"histstat: cannot send to syslog socket '{missing}': No such file or directory "
        "(is a syslog daemon running?)\n"
    )
    assert not log.exists()

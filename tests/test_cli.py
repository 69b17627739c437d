"""Command-line behaviour around the rows: notices on stderr, module entry point."""

import io
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

import histstat
from histstat import runner
from histstat.cli import parse_config
from histstat.environment import Environment
from histstat.privileges import NOT_PRIVILEGED_NOTICE
from support.histstat import histstat_command
from support.waiting import STOP_TIMEOUT, read_line, wait_for


def test_defaults_are_plain_output_every_second():
    config = parse_config([])
    assert (config.interval, config.output, config.log, config.hashes) == (
        1.0,
        "plain",
        None,
        False,
    )


def test_flags_become_one_configuration():
    config = parse_config(["-i", "0.25", "-j", "-l", "x.log", "-q", "--hash"])
    assert (config.interval, config.output, config.log, config.quiet, config.hashes) == (
        0.25,
        "json",
        "x.log",
        True,
        True,
    )


LOOP_BEHIND = ("behind its", "longer than the")  # the two notices of a loop that lags


def test_a_loop_that_cannot_keep_up_is_reported_once(run_histstat, tmp_path):
    # An interval far below one poll's cost: every iteration overruns. The notice comes
    # once, then at most once a minute; at the end, what was not told yet is, in one.
    log = tmp_path / "rows.log"
    run = run_histstat("-i", "0.0001", "-q", "-l", log)
    wait_for(lambda: any(words in run.stderr() for words in LOOP_BEHIND), describe=run.describe)
    wait_for(lambda: log.stat().st_size > 0, describe=run.describe)
    result = run.stop()
    assert result.returncode == 0
    notices = [line for line in result.stderr.splitlines() if "interval" in line]
    assert 1 <= len(notices) <= 2, result.stderr
    assert any(words in notices[0] for words in LOOP_BEHIND), result.stderr
    assert result.stdout_bytes == b""


def test_python_dash_m_runs_the_same_tool():
    done = subprocess.run(
        [sys.executable, "-m", "histstat", "-v"], capture_output=True, timeout=STOP_TIMEOUT
    )
    assert (done.returncode, done.stdout.decode().strip()) == (
        0,
        f"histstat {histstat.__version__}",
    )


AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def nobody_can_run_histstat() -> bool:
    """Root with setpriv, and a histstat install that another user may read (a checkout
    inside a private directory is not)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("setpriv") is None:
        return False
    probe = subprocess.run(
        [*AS_NOBODY, histstat_command(), "-v"], capture_output=True, timeout=STOP_TIMEOUT
    )
    return probe.returncode == 0


def test_unprivileged_notice_goes_to_stderr_only(monkeypatch):
    """In-process, so it runs wherever the tests do: one poll, then Ctrl-C."""

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "is_privileged", lambda: False)
    monkeypatch.setattr(runner.PollLoop, "_sleep_until", interrupt)
    stdout, stderr = io.BytesIO(), io.StringIO()
    env = Environment(stdout=stdout, stderr=stderr, stdout_encoding="utf-8", stdout_isatty=False)
    with socket.socket() as listener:  # a row is sure to come
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert runner.main(["-j"], env=env) == 0
    rows = [json.loads(line) for line in stdout.getvalue().splitlines()]
    assert any(row["lport"] == port for row in rows)
    assert stderr.getvalue() == NOT_PRIVILEGED_NOTICE + "\n"


@pytest.mark.skipif(
    not nobody_can_run_histstat(), reason="needs root, setpriv and an install others can read"
)
def test_unprivileged_run_prints_the_notice_on_stderr_only(tmp_path):
    with socket.socket() as listener:  # a row is sure to come, without a process
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        proc = subprocess.Popen(
            [*AS_NOBODY, histstat_command(), "-j", "-i", "1"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=tmp_path,
        )
        try:
            first_row = read_line(proc.stdout)
        finally:
            proc.terminate()
            out, err = proc.communicate(timeout=STOP_TIMEOUT)
    assert proc.returncode == 0, err
    assert err.decode().strip() == NOT_PRIVILEGED_NOTICE
    assert NOT_PRIVILEGED_NOTICE.encode() not in first_row + out
    assert first_row.startswith(b"{")

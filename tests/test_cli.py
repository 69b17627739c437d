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


def test_slow_poll_is_reported_once_on_stderr(run_histstat, hold_connections, tmp_path):
    # Polls slower than the shortest interval: the psutil source reads every process's
    # descriptors, and a child holds 1,000 sockets. Every poll overruns; the notice comes
    # once. Only the child's rows are formatted (--pid).
    holder = hold_connections(500)
    log = tmp_path / "rows.log"
    run = run_histstat("--source", "psutil", "-i", "0.01", "--pid", holder.pid, "-q", "-l", log)
    wait_for(lambda: "longer than the" in run.stderr(), describe=run.describe)
    wait_for(lambda: log.stat().st_size > 0, describe=run.describe)
    result = run.stop()
    assert result.returncode == 0
    notices = [line for line in result.stderr.splitlines() if "longer than the" in line]
    assert len(notices) == 1, result.stderr
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
        assert runner.main(["-j", "--port", str(port)], env=env) == 0
    rows = [json.loads(line) for line in stdout.getvalue().splitlines()]
    assert [row["lport"] for row in rows] == [port]
    assert stderr.getvalue() == NOT_PRIVILEGED_NOTICE + "\n"


@pytest.mark.skipif(
    not nobody_can_run_histstat(), reason="needs root, setpriv and an install others can read"
)
def test_unprivileged_run_prints_the_notice_on_stderr_only(tmp_path):
    with socket.socket() as listener:  # a row is sure to come, without a process
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        proc = subprocess.Popen(
            [*AS_NOBODY, histstat_command(), "-j", "-i", "1", "--port", str(port)],
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


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("interval", "0.01", 0.01),
        ("interval", "2", 2.0),
        ("interval", ".5", 0.5),
        ("interval", "10.", 10.0),
        ("duration", "0.001", 0.001),
        ("count", "010", 10),
        ("command_limit", "0", 0),
        ("command_limit", "300", 300),
    ],
)
def test_numbers_in_ascii_decimal_are_taken(option, value, expected):
    flag = {"interval": "-i", "duration": "--duration", "count": "-c"}.get(
        option, "--command-limit"
    )
    assert getattr(parse_config([flag, value]), option) == expected


def test_command_limit_is_65536_characters_by_default():
    assert parse_config([]).command_limit == 65536


@pytest.mark.parametrize("flag", ["-i", "--duration", "-c", "--command-limit"])
@pytest.mark.parametrize(
    "value",
    ["\u0661", "1_0", "1e3", " 1", "1 ", "0x10", "+1", "1" + "0" * 400, "", "\uff11"],
    ids=["arabic-indic", "underscore", "exponent", "space-before", "space-after", "hex",
         "plus", "400-digits", "empty", "fullwidth"],
)  # fmt: skip
def test_numbers_not_in_ascii_decimal_are_usage_errors(capsys, flag, value):
    with pytest.raises(SystemExit) as exited:
        parse_config([flag, value])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"histstat: error: argument {flag}")


@pytest.mark.parametrize("value", ["0.009", "0", "0.0000001", "0.00999"])
def test_interval_below_a_hundredth_of_a_second_is_a_usage_error(capsys, value):
    with pytest.raises(SystemExit) as exited:
        parse_config(["-i", value])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "0.01" in err

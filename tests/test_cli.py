"""Command-line behaviour around the rows: notices on stderr, module entry point."""

import importlib.metadata
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import psutil
import pytest

import histstat
from histstat import runner
from histstat.cli import get_parser, parse_config
from histstat.connects import connects_notice
from histstat.environment import Environment
from histstat.privileges import NOT_PRIVILEGED_NOTICE
from histstat.sources.namespaces import UNPRIVILEGED_REASON
from support.contract import COLUMNS
from support.histstat import histstat_command
from support.namespaces import start_netns_child
from support.waiting import STOP_TIMEOUT, read_line, wait_for


def test_defaults_are_plain_output_every_second():
    config = parse_config([])
    assert (config.interval, config.output, config.log, config.hashes) == (
        1.0,
        "plain",
        None,
        False,
    )


def test_ecs_is_an_output_format_of_its_own():
    config = parse_config(["--ecs", "--hash", "--closed"])
    assert (config.output, config.fields, config.hashes) == ("ecs", (), True)


def test_flags_become_one_configuration():
    config = parse_config(["-i", "0.25", "-j", "-l", "x.log", "-q", "--hash"])
    assert (config.interval, config.output, config.log, config.quiet, config.hashes) == (
        0.25,
        "json",
        "x.log",
        True,
        True,
    )


# --------------------------------------------------------------------------- usage errors
# In-process against the parser; test_e2e.py keeps one end-to-end smoke test.

STATUSES = sorted(getattr(psutil, name) for name in dir(psutil) if name.startswith("CONN_"))
# Fields -f must list when it refuses one: the original's columns and JSON's extras.
FIELDS = (*COLUMNS, "exe", "md5", "sha256", "command_length", "timestamp", "ppid", "parent",
          "args", "started", "netns", "container")  # fmt: skip

# (argv, what the one error line must name, valid choices it must list). A value is named
# as argparse quotes it; a misused option by its own spelling.
USAGE_ERRORS = [
    (["-i", "0"], ("-i/--interval", "'0'"), ()),
    (["-i", "-1"], ("-i/--interval", "'-1'"), ()),
    (["-i", "nan"], ("'nan'",), ()),
    (["-i", "inf"], ("'inf'",), ()),
    (["-i", "abc"], ("'abc'",), ()),
    (["-p", "-j"], ("-p", "-j"), ()),
    (["--csv", "-j"], ("--csv", "-j"), ()),
    (["--csv", "-p"], ("--csv", "-p"), ()),
    (["--ecs", "-j"], ("--ecs", "-j"), ()),
    (["--ecs", "--csv"], ("--ecs", "--csv"), ()),
    (["--ecs", "-f", "pid"], ("-f/--fields", "--ecs"), ()),
    (["-f", "pid,ppid", "--ecs", "-l", "x.log"], ("-f/--fields", "--ecs"), ()),
    (["-q"], ("-q/--quiet", "-l/--log", "--sqlite"), ()),
    (["-tulpn"], ("-tulpn",), ()),  # netstat habits must fail, never half-work
    (["--inter", "1"], ("--inter",), ()),  # no abbreviated long options
    (["--port", "70000"], ("'70000'",), ()),
    (["--lport", "90-80"], ("'90-80'",), ()),
    (["--rport", "http"], ("'http'",), ()),
    (["--port", "22,,80"], ("'22,,80'",), ()),
    (["--laddr", "10.0.0.0/33"], ("'10.0.0.0/33'",), ()),
    (["--raddr", "::1/129"], ("'::1/129'",), ()),
    (["--raddr", "300.1.2.3"], ("'300.1.2.3'",), ()),
    (["--pid", "12a"], ("'12a'",), ()),
    (["--status", "bogus"], ("'bogus'",), STATUSES),
    (["--exclude-status", "LISTEN,OPEN"], ("'OPEN'",), STATUSES),
    (["-f", "pid,bogus"], ("'bogus'",), FIELDS),
    (["--fields", "nope"], ("'nope'",), FIELDS),
    (["-f", "pid,country"], ("-f", "--geoip"), ()),
    (["-c", "0"], ("'0'",), ()),
    (["-c", "-1"], ("-c/--count", "'-1'"), ()),
    (["--count=-1"], ("'-1'",), ()),
    (["-c", "abc"], ("'abc'",), ()),
    (["--count", "1.5"], ("'1.5'",), ()),
    (["--duration", "0"], ("'0'",), ()),
    (["--duration", "nan"], ("'nan'",), ()),
    (["--duration", "inf"], ("'inf'",), ()),
    (["--duration", "soon"], ("'soon'",), ()),
    (["--update", "0"], ("--update", "'0'"), ()),
    (["--update", "-1"], ("--update", "'-1'"), ()),
    (["--update", "often"], ("--update", "'often'"), ()),
    # Numbers are ASCII decimal only, and an interval is at least 0.01 s.
    (["--duration", "1_0"], ("--duration", "'1_0'"), ()),
    (["-i", "1e-300"], ("-i/--interval", "'1e-300'"), ()),
    (["-i", "0.001"], ("-i/--interval", "0.01", "'0.001'"), ()),
    (["-i", "\u0661"], ("-i/--interval", "'\u0661'"), ()),
    (["-i", "1_0"], ("'1_0'",), ()),
    (["-c", "\u0661"], ("-c/--count", "'\u0661'"), ()),
    (["--command-limit", "-5"], ("--command-limit", "'-5'"), ()),
    (["--command-limit", "64k"], ("--command-limit", "'64k'"), ()),
    (["--port", "2\u0662"], ("--port", "'2\u0662'"), ()),
    (["--color", "sometimes"], ("'sometimes'",), ("auto", "always", "never")),
    (["--source", "bogus"], ("--source", "'bogus'"), ("auto", "psutil", "linux")),
    (["-l", ""], ("-l/--log",), ()),
    (["--sqlite", ""], ("--sqlite",), ()),
    (["--geoip", ""], ("--geoip",), ()),
    (["--once", "--skip-existing"], ("--skip-existing", "--once"), ()),
    (["--skip-existing", "-j", "--once"], ("--skip-existing", "--once"), ()),
    (["--once", "--transitions"], ("--transitions", "--once"), ()),
    (["--update", "5", "--once"], ("--update", "--once"), ()),
    (["--netns", "abc"], ("--netns", "'abc'"), ()),
    (["--netns", "4026531840,"], ("--netns",), ()),
    (["--netns", "-1"], ("--netns", "'-1'"), ()),
    (["--container", "4f1e2b3c"], ("--container", "'4f1e2b3c'", "12"), ()),
    (["--container", "a b"], ("--container", "'a b'"), ()),
]


def test_netns_and_container_filters_reach_the_row_filter():
    config = parse_config(["--netns", "net:[4026532500],4026531840", "--container",
                           "4f1e2b3c4f1e,my-box"])  # fmt: skip
    assert config.row_filter.namespaces == frozenset({4026532500, 4026531840})
    assert config.row_filter.containers == ("4f1e2b3c4f1e", "my-box")
    assert config.row_filter.needs_process
    assert parse_config([]).row_filter.container_filter is None


def usage_error(capsys, argv) -> str:
    """The one line parse_config writes for a usage error, after checking that it exits
    2 and writes nothing on stdout."""
    with pytest.raises(SystemExit) as exited:
        parse_config(argv)
    out, err = capsys.readouterr()
    assert exited.value.code == 2, err
    assert out == ""
    assert len(err.splitlines()) == 1 and err.endswith("\n"), err
    assert err.startswith("histstat: error: "), err
    return err


@pytest.mark.parametrize(
    "argv, named, choices", USAGE_ERRORS, ids=[" ".join(case[0]) for case in USAGE_ERRORS]
)
def test_usage_error_is_one_line_naming_the_mistake(capsys, argv, named, choices):
    err = usage_error(capsys, argv)
    for name in named:
        assert name in err, f"the error does not name {name}: {err}"
    for choice in choices:
        assert re.search(rf"\b{re.escape(choice)}\b", err), f"{choice!r} not listed: {err}"


def test_unknown_source_in_the_environment_is_a_usage_error(capsys, monkeypatch):
    monkeypatch.setenv("HISTSTAT_SOURCE", "bogus")
    err = usage_error(capsys, [])
    assert "HISTSTAT_SOURCE" in err and "'bogus'" in err, err


def test_skip_existing_is_off_unless_asked_for():
    assert parse_config([]).skip_existing is False
    assert parse_config(["--skip-existing"]).skip_existing is True


LOOP_BEHIND = ("behind its", "longer than the")  # the two notices of a loop that lags


def test_a_loop_that_cannot_keep_up_is_reported_once(run_histstat, hold_connections, tmp_path):
    # Polls slower than the shortest interval: the psutil source reads every process's
    # descriptors, and a child holds 1,000 sockets. Every iteration overruns; the notice
    # comes once, then at most once a minute, and at the end what was not told yet is,
    # in one. Only the child's rows are formatted (--pid).
    holder = hold_connections(500)
    log = tmp_path / "rows.log"
    run = run_histstat("--source", "psutil", "-i", "0.01", "--pid", holder.pid, "-q", "-l", log)
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


def test_version_is_the_packages_own_and_above_the_index_1_2_x(capsys):
    """-v prints the version written once, in histstat/__init__.py, which the installed
    metadata (setup.py) carries too; it numbers above the old histstat 1.2.x that the
    package index serves."""
    with pytest.raises(SystemExit) as exited:
        parse_config(["-v"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"histstat {histstat.__version__}\n"
    assert importlib.metadata.version("histstat") == histstat.__version__
    assert tuple(int(part) for part in histstat.__version__.split(".")) >= (2, 0, 0)


def test_install_hints_name_the_checkout_not_the_index_package():
    """'histstat[geoip]' would fetch the old histstat 1.2.x from the package index."""
    help_text = get_parser().format_help()
    assert "pip install '.[geoip]'" in " ".join(help_text.split())
    assert "histstat[" not in help_text


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
    # Of this process: another may use the same port number (UDP, a TIME_WAIT).
    assert [row["lport"] for row in rows if row["pid"] == os.getpid()] == [port]
    # Under --kernel-events auto, what a run without root lacks is said too, once.
    assert stderr.getvalue().splitlines() == [
        "histstat: " + connects_notice("they need root"),
        NOT_PRIVILEGED_NOTICE,
    ]


@pytest.mark.skipif(
    not nobody_can_run_histstat(), reason="needs root, setpriv and an install others can read"
)
def test_unprivileged_run_prints_the_notice_on_stderr_only(tmp_path):
    # A root process in a namespace of its own, which nobody cannot read: said once.
    other_namespace = start_netns_child()
    try:
        unprivileged_run_notices(tmp_path)
    finally:
        other_namespace.stop()


def unprivileged_run_notices(tmp_path):
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
    assert err.decode().splitlines() == [
        "histstat: " + connects_notice("they need root"),
        NOT_PRIVILEGED_NOTICE,
        "histstat: " + UNPRIVILEGED_REASON,  # at the first poll
    ]
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


def test_story_options_reach_the_config_and_bring_the_event_column():
    config = parse_config(["--transitions", "--update", "2.5"])
    assert (config.transitions, config.update, config.closed) == (True, 2.5, False)
    assert config.fields[0] == "event" and "duration" in config.fields
    plain = parse_config([])
    assert (plain.transitions, plain.update) == (False, None) and "event" not in plain.fields
    keys = parse_config(["-j", "--update", "1"]).fields
    assert "bytes_sent" in keys and "owners" in keys
    assert "bytes_sent" not in parse_config(["-j", "--transitions"]).fields


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

"""--print-completion prints the checked-in script, and bash completes with it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from histstat.cli import parse_config
from support.histstat import histstat_command
from support.waiting import STOP_TIMEOUT

SCRIPTS = Path(__file__).resolve().parent.parent / "histstat" / "completions"
CHECKED_IN = {"bash": SCRIPTS / "histstat.bash", "zsh": SCRIPTS / "_histstat"}

# Ask the function that the printed script registers for histstat, as bash would on Tab:
# the words typed so far, the last one being completed; print one candidate a line.
ASK_BASH = r"""
source <("$HISTSTAT" --print-completion bash) || exit 1
registered=$(complete -p histstat) || exit 1
function=${registered#*-F }; function=${function%% *}
COMP_WORDS=("$0" "$@"); COMP_CWORD=$#; COMP_LINE="$0 $*"; COMP_POINT=${#COMP_LINE}
COMPREPLY=()
"$function" "$0" "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
printf '%s\n' "${COMPREPLY[@]}"
"""


def _bash() -> str:
    found = shutil.which("bash")
    if found is None:
        pytest.fail("bash is needed to load the completion script")
    return found


def _run(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, timeout=STOP_TIMEOUT, **kwargs)


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_print_completion_prints_the_checked_in_script(shell):
    done = _run(histstat_command(), "--print-completion", shell)
    assert (done.returncode, done.stderr) == (0, b"")
    assert done.stdout == CHECKED_IN[shell].read_bytes()


def test_print_completion_of_an_unknown_shell_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exited:
        parse_config(["--print-completion", "fish"])
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("histstat: error: argument --print-completion: invalid choice: 'fish'")
    assert err.count("\n") == 1


def test_print_completion_needs_a_shell(capsys):
    with pytest.raises(SystemExit) as exited:
        parse_config(["--print-completion"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.startswith(
        "histstat: error: argument --print-completion: expected one argument"
    )


def test_print_completion_into_a_closed_pipe_ends_quietly():
    """The reader went away before a byte was written (histstat ... | true)."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        done = subprocess.run(
            [histstat_command(), "--print-completion", "zsh"],
            stdout=writer,
            stderr=subprocess.PIPE,
            timeout=STOP_TIMEOUT,
        )
    finally:
        os.close(writer)
    assert (done.returncode, done.stderr) == (0, b"")


def test_bash_loads_the_printed_script():
    done = _run(
        _bash(),
        "-c",
        'source <("$0" --print-completion bash) && complete -p histstat',
        histstat_command(),
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    registered = done.stdout.decode(errors="replace")
    assert registered.startswith("complete ") and registered.endswith(" histstat\n")
    assert " -F " in registered


@pytest.mark.parametrize(
    "typed, offered",
    [
        (["--sour"], ["--source"]),
        (["--print-completion", ""], ["bash", "zsh"]),
        (["--color", ""], ["auto", "always", "never"]),
        (["-j", "--exclude-st"], ["--exclude-status"]),
        (["-l", "capt"], ["capture.json", "capture.tsv"]),
        (["--sqlite", "hist"], ["history.db"]),
    ],
)
def test_bash_completes_options_choices_and_file_names(tmp_path, typed, offered):
    for name in ("capture.json", "capture.tsv", "history.db", "other.txt"):
        (tmp_path / name).touch()
    done = _run(
        _bash(),
        "-c",
        ASK_BASH,
        "histstat",
        *typed,
        cwd=tmp_path,
        env={**os.environ, "HISTSTAT": histstat_command()},
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert sorted(done.stdout.decode(errors="replace").split()) == sorted(offered)

"""Shell completion scripts for histstat, generated from its parser and shipped as data."""

from __future__ import annotations

import argparse
import os
import sys
from importlib import resources
from typing import Any, NoReturn

# shell → the checked-in script (``python tools/generate.py`` writes them)
SCRIPTS = {"bash": "histstat.bash", "zsh": "_histstat"}

# shtab, which writes the scripts, reads an action's ``complete`` attribute: these
# complete file names, and naming them here keeps shtab out of histstat's run time.
FILE_COMPLETION = {"bash": "_shtab_compgen_files", "zsh": "_files"}


def completion_script(shell: str) -> str:
    """The completion script for ``shell`` (a key of SCRIPTS), as installed."""
    return resources.files(__name__).joinpath(SCRIPTS[shell]).read_text(encoding="utf-8")


class PrintCompletion(argparse.Action):
    """--print-completion SHELL: print the completion script and exit, as --version does."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> NoReturn:
        try:
            script = completion_script(values)
        except OSError as exc:
            parser.exit(1, f"{parser.prog}: cannot read the {values} completion script: {exc}\n")
        if sys.stdout is not None:  # None: started with stdout closed, nobody to tell
            try:
                sys.stdout.write(script)
                sys.stdout.flush()
            except BrokenPipeError:
                # The reader went away, a normal end as for rows; leave Python nothing to
                # flush into the closed pipe at exit.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        parser.exit()


def completes_files(action: argparse.Action) -> None:
    """Shell completion offers file names for this option's value."""
    action.complete = FILE_COMPLETION  # type: ignore[attr-defined]

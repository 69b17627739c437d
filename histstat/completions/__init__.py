"""Shell completion scripts for histstat, generated from its parser and shipped as data."""

from __future__ import annotations

from importlib import resources

# shell → the checked-in script (``python tools/generate.py`` writes them)
SCRIPTS = {"bash": "histstat.bash", "zsh": "_histstat"}

# shtab, which writes the scripts, reads an action's ``complete`` attribute: these
# complete file names, and naming them here keeps shtab out of histstat's run time.
FILE_COMPLETION = {"bash": "_shtab_compgen_files", "zsh": "_files"}


def completion_script(shell: str) -> str:
    """The completion script for ``shell`` (a key of SCRIPTS), as installed."""
    return resources.files(__name__).joinpath(SCRIPTS[shell]).read_text(encoding="utf-8")

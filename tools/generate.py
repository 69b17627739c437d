"""Regenerate the files made from histstat's parser: man page, completions, docs usage.

Run from anywhere, with the Python (3.10 to 3.12) of a venv that has the dev (or test)
extra:

    .venv/bin/pip install -e '.[dev]'
    .venv/bin/python tools/generate.py           # rewrite whatever is stale
    .venv/bin/python tools/generate.py --check   # list what is stale, exit 1 if any

It writes man/histstat.1 (argparse-manpage), histstat/completions/histstat.bash and
histstat/completions/_histstat (shtab), and the block between the usage markers of
docs/usage.md (``get_parser().format_help()``, 100 columns wide). After a change to the
parser, run it and commit what it wrote; tests/test_generated.py fails until then.
Both generators are pinned in setup.py, so that the same parser always gives the same
files: upgrade them there, then run this.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # this checkout's parser, even where another is installed

from histstat import __version__  # noqa: E402
from histstat.cli import get_parser  # noqa: E402
from histstat.completions import SCRIPTS  # noqa: E402

COMMAND = "python tools/generate.py"
HELP_COLUMNS = 100
MAN_PAGE = ROOT / "man" / "histstat.1"
COMPLETIONS = {shell: ROOT / "histstat" / "completions" / name for shell, name in SCRIPTS.items()}
USAGE_DOC = ROOT / "docs" / "usage.md"
USAGE_START = "<!-- usage:start -->"
USAGE_END = "<!-- usage:end -->"

# Python 3.10 to 3.12 lay out --help as docs/usage.md shows it (3.9 titles the options
# "optional arguments", 3.13 names an option's value once: "-i, --interval SECONDS").
LAYS_OUT_HELP_AS_THE_DOCS = (3, 10) <= sys.version_info[:2] <= (3, 12)

# What the man page says beyond the options (roff; the parser's texts come first).
MAN_SECTIONS = {
    "environment": (
        ".TP\n.B HISTSTAT_SOURCE\n"
        "the default of \\fB\\-\\-source\\fR.\n"
        ".TP\n.B NO_COLOR\n"
        "set and not empty: no colour with \\fB\\-\\-color auto\\fR."
    ),
    "see also": (
        ".BR ss (8),\n.BR netstat (8),\n.BR lsof (8).\n"
        ".PP\n"
        "The output formats, the JSON schema, the SQLite schema and recipes are described "
        "in docs/ of histstat's source distribution."
    ),
}


@contextlib.contextmanager
def fixed_environment() -> Iterator[None]:
    """The parser's texts as they are everywhere: a fixed width for argparse's wrapping,
    and no $HISTSTAT_SOURCE (the parser reads it for a default)."""
    pinned = {"COLUMNS": str(HELP_COLUMNS), "HISTSTAT_SOURCE": None}
    saved = {name: os.environ.get(name) for name in pinned}
    try:
        for name, value in pinned.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _parser() -> argparse.ArgumentParser:
    parser = get_parser()
    parser.color = False  # type: ignore[attr-defined]  # Python 3.14 colours help on a tty
    return parser


def help_text() -> str:
    """``histstat --help`` at HELP_COLUMNS, as the docs show it."""
    with fixed_environment():
        return _parser().format_help()


def usage_doc(current: str) -> str:
    """docs/usage.md with the block between its usage markers made anew."""
    start, end = current.find(USAGE_START), current.find(USAGE_END)
    if start < 0 or end < start:
        raise SystemExit(f"{USAGE_DOC}: the markers {USAGE_START} and {USAGE_END} are missing")
    block = f"{USAGE_START}\n```\n{help_text()}```\n"
    return current[:start] + block + current[end:]


def _text_lines(roff: str) -> str:
    """Roff text whose lines are all text: \\& before a leading ' or ."""
    return "\n".join(
        "\\&" + line if line.startswith(("'", ".")) else line for line in roff.split("\n")
    )


def man_page() -> str:
    """man/histstat.1, from the parser (argparse-manpage)."""
    from argparse_manpage.manpage import Manpage

    with fixed_environment():
        page = Manpage(_parser())
        # Every text of the parser passes here once wrapped; argparse-manpage escapes
        # backslashes and hyphens, but a line that starts with ' or . would be read as a
        # roff request and vanish.
        markup = page.mf.format_text
        page.mf.format_text = lambda text: _text_lines(markup(text))
        page.description = "history for netstat: network connections as they occur"
        page.source = f"histstat {__version__}"
        page.manual = "User Commands"
        page.date = ""  # a date would make the page stale every day; the version says it
        for heading, content in MAN_SECTIONS.items():
            page.add_section(heading, ">", content)
        return str(page)


def completion(shell: str) -> str:
    """The completion script for ``shell``, from the parser (shtab)."""
    import shtab

    with fixed_environment():
        return shtab.complete(_parser(), shell=shell)


def generated() -> dict[Path, str]:
    """Every generated file and what it should hold now."""
    files = {USAGE_DOC: usage_doc(USAGE_DOC.read_text(encoding="utf-8")), MAN_PAGE: man_page()}
    files.update({path: completion(shell) for shell, path in COMPLETIONS.items()})
    return files


def stale(files: dict[Path, str]) -> list[Path]:
    """The files whose content on disk differs from the one given."""
    return [
        path
        for path, content in files.items()
        if not path.exists() or path.read_text(encoding="utf-8") != content
    ]


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(argv: list[str] | None = None) -> int:
    options = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    options.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 if a file is stale"
    )
    check = options.parse_args(argv).check
    if not LAYS_OUT_HELP_AS_THE_DOCS:
        options.error(
            f"run this with Python 3.10 to 3.12, whose argparse lays out --help as the docs "
            f"show it (this is {sys.version_info[0]}.{sys.version_info[1]})"
        )
    files = generated()
    for path in stale(files):
        if check:
            print(f"stale: {_shown(path)} (run: {COMMAND})")
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="\n") as out:
            out.write(files[path])
        print(f"wrote {_shown(path)}")
    return 1 if check and stale(files) else 0


if __name__ == "__main__":
    sys.exit(main())

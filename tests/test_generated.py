"""Files generated from the parser (man page, completions, the docs' --help) are current."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from histstat.cli import get_parser

ROOT = Path(__file__).resolve().parent.parent


def _load_generator():
    path = ROOT / "tools" / "generate.py"
    spec = importlib.util.spec_from_file_location("histstat_generate", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = _load_generator()
STALE = f"is stale: run `{generate.COMMAND}` and commit what it writes"


def _flat(text: str) -> str:
    return " ".join(text.split())


def _help_texts(help_option: bool = True) -> list[str]:
    """The description, every option's help and the epilog, as the parser holds them
    (argparse keeps its actions in ``_actions``: there is no public list)."""
    parser = get_parser()
    helps = [
        action.help % vars(action)
        for action in parser._actions
        if action.help and (help_option or "--help" not in action.option_strings)
    ]
    return [parser.description or "", *helps, parser.epilog or ""]


def test_man_page_is_current():
    assert generate.MAN_PAGE.read_text(encoding="utf-8") == generate.man_page(), (
        f"man/histstat.1 {STALE}"
    )


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_script_is_current(shell):
    path = generate.COMPLETIONS[shell]
    assert path.read_text(encoding="utf-8") == generate.completion(shell), (
        f"{path.relative_to(ROOT)} {STALE}"
    )


def test_docs_show_the_current_help():
    doc = generate.USAGE_DOC.read_text(encoding="utf-8")
    if generate.LAYS_OUT_HELP_AS_THE_DOCS:
        assert doc == generate.usage_doc(doc), f"the --help block of docs/usage.md {STALE}"
        return
    # Another Python lays the options out its own way: the usage lines are still the
    # same, and every text of the parser must be in the block.
    block = doc[doc.index(generate.USAGE_START) : doc.index(generate.USAGE_END)]
    with generate.fixed_environment():
        usage = get_parser().format_usage()
    assert usage in block, f"the --help block of docs/usage.md {STALE}"
    missing = [text for text in _help_texts() if _flat(text) not in _flat(block)]
    assert not missing, f"the --help block of docs/usage.md {STALE}: lacks {missing}"


def test_man_page_shows_every_help_text():
    """argparse-manpage does not guard roff: a help line starting with ' or . would be
    read as a request and vanish from the page."""
    if shutil.which("groff") is None:
        pytest.fail("groff is needed to render the man page: apt-get install groff-base")
    rendered = subprocess.run(
        ["groff", "-man", "-Tascii", "-P-bou", "-rLL=5000n", str(generate.MAN_PAGE)],
        capture_output=True,
        check=True,
    ).stdout.decode("ascii", errors="replace")
    shown = _flat(rendered)
    missing = [text for text in _help_texts(help_option=False) if _flat(text) not in shown]
    assert not missing, f"man/histstat.1 does not show: {missing}"  # (man has no --help)


def test_check_names_each_stale_file_and_the_command(tmp_path, monkeypatch, capsys):
    man_page = tmp_path / "histstat.1"
    man_page.write_text(".TH OLD\n", encoding="utf-8")
    monkeypatch.setattr(generate, "generated", lambda: {man_page: generate.man_page()})
    assert generate.main(["--check"]) == 1
    assert capsys.readouterr().out == f"stale: {man_page} (run: {generate.COMMAND})\n"
    assert man_page.read_text(encoding="utf-8") == ".TH OLD\n"  # --check changes nothing

    assert generate.main([]) == 0
    assert capsys.readouterr().out == f"wrote {man_page}\n"
    assert man_page.read_text(encoding="utf-8") == generate.man_page()
    assert generate.main(["--check"]) == 0
    assert capsys.readouterr().out == ""


def test_usage_doc_needs_its_markers():
    with pytest.raises(SystemExit, match=re.escape(generate.USAGE_START)):
        generate.usage_doc("# Usage\n\nno block here\n")

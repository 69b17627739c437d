"""The README and docs/: short enough to read, links that lead somewhere, real module names."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```.*?^```", re.M | re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *$", re.M)


def prose(path: Path) -> str:
    """The Markdown outside code blocks (a `#` in a block is a comment, not a heading)."""
    return FENCE.sub("", path.read_text(encoding="utf-8"))


def anchors(path: Path) -> set[str]:
    """The heading anchors GitHub makes: lower case, punctuation dropped, spaces as '-'."""
    found: set[str] = set()
    for heading in HEADING.findall(prose(path)):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in found:
            n += 1
            candidate = f"{slug}-{n}"
        found.add(candidate)
    return found


def test_readme_is_at_most_250_lines():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: move reference to docs/"


def test_docs_exist_one_file_a_topic():
    names = {path.name for path in (ROOT / "docs").glob("*.md")}
    for topic in ("usage", "output", "story", "sqlite", "performance", "development"):
        assert f"{topic}.md" in names


def test_relative_links_lead_to_a_file_and_heading():
    broken = []
    for doc in DOCS:
        for target in LINK.findall(prose(doc)):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            linked = (doc.parent / file_part).resolve() if file_part else doc
            if not linked.exists():
                broken.append(f"{doc.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{doc.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_every_python_file_named_in_the_docs_exists():
    """A module renamed or moved must not live on in the docs."""
    trees = [ROOT / name for name in ("histstat", "tests", "benchmarks", "tools")]
    found = [*ROOT.glob("*.py"), *(path for tree in trees for path in tree.rglob("*.py"))]
    files = [path.relative_to(ROOT).as_posix() for path in found]
    stale = []
    for doc in DOCS:
        for named in re.findall(r"[\w/.]*\w\.py\b", doc.read_text(encoding="utf-8")):
            # a path or the end of one: histstat/output/format.py, output/format.py, format.py
            if not any(path == named or path.endswith(f"/{named}") for path in files):
                stale.append(f"{doc.name}: {named}")
    assert not stale, "\n".join(stale)

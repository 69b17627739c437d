"""pip install puts the man page under share/man/man1 and the completion scripts in the
package, where `man` and `histstat --print-completion` find them."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support.histstat import histstat_command

ROOT = Path(__file__).resolve().parent.parent
# what setup.py needs to build histstat (tests, docs and tools are not installed)
SOURCES = ["setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE", "histstat", "man"]
INSTALL_TIMEOUT = 120  # seconds: a build on a busy 2-core machine


def test_pip_install_puts_the_man_page_in_share_man(tmp_path):
    for module in ("setuptools", "wheel"):
        if importlib.util.find_spec(module) is None:
            pytest.fail(f"building histstat offline needs {module}: pip install -e '.[test]'")
    tested = histstat_command()  # the one the e2e tests run: it must stay installed
    source, prefix = tmp_path / "source", tmp_path / "prefix"
    source.mkdir()
    for name in SOURCES:  # a copy, so that the build leaves nothing in the checkout
        if (ROOT / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
            shutil.copytree(ROOT / name, source / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, source / name)
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation"]
    # --ignore-installed: else pip first uninstalls the histstat of the venv that runs
    # the tests (it counts it as the installed version), and the e2e tests lose it.
    install += ["--no-index", "--ignore-installed", "--prefix", str(prefix), str(source)]
    done = subprocess.run(install, capture_output=True, timeout=INSTALL_TIMEOUT)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert os.path.exists(tested), f"pip uninstalled {tested}"

    man_page = prefix / "share" / "man" / "man1" / "histstat.1"
    assert man_page.read_bytes() == (ROOT / "man" / "histstat.1").read_bytes()
    installed = list(prefix.glob("lib/python*/site-packages/histstat/completions"))
    assert len(installed) == 1, list(prefix.rglob("completions"))
    for name in ("histstat.bash", "_histstat"):
        shipped = (ROOT / "histstat" / "completions" / name).read_bytes()
        assert (installed[0] / name).read_bytes() == shipped

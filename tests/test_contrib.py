"""The service files in contrib/: the systemd unit's command is one histstat's own
parser takes as meant, its sandbox leaves histstat able to see, and logrotate rotates
the log alone."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from histstat.cli import parse_config
from support.histstat import histstat_command

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"
UNIT = CONTRIB / "histstat.service"
LOGROTATE = CONTRIB / "logrotate.d" / "histstat"


def unit_settings(text: str) -> dict[str, list[str]]:
    """``Section.Key`` → every value given, as systemd reads a unit file (comments
    start with # or ;, a key may be repeated)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


SETTINGS = unit_settings(UNIT.read_text())


def setting(key: str) -> str:
    (value,) = SETTINGS[f"Service.{key}"]
    return value


def exec_start() -> list[str]:
    return shlex.split(setting("ExecStart"))


def test_the_units_command_parses_into_the_intended_config():
    command = exec_start()
    assert os.path.basename(command[0]) == "histstat"
    config = parse_config(command[1:])
    assert (config.output, config.quiet) == ("json", True)
    assert os.path.dirname(config.log) == f"/var/log/{setting('LogsDirectory')}"
    assert os.path.dirname(config.sqlite) == f"/var/lib/{setting('StateDirectory')}"
    assert setting("LogsDirectoryMode") == setting("StateDirectoryMode") == "0700"


def test_the_unit_keeps_the_capabilities_histstat_needs_and_no_more():
    kept = set(setting("CapabilityBoundingSet").split())
    assert {"CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"} <= kept
    assert kept <= {"CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH", "CAP_SYS_ADMIN"}


def test_the_unit_is_sandboxed_where_histstat_can_still_see():
    assert setting("NoNewPrivileges") == "yes"
    assert setting("ProtectSystem") == "strict"
    assert setting("ProtectHome") == "read-only"
    assert setting("PrivateTmp") == "yes"
    assert setting("Restart") == "on-failure"
    for blinding in (
        "ProtectProc", "ProcSubset", "PrivateNetwork", "ProtectKernelTunables",
        "RestrictNamespaces",
    ):  # fmt: skip
        assert f"Service.{blinding}" not in SETTINGS, blinding
    families = set(setting("RestrictAddressFamilies").split())
    assert {"AF_NETLINK", "AF_UNIX", "AF_INET", "AF_INET6"} <= families


def test_reloading_the_unit_sends_sighup():
    assert shlex.split(setting("ExecReload")) == ["/bin/kill", "-HUP", "$MAINPID"]


def logrotate_paths(text: str) -> list[str]:
    """The files a logrotate configuration rotates: the words before each ``{``."""
    uncommented = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    paths = []
    for head in re.findall(r"([^{}]*)\{", uncommented):
        paths.extend(shlex.split(head.rsplit("endscript", 1)[-1]))
    return paths


def test_logrotate_rotates_the_log_alone_and_tells_histstat():
    text = LOGROTATE.read_text()
    config = parse_config(exec_start()[1:])
    assert logrotate_paths(text) == [config.log]
    uncommented = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    assert config.sqlite not in uncommented and "/var/lib" not in uncommented
    assert "copytruncate" not in uncommented  # histstat reopens its log on SIGHUP
    script = re.search(r"postrotate\n(.*?)endscript", uncommented, re.S)
    assert script and "systemctl reload histstat.service" in script.group(1)


def test_systemd_accepts_the_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian's systemd package)")
    # The unit as installed: the command it names exists, and so does its man page.
    unit = tmp_path / "histstat.service"
    unit.write_text(UNIT.read_text().replace(exec_start()[0], histstat_command(), 1))
    man = tmp_path / "man" / "man1"
    man.mkdir(parents=True)
    shutil.copy(CONTRIB.parent / "man" / "histstat.1", man)
    checked = subprocess.run(
        [analyze, "verify", str(unit)],
        capture_output=True,
        env={**os.environ, "MANPATH": str(tmp_path / "man")},
        timeout=60,
    )
    output = (checked.stdout + checked.stderr).decode("utf-8", "replace")
    assert (checked.returncode, output) == (0, "")

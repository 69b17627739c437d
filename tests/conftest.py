"""Fixtures: socket children and histstat runs, each ended when its test ends.

The helpers they use live in ``support/``.
"""

from __future__ import annotations

import signal
import subprocess

import pytest

from histstat.sources.linux import LinuxSource
from support.children import HoldingChild, SocketChild, child_argv
from support.histstat import Histstat
from support.namespaces import start_netns_child
from support.waiting import END_TIMEOUT


@pytest.fixture
def spawn_child():
    """Start socket children: ``spawn_child(*extra_args, executable=None, env=None,
    comm=None)``; extra arguments may be bytes (POSIX), ``comm`` renames the process."""
    children: list = []

    def spawn(
        *extra,
        executable: str | None = None,
        env: dict | None = None,
        comm: str | bytes | None = None,
    ):
        child = SocketChild(child_argv(*extra, executable=executable, comm=comm), env=env)
        children.append(child)
        return child

    yield spawn
    for child in children:
        child.stop()


@pytest.fixture
def hold_connections():
    """Start children holding loopback connections: ``hold_connections(pairs, *extra,
    comm=None, churn=0.0)`` (see support.children.HoldingChild)."""
    children: list = []

    def start(pairs: int, *extra, **kwargs) -> HoldingChild:
        children.append(HoldingChild(pairs, *extra, **kwargs))
        return children[-1]

    yield start
    for child in children:
        child.stop()


@pytest.fixture
def run_histstat():
    """Start the installed histstat: ``run_histstat(*args, env=None, output=None,
    prefix=())``."""
    started: list = []

    def start(
        *args, env: dict | None = None, output: str | None = None, prefix: tuple = ()
    ) -> Histstat:
        histstat = Histstat(args, env=env, output=output, prefix=prefix)
        started.append(histstat)
        return histstat

    yield start
    for histstat in started:
        if histstat.proc.poll() is None:
            histstat.proc.send_signal(signal.SIGTERM)
            try:
                histstat.proc.wait(END_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        histstat.kill()


@pytest.fixture
def live_source():
    """A factory of LinuxSource on the live /proc, each closed at the end (its destroy
    watcher is a thread and a netlink socket)."""
    made: list = []

    def make(**options) -> LinuxSource:
        made.append(LinuxSource(**options))
        return made[-1]

    yield make
    for source in made:
        source.close()


@pytest.fixture
def netns_children():
    """Start socket children, each alone in a new network namespace (as root):
    ``netns_children()``; each is stopped at the end."""
    children: list = []

    def start():
        children.append(start_netns_child())
        return children[-1]

    yield start
    for child in children:
        child.stop()

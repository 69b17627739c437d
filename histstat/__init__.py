"""histstat: history for netstat, network connections as they occur."""

# The one place the version is written: setup.py, -v/--version, the SQLite runs table
# and the benchmark report read it. 2.0.0 succeeds the histstat 1.2.x on the package index.
__version__ = "2.0.0"

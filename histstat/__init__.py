"""histstat: history for netstat, network connections as they occur."""

__version__ = "1.0.0"

"""Helpers for the tests: children, running histstat, parsing its output, waiting."""

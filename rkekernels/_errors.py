"""Errors shared by the command line and the demo (a module of its own: no import cycle)."""

from __future__ import annotations

__all__ = ["CLIError"]


class CLIError(Exception):
    """A user-facing error: printed as one line on stderr, exit code 2."""

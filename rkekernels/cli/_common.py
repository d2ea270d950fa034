"""What the subcommands of ``rkekernels`` share: the parser class and the number types."""

from __future__ import annotations

import argparse
import math

from .._errors import CLIError

__all__ = ["EXIT_BAD_INPUT", "PROG", "order", "positive"]

PROG = "rkekernels"
EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the usage and exit; we keep one line
        raise CLIError(f"{message} (see `{self.prog} --help`)")


def positive(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be finite and > 0, got {text}")
    return v


def order(text: str) -> float:
    """An argparse type: an entropy order q > 0, or 'inf' / 'infinity'."""
    return math.inf if text.strip().lower() in ("inf", "infinity") else positive(text)

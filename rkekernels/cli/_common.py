"""What the subcommands of ``rkekernels`` share: the parser class and the number types."""

from __future__ import annotations

import argparse
import math

from .._errors import CLIError

__all__ = ["EXIT_BAD_INPUT", "PROG", "add_max_bytes", "byte_size", "order", "positive"]

PROG = "rkekernels"
EXIT_BAD_INPUT = 2


class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to every option whose help does not already show its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if not action.option_strings or d is None or d is False or d is argparse.SUPPRESS:
            return text
        if "%(default)" in text or ("default" in text and str(d) in text):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # argparse would print the usage and exit; we keep one line
        raise CLIError(f"{message} (see `{self.prog} --help`)")


def add_max_bytes(p: argparse.ArgumentParser) -> None:
    """The ``--max-bytes`` option: how large a compressed .npz array may inflate."""
    p.add_argument(
        "--max-bytes",
        type=byte_size,
        metavar="SIZE",
        help="largest array a compressed .npz may inflate to, checked before inflating "
        "(e.g. 16G; default: 8 GiB or half the RAM, the smaller)",
    )


def positive(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be finite and > 0, got {text}")
    return v


def byte_size(text: str) -> int:
    """An argparse type: a number of bytes > 0, with an optional K, M, G or T suffix (powers of
    1024).

    Example:
        >>> from rkekernels.cli._common import byte_size
        >>> byte_size("16G"), byte_size("1000")
        (17179869184, 1000)
    """
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = 1
    if t and t[-1] in "KMGT":
        scale = 1 << (10 * ("KMGT".index(t[-1]) + 1))
        t = t[:-1]
    try:
        return int(positive(t) * scale)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"not a size > 0: {text!r} (e.g. 16G, 500M)") from None


def order(text: str) -> float:
    """An argparse type: an entropy order q > 0, or 'inf' / 'infinity'."""
    return math.inf if text.strip().lower() in ("inf", "infinity") else positive(text)

"""``rkekernels demo``: the ground-truth guidance demo (`rkekernels.demo`) on the command line.

rkekernels demo [--samples N] [--prompts P] [--scale G] ...
"""

from __future__ import annotations

import argparse

from .. import demo

__all__ = ["add_arguments", "run"]

HELP = "ground-truth guidance demo on an exact prompt-conditioned diffusion model"
DESCRIPTION = (
    "Sample an exact, prompt-conditioned toy diffusion model with and without "
    "SPARKE guidance; print modes covered, RKE, precision and overhead; save a figure."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``rkekernels demo`` (`rkekernels.demo.add_arguments`)."""
    demo.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    """Run ``rkekernels demo`` from parsed options (`rkekernels.demo.main`); 0 on success."""
    return demo.main(args)

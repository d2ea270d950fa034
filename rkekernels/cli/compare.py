"""``rkekernels compare``: several embedding files at ONE shared bandwidth, or a bandwidth sweep.

    rkekernels compare PATH [PATH ...] [--sigma S | --reference PATH] [--sweep N [--plot FILE]]

One bandwidth for all files, by construction (--sigma, else `default_bandwidth` of --reference
or of the first file), makes the scores comparable (`rkekernels.rke_scores`); the output states
sigma and where it came from (``sigma_from``: given, reference or first). --sweep N scores each
file over N shared bandwidths (`rkekernels.rke_sweep`) and --plot FILE draws the curves.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from .. import compare
from .._errors import CLIError
from .._files import as_matrix, figure_path, load_array
from ._common import add_max_bytes, positive

__all__ = ["add_arguments", "run"]

HELP = "RKE of several embedding files at ONE shared bandwidth, or a bandwidth sweep"
DESCRIPTION = (
    "Score several files with one bandwidth (--sigma, else default_bandwidth of "
    "--reference or of the first file), so the scores compare; --sweep N scores each file "
    "over N shared bandwidths (RKE against sigma) and --plot FILE draws the curves. "
    "Per-file default bandwidths would not compare across files."
)


def add_arguments(c: argparse.ArgumentParser) -> None:
    """The options of ``rkekernels compare``."""
    c.add_argument("paths", nargs="+", metavar="PATH", help="embedding files (n_i, d)")
    c.add_argument("--sigma", type=positive, metavar="S", help="the shared bandwidth")
    c.add_argument(
        "--reference", metavar="PATH", help="file whose default_bandwidth is shared (default: "
        "the first PATH)",
    )  # fmt: skip
    c.add_argument("--sweep", type=int, metavar="N", help="score over N bandwidths instead")
    c.add_argument(
        "--plot",
        metavar="FILE",
        help="with --sweep: save the curves (matplotlib) to FILE, named with its format "
        "(.png, .pdf, .svg, ...; an existing FILE is replaced), or into an existing folder "
        "as sweep.png",
    )
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.add_argument("--key", metavar="NAME", help="array name in .npz / .pt dict / .safetensors")
    c.add_argument("--flatten", action="store_true", help="reshape (n, ...) arrays to (n, d)")
    c.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto")
    add_max_bytes(c)


def run(args: argparse.Namespace) -> int:
    """`rkekernels compare`: several files at one shared bandwidth, or a shared sweep."""
    names = [str(p) for p in args.paths]
    if len(set(names)) != len(names):
        raise CLIError("compare: a file is given twice")
    mb = args.max_bytes
    sets = {n: as_matrix(load_array(n, args.key, max_bytes=mb), n, args.flatten) for n in names}
    widths = {v.shape[1] for v in sets.values()}
    if len(widths) > 1:
        raise CLIError(f"compare: the files have different widths d {sorted(widths)}")
    if args.plot and not args.sweep:
        raise CLIError("--plot needs --sweep N")
    plot = figure_path(args.plot, "--plot", "sweep.png") if args.plot else None
    if args.sweep is not None and args.sweep < 2:
        raise CLIError(f"--sweep must be at least 2, got {args.sweep}")
    ref = None
    if args.reference is not None:
        arr = load_array(args.reference, args.key, max_bytes=mb)
        ref = as_matrix(arr, args.reference, args.flatten)
    first = ref if ref is not None else next(iter(sets.values()))
    try:
        if args.sweep:
            grid = compare.sweep_grid(first, args.sweep)
            if args.sigma is not None:  # centred on the given sigma instead
                grid = grid * (args.sigma / float(np.sqrt(grid[0] * grid[-1])))
            curves = {n: compare.rke_sweep(v, grid, backend=args.backend) for n, v in sets.items()}
            out = {
                "sigma": [float(s) for s in grid],
                "sigma_from": "given"
                if args.sigma is not None
                else ("reference" if ref is not None else "first"),
                "rke": {n: [float(r) for r in c.rke] for n, c in curves.items()},
            }
            if plot is not None:
                try:
                    plot.parent.mkdir(parents=True, exist_ok=True)
                    compare.plot_sweep(curves, plot, title="RKE against a shared sigma")
                except ImportError as exc:
                    raise CLIError(str(exc)) from None
                except OSError as exc:
                    raise CLIError(f"--plot {plot}: cannot write it: {exc}") from None
                print(f"figure: {plot}", file=sys.stderr)
        else:
            res = compare.rke_scores(sets, args.sigma, reference=ref, backend=args.backend)
            out = {"sigma": res.sigma, "sigma_from": res.sigma_from, "rke": res.scores}
    except (TypeError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    return _print(out, args, names)


def _print(out: dict[str, Any], args: argparse.Namespace, names: list[str]) -> int:
    """The table (or, with --json, the JSON object) of `run`."""
    if args.json:
        try:
            print(json.dumps(out, allow_nan=False))
        except ValueError:
            raise CLIError("a score is not finite; this is a bug, please report it") from None
        return 0
    src = (
        "given"
        if args.sigma is not None
        else f"from {'the reference' if args.reference else 'the first file'} "
        f"{args.reference or names[0]}: its default_bandwidth"
    )
    if args.sweep:
        print(f"RKE at {len(out['sigma'])} shared bandwidths ({src} sets the grid)")
        print("sigma".rjust(12) + "".join(n[-14:].rjust(16) for n in names))
        for i, s in enumerate(out["sigma"]):
            print(f"{s:12.5g}" + "".join(f"{out['rke'][n][i]:16.5g}" for n in names))
    else:
        print(f"shared bandwidth sigma = {out['sigma']:.6g} ({src}); the scores compare")
        for n in names:
            print(f"{out['rke'][n]:12.5g}  {n}")
    return 0

"""``rkekernels score``: the RKE, conditional RKE and entropies of an embedding file.

    rkekernels score PATH [--cond PATH] [--sigma S ...] [--sigma-cond S] [--json] [--key NAME]

Reads embeddings from .npy, .npz (the array named by --key, or the only one), .pt/.pth (a tensor,
or a dict of tensors with --key) and .safetensors (with the ``safetensors`` package) through
`rkekernels._files.load_array`, and prints the RKE score, the conditional RKE and the order-2
entropy decomposition (nats) with the bandwidths used (`default_bandwidth` unless given). Values
come from the public API (`rkekernels.rke_score`, `rkekernels.rke_entropies`,
`rkekernels.default_bandwidth`; another order, kernel or method: `rkekernels.vendi_score`,
`rkekernels.vendi_entropies`, with method "auto" resolved by `rkekernels.vendi.resolve_method`
as the library resolves it). ``--progress`` (default from 20,000 rows) reports the exact pass
over the pairs on stderr: pairs done, pairs/s and the time left (`rkekernels.cli._progress`).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch

from .. import scores, vendi
from .._errors import CLIError
from .._files import as_matrix, load_array
from ..ops.pair_sums import reporting
from ._common import add_max_bytes, order, positive
from ._progress import PairProgress

__all__ = ["add_arguments", "run", "score_files"]

PROGRESS_MIN_N = 20_000  # progress over the pairs from this many rows on
HELP = "RKE, conditional RKE and entropies of an embedding file"
DESCRIPTION = (
    "Print the RKE score (and, with --cond, the conditional RKE and the order-2 "
    "entropy decomposition in nats) of embeddings stored in .npy, .npz, .pt or .safetensors."
)


def add_arguments(s: argparse.ArgumentParser) -> None:
    """The options of ``rkekernels score``."""
    s.add_argument("path", help="samples (n, d): .npy, .npz, .pt/.pth or .safetensors")
    s.add_argument("--cond", metavar="PATH", help="prompt embeddings (n, m), one per sample")
    s.add_argument(
        "--sigma",
        type=positive,
        nargs="+",
        action="extend",
        metavar="S",
        help="bandwidth(s) for the samples (default: default_bandwidth, the median pairwise "
        "distance / 2.5); several values give one row each",
    )
    s.add_argument(
        "--sigma-cond",
        type=positive,
        metavar="S",
        help="bandwidth for the prompt embeddings (default: their default_bandwidth)",
    )
    s.add_argument(
        "--order",
        type=order,
        default=2.0,
        metavar="Q",
        help="entropy order q > 0 ('inf' allowed; default 2: RKE; 1: the Vendi score)",
    )
    s.add_argument("--kernel", choices=("gaussian", "cosine", "linear"), default="gaussian")
    s.add_argument(
        "--method",
        choices=("auto", "exact", "covariance", "rff", "nystrom", "lanczos"),
        default="auto",
        help="how the spectrum is computed (see rkekernels.vendi_score; the JSON names it)",
    )
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--key", metavar="NAME", help="array name in .npz / .pt dict / .safetensors")
    s.add_argument("--cond-key", metavar="NAME", help="array name in the --cond file")
    s.add_argument("--flatten", action="store_true", help="reshape (n, ...) arrays to (n, d)")
    s.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto")
    add_max_bytes(s)
    s.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress of the pass over the pairs on stderr: pairs done, pairs/s and the time "
        f"left (default: when n >= {PROGRESS_MIN_N:,}; a bar on a terminal with tqdm, else a "
        "line every 10 s; --backend triton reports nothing)",
    )


def _to_py(v: Any) -> float | list[float]:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().double()
        return float(v) if v.dim() == 0 else [float(a) for a in v]
    return float(v)


def score_files(
    path: str,
    cond: str | None = None,
    sigma: Sequence[float] | None = None,
    sigma_cond: float | None = None,
    *,
    key: str | None = None,
    cond_key: str | None = None,
    flatten: bool = False,
    backend: str = "auto",
    progress: bool | None = None,
    order: float = 2.0,
    kernel: str = "gaussian",
    method: str = "auto",
    max_bytes: int | None = None,
) -> dict[str, Any]:
    """Compute the scores of an embedding file (and its prompt embeddings) with the public API.

    RKE = exp(H2(X)) = n^2 / sum_ij Kx^2; with prompts, CondRKE = exp(H2(X|T)) and the entropy
    decomposition H2(X), H2(T), H2(X,T), H2(X|T), I2(X;T) from one `rke_entropies` pass.
    Another ``order`` q, ``kernel`` or ``method`` goes through `vendi_score` /
    `vendi_entropies`: then "vendi" (and "cond_vendi") hold exp(H_q(X)) (exp(H_q(X|T))), the
    entropies are of order q, and "rke" / "cond_rke" are present when q = 2.

    Args:
        path: samples file (n, d). cond: prompt embeddings file (n, m) or None.
        sigma: bandwidths for x (None: `default_bandwidth`); one gives floats, several give
            lists (one value per bandwidth).
        sigma_cond: bandwidth for the prompts (None: their `default_bandwidth`).
        key, cond_key: array names inside multi-array files.
        flatten: reshape (n, ...) to (n, d) instead of refusing non-2-D arrays.
        backend: "auto", "torch" or "triton".
        progress: report the pass over the pairs on stderr (None: when n >= 20,000): pairs
            done of the total (kernel entries, about n^2 / 2), pairs/s and the time left from
            that rate (`rkekernels.cli._progress.PairProgress`; a bar on a terminal with tqdm,
            else a line every 10 s and one at the end). The torch tile loop reports (the
            arrays are read onto the CPU, where "auto" is torch); backend "triton" reports
            nothing, and the order-q methods (another order, kernel or method) have no pass
            over the pairs to report.
        order: the order q > 0 (``math.inf`` included); kernel: "gaussian", "cosine" or
            "linear" (no sigma); method: see `rkekernels.vendi_score`.
        max_bytes: the largest a compressed .npz array may inflate to (`load_array`).

    Returns:
        dict with rke, sigma and, with ``cond``, cond_rke, h_x, h_t, h_xt, h_x_given_t,
        mutual_info, sigma_cond (floats, or lists over several sigmas); plus "shape"
        ({"n", "d", "m"}), "default_sigma" / "default_sigma_cond" (whether the default
        bandwidth was used), "order", "kernel" and "method" (the method that ran: method
        "auto" is resolved by `rkekernels.vendi.resolve_method`, as `vendi_score` resolves it).

    Raises:
        CLIError: bad files or arrays (see `load_array`), or an error from the API.

    Example:
        >>> import numpy as np, tempfile, os
        >>> from rkekernels.cli import score_files
        >>> p = os.path.join(tempfile.mkdtemp(), "x.npy")
        >>> np.save(p, np.repeat(np.eye(3) * 100.0, 5, axis=0))
        >>> round(score_files(p, sigma=[1.0])["rke"], 6)
        3.0
    """
    x, t = _load_pair(path, cond, key, cond_key, flatten, max_bytes)
    n = x.shape[0]
    order_q = 2.0 if order is None else order
    many = sigma is not None and len(sigma) > 1
    try:
        sig, sig_c = _bandwidths(x, t, sigma, sigma_cond, kernel)
        used, dim = _pick_method(x, t, sig, sig_c, many, order_q, kernel, method)
        if (kernel, order_q, used) != ("gaussian", 2.0, "exact"):
            out = _score_order_q(x, t, sig, sig_c, many, order_q, kernel, used, dim)
        else:
            show = n >= PROGRESS_MIN_N if progress is None else progress
            out = _score_rke(x, t, sig, sig_c, many, backend, show)
    except (ValueError, TypeError) as exc:  # API validation (SPEC section 4): one line
        raise CLIError(str(exc)) from None
    out.update(order=_order_out(order_q), kernel=kernel, method=used)
    out["shape"] = _shape(x, t)
    out["default_sigma"] = kernel == "gaussian" and sigma is None
    out["default_sigma_cond"] = kernel == "gaussian" and t is not None and sigma_cond is None
    return out


def _load_pair(path, cond, key, cond_key, flatten, max_bytes=None):
    """The samples (n, d) and the prompt embeddings (n, m) or None, read and checked."""
    x = as_matrix(load_array(path, key, max_bytes=max_bytes), str(path), flatten)
    t = None
    if cond is not None:
        t = as_matrix(load_array(cond, cond_key, max_bytes=max_bytes), str(cond), flatten)
        if t.shape[0] != x.shape[0]:
            raise CLIError(
                f"{path} has n = {x.shape[0]} rows but {cond} has n = {t.shape[0]}; "
                "give one prompt embedding per sample"
            )
    return x, t


def _shape(x, t) -> dict[str, int]:
    return {"n": x.shape[0], "d": x.shape[1], **({"m": t.shape[1]} if t is not None else {})}


def _bandwidths(x, t, sigma, sigma_cond, kernel) -> tuple[list[float] | None, float | None]:
    """(sigmas for x, sigma for t): given, or `default_bandwidth`; (None, None) off gaussian."""
    if kernel != "gaussian":
        if sigma is not None or sigma_cond is not None:
            raise ValueError(
                f"--sigma / --sigma-cond apply to the gaussian kernel only, not {kernel!r}"
            )
        return None, None
    sig = [float(scores.default_bandwidth(x))] if sigma is None else [float(s) for s in sigma]
    sig_c = None
    if t is not None:
        sig_c = float(sigma_cond) if sigma_cond is not None else scores.default_bandwidth(t)
    return sig, sig_c


def _pick_method(x, t, sig, sig_c, many, q, kernel, method) -> tuple[str, int | None]:
    """(method, rff dim) that runs: `rkekernels.vendi.resolve_method`, the library's own
    resolution of method="auto" (by n, then from the data past the exact budget)."""
    arg = None if sig is None else (sig if many else sig[0])
    return vendi.resolve_method(x, t, q, arg, sig_c, kernel=kernel, method=method)


def _score_rke(x, t, sig, sig_c, many, backend, show) -> dict[str, Any]:
    """RKE (and, with prompts, the order-2 entropies) by the exact streamed pair sums.

    ``show``: report the pass over the pairs on stderr (`PairProgress`, through
    `rkekernels.ops.pair_sums.reporting`: pairs done, pairs/s, the time left).
    """
    arg = sig if many else sig[0]
    with PairProgress(f"scoring n={x.shape[0]:,}") if show else nullcontext() as bar:
        with reporting(bar), torch.no_grad():
            if t is None:
                out: dict[str, Any] = {"rke": _to_py(scores.rke_score(x, arg, backend=backend))}
            else:
                e = scores.rke_entropies(x, t, arg, sig_c, backend=backend)
                vals = {k: _to_py(getattr(e, k)) for k in e._fields}
                exp = (lambda v: [math.exp(a) for a in v]) if many else math.exp
                out = {"rke": exp(vals["h_x"]), "cond_rke": exp(vals["h_x_given_t"]), **vals}
    out["sigma"] = arg
    if t is not None:
        out["sigma_cond"] = sig_c
    return out


def _order_out(q: float) -> float | str:
    return "inf" if math.isinf(q) else q


def _score_order_q(x, t, sig, sig_c, many, q, kernel, method, dim) -> dict[str, Any]:
    """The order-q scores of `score_files` (another order, kernel or method than RKE's), by
    the ``method`` (and ``dim``) that `_pick_method` resolved."""
    kw: dict[str, Any] = {"kernel": kernel, "method": method, "dim": dim}
    if kernel == "gaussian":
        kw["sigma"] = sig if many else sig[0]
    with torch.no_grad():
        if t is None:
            out: dict[str, Any] = {"vendi": _to_py(vendi.vendi_score(x, q, **kw))}
        else:
            if kernel == "gaussian":
                kw["sigma_t"] = sig_c
            e = vendi.vendi_entropies(x, t, q, **kw)
            vals = {k: _to_py(getattr(e, k)) for k in e._fields}
            exp = (lambda v: [math.exp(a) for a in v]) if many else math.exp
            out = {"vendi": exp(vals["h_x"]), "cond_vendi": exp(vals["h_x_given_t"]), **vals}
            out["sigma_cond"] = sig_c
    if q == 2.0:
        out["rke"] = out["vendi"]
        if t is not None:
            out["cond_rke"] = out["cond_vendi"]
    out["sigma"] = (sig if many else sig[0]) if sig is not None else None
    return out


#: how `default_bandwidth` chose sigma, as ``score`` prints it
_RULE = "default_bandwidth: median distance / 2.5"


def _fmt(v: float) -> str:
    return f"{v:.6g}"


def _print_scores(res: dict[str, Any], args) -> None:
    shape = res["shape"]
    sig_default, cond_default = res["default_sigma"], res["default_sigma_cond"]
    print(f"samples: {args.path}  (n = {shape['n']}, d = {shape['d']})")
    if args.cond is not None:
        print(f"prompts: {args.cond}  (m = {shape['m']})")
    sigmas = res["sigma"] if isinstance(res["sigma"], list) else [res["sigma"]]
    q = f"{float(res['order']):g}"
    print(f"kernel {res['kernel']}, order q = {q}, method {res['method']}")
    if res["kernel"] == "gaussian":
        how = _RULE if sig_default else "given"
        print(f"bandwidth sigma      = {', '.join(_fmt(s) for s in sigmas)}  ({how})")
    if args.cond is not None and res["kernel"] == "gaussian":
        how = _RULE if cond_default else "given"
        print(f"bandwidth sigma_cond = {_fmt(res['sigma_cond'])}  ({how})")
    cols = [("sigma", "sigma")] if res["kernel"] == "gaussian" else []
    cols += [("rke", "RKE")] if "rke" in res else [("vendi", f"Vendi_{q}")]
    if args.cond is not None:
        cols += [("cond_rke", "cond RKE")] if "rke" in res else [("cond_vendi", f"cond Vendi_{q}")]
        cols += [
            ("h_x", f"H{q}(X)"),
            ("h_t", f"H{q}(T)"),
            ("h_xt", f"H{q}(X,T)"),
            ("h_x_given_t", f"H{q}(X|T)"),
            ("mutual_info", f"I{q}(X;T)"),
        ]
    rows = []
    for i in range(len(sigmas)):
        row = []
        for k, _ in cols:
            v = res[k]
            row.append(_fmt(v[i] if isinstance(v, list) else v))
        rows.append(row)
    widths = [max(len(h), *(len(r[j]) for r in rows)) for j, (_, h) in enumerate(cols)]
    print("  ".join(h.rjust(w) for (_, h), w in zip(cols, widths)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    if args.cond is not None:
        print(f"(entropies in nats; exp H{q}(X) and exp H{q}(X|T) are the scores)")


#: the options that `score_files` takes under their own names
_PASSED = (
    "key", "cond_key", "flatten", "backend", "progress", "order", "kernel", "method", "max_bytes",
)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Run ``rkekernels score`` from parsed options; print the scores; 0 on success."""
    if args.sigma_cond is not None and args.cond is None:
        raise CLIError("--sigma-cond needs --cond PATH (the prompt embeddings)")
    passed = {name: getattr(args, name) for name in _PASSED}
    res = score_files(args.path, args.cond, args.sigma, args.sigma_cond, **passed)
    if args.json:
        keys = ["rke", "vendi", "sigma"]
        if args.cond is not None:
            keys = ["rke", "cond_rke", "vendi", "cond_vendi", "h_x", "h_t", "h_xt"]
            keys += ["h_x_given_t", "mutual_info", "sigma", "sigma_cond"]
        keys += ["order", "kernel", "method"]
        try:  # strict JSON: never NaN or Infinity
            print(json.dumps({k: res[k] for k in keys if k in res}, allow_nan=False))
        except ValueError:
            raise CLIError("a score is not finite; this is a bug, please report it") from None
    else:
        _print_scores(res, args)
    return 0

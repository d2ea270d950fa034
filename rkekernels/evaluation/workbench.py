"""The evaluation workbench: score a folder of generated images (or embeddings) in one call.

`evaluate` embeds GEN (and REF, and the prompts) through `rkekernels.evaluation.embeddings`
(cached on disk), then computes the scores of ``rkekernels evaluate``; the command line prints
its result (``--json``) and writes the report from it (`rkekernels.cli.report`).

One bandwidth for every comparison, by construction: with a reference and no ``sigma``, GEN is
scored at the reference's `default_bandwidth` (two runs against one reference then share sigma
and compare); without a reference at GEN's own; ``sigma_from`` says which ("reference",
"generated" or "given").

The result holds n, d, encoder, encoder_model, sigma, sigma_from, rke (with a jackknife interval,
``rke_interval``), vendi (order 1, Gaussian at sigma), modes ([{sigma, weight, files}], only
modes that hold samples), the most and least crowded samples (largest / smallest
s_i = sum_j k(x_i, x_j)^2); with prompts sigma_t, cond_rke (with ``cond_rke_interval``) and
cond_vendi; with a reference m, relative_rke, novelty (KEN), novel_mass, novel_modes, and
novelty_null ({mean, std, draws}) with novelty_p (the null of `ken_novelty`; None when the
reference holds fewer than 2 n samples or null_draws = 0); and cache ({cached, encoded, dir}).
Several sigmas give lists (modes and novelty at the first one: ``modes_sigma``,
``novelty_sigma``). ``methods`` names the path of each output (rke, rke_interval, vendi, modes,
relative_rke, novelty; sweep with the report): "exact" or "rff" (`rkekernels.evaluation.paths`
chooses from measured cost); ``methods_error`` gives the stated error of the approximate ones.

Under ``torch.distributed`` (``torchrun ... -m rkekernels evaluate``) every rank runs `evaluate`:
each encodes every P-th file and the sums and rff covariances are split over the ranks
(`rkekernels.evaluation.ranks`); every rank returns the same result.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from .. import vendi
from .._errors import CLIError
from .._input import check_sigmas
from ..adapters import encoders
from ..scores import cond_rke_score, default_bandwidth, rke_score
from . import paths, ranks, ranks_spectra
from .embeddings import _encoder_key, _Encoders, default_cache_dir
from .inputs import _read_prompts, _Set

# the same functions, split over ranks under torch.distributed (one process: as they were)
from .ranks import cond_rke_interval, relative_rke, rke_interval
from .ranks_spectra import ken_novelty
from .statistics import plugin_interval

__all__ = ["evaluate"]


def _default_sigma(x: torch.Tensor) -> float:
    return float(default_bandwidth(x))


def _py(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().double()
        return float(v) if v.dim() == 0 else [float(a) for a in v]
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


def _modes_json(modes, names, per_mode: int, sigma: float) -> list[dict[str, Any]]:
    """The modes that hold samples (an eigenvector with no positive entry has none), each with
    the bandwidth it was found at."""
    return [
        {
            "sigma": sigma,
            "weight": float(m.weight),
            "files": [names[int(i)] for i in m.members[:per_mode]],
        }
        for m in modes
        if len(m.members)
    ]


def _pick_sigma(sigma, x, y) -> tuple[list[float], str]:
    """The bandwidths and where they came from: given, REF's default, or GEN's default."""
    if sigma is not None and not (isinstance(sigma, Sequence) and len(sigma) == 0):
        try:
            return check_sigmas(sigma, "sigma")[0], "given"  # a number or a sequence
        except (ValueError, TypeError) as exc:
            raise CLIError(str(exc)) from None
    if y is not None:
        return [_default_sigma(y)], "reference"
    return [_default_sigma(x)], "generated"


def evaluate(
    gen: str,
    reference: str | None = None,
    prompts: str | None = None,
    *,
    encoder: str = "dinov2",
    encoder_model: str | None = None,
    text_model: str | None = None,
    sigma: Sequence[float] | None = None,
    sigma_t: float | None = None,
    top: int = 8,
    per_mode: int = 8,
    crowded: int = 8,
    level: float = 0.95,
    unbiased: bool = False,
    cache_dir: str | os.PathLike | None = "default",
    batch_size: int = 32,
    device: str = "cpu",
    half: bool = False,
    pixels_size: int = 32,
    key: str | None = None,
    max_bytes: int | None = None,
    progress: bool = False,
    null_draws: int = 199,
    seed: int = 0,
    _keep: dict | None = None,
) -> dict[str, Any]:
    """Evaluate a folder of generated images (or an embedding file); the ``--json`` object.

    Scores (Gaussian kernel k_s(a, b) = exp(-||a - b||^2 / (2 s^2)) on the encoder's features)::

        rke          = n^2 / sum_ij k(x_i, x_j)^2, with a jackknife interval (`rke_interval`)
        vendi        = exp(-sum_l p_l log p_l), p = eig(K / n)      (order 1)
        cond_rke     = sum Kt^2 / sum Kx^2 Kt^2, cond_vendi (order 1)       (with prompts)
        relative_rke = n m / sum_ij k(x_i, y_j)^2, novelty = KEN(X | Y)      (with a reference)

    Args:
        gen: folder of images or embedding file. reference: the same, for novelty.
        prompts: prompt file (.txt, .csv) or prompt embeddings, one per GEN sample.
        encoder: "dinov2" (default), "clip", "inception" or "pixels".
        encoder_model: weights (hub id or local folder) for the encoder; None: its default.
        text_model: CLIP weights for the prompts (None: the clip encoder's, else the default).
        sigma: bandwidth(s); None: the default bandwidth of REF's features when a reference is
            given (so runs against one reference share it), else of GEN's. Several give lists.
        sigma_t: prompt bandwidth (None: the default bandwidth of the prompt embeddings).
        top, per_mode: how many modes, and files listed per mode. crowded: how many samples
            in the most / least crowded lists.
        level, unbiased: the interval's coverage and estimator (`rke_interval`).
        cache_dir: embeddings cache ("default": `default_cache_dir`, None: no cache).
        batch_size, device, half, pixels_size: encoder options; the scores run on ``device``
            too (the Triton kernels for CUDA).
        key: array name inside multi-array embedding files. max_bytes: the largest a
            compressed .npz array may inflate to (`rkekernels._files.load_array`).
        progress: tqdm progress bars on stderr.
        null_draws, seed: the novelty null (`ken_novelty`): KEN of ``null_draws`` reference
            subsets of n samples against the rest, and the p-value of the observed KEN
            (computed against m - n reference samples, the null's size). Needs m >= 2 n
            (else novelty_null and novelty_p are None); 0 turns it off. Cost: ``null_draws``
            eigenvalue problems of the reference's size (see `ken_novelty`).

    Returns:
        A JSON-ready dict (the keys are listed in the module docstring).

    Raises:
        CLIError: bad input (one line; the command exits with code 2).

    Example:
        >>> import numpy as np, tempfile, os
        >>> from rkekernels.evaluation import evaluate
        >>> p = os.path.join(tempfile.mkdtemp(), "x.npy")
        >>> np.save(p, np.repeat(np.eye(3) * 100.0, 4, axis=0))  # 3 far-apart modes
        >>> res = evaluate(p, sigma=[1.0], cache_dir=None)
        >>> round(res["rke"], 6), res["sigma_from"], [len(m["files"]) for m in res["modes"]]
        (3.0, 'given', [4, 4, 4])
    """
    root = default_cache_dir() if cache_dir == "default" else cache_dir
    if encoder not in encoders.ENCODERS:
        raise CLIError(f"unknown encoder {encoder!r}; choose one of {', '.join(encoders.ENCODERS)}")
    opts = dict(
        encoder=encoder,
        encoder_model=encoder_model,
        text_model=text_model,
        batch_size=batch_size,
        device=device,
        half=half,
        pixels_size=pixels_size,
    )
    stats = {"cached": 0, "encoded": 0}
    g, x, y, t = _embed_all(gen, reference, prompts, opts, key, root, progress, stats, max_bytes)
    dev = torch.device(device)  # the scores run where the encoder ran (Triton on CUDA)
    x = x.float().to(dev)
    y = y.to(dev) if y is not None else None
    t = t.to(dev) if t is not None else None
    if y is not None and y.shape[1] != x.shape[1]:
        raise CLIError(
            f"{reference}: features of width {y.shape[1]}, {gen}: width {x.shape[1]}; "
            "embed both sets with the same encoder"
        )
    if isinstance(null_draws, bool) or not isinstance(null_draws, int) or null_draws < 0:
        raise CLIError(f"null_draws must be an integer >= 0; got {null_draws!r}")
    sigmas, sigma_from = _pick_sigma(sigma, x, y)
    many = len(sigmas) > 1
    out: dict[str, Any] = {
        "n": x.shape[0],
        "d": int(x.shape[1]),
        "encoder": encoder if g.matrix is None else "embeddings",
        "encoder_model": (encoder_model or "default") if g.matrix is None else None,
        "sigma": sigmas if many else sigmas[0],
        "sigma_from": sigma_from,
    }
    arg = sigmas if many else sigmas[0]
    s0 = sigmas[0]
    enough = x.shape[0] >= (3 if unbiased else 2)  # leave-one-out sets need n - 1 >= 1 (2)
    grid = _grid(s0) if _keep is not None else []  # the report's sweep shares the pass
    try:
        with torch.no_grad():
            opts = (top, per_mode, crowded, level, unbiased, grid)
            grid_sums, floor_s = _score_set(out, x, g.names, arg, s0, enough, *opts)
            if t is not None:
                _score_prompts(out, x, t.float(), arg, sigma_t, enough, level, unbiased)
            if y is not None:
                null = (null_draws, seed)
                opts = (many, top, per_mode, null, floor_s)
                _score_reference(out, x, y.float(), g.names, arg, s0, *opts)
            if many:
                out["modes_sigma"] = s0
    except (ValueError, TypeError) as exc:
        raise CLIError(str(exc).splitlines()[0]) from None
    stats = {k: v for k, v in stats.items() if not k.startswith("_")}  # "_cache_off": internal
    out["cache"] = {**stats, "dir": str(root) if root is not None else None}
    if _keep is not None:  # what the report needs beyond the JSON
        _keep_report(_keep, out, x, y, g, s0, grid_sums, floor_s)
    return out


def _keep_report(keep, out, x, y, g, s0, grid_sums, floor_s) -> None:
    """The report's extras: GEN's sweep (its RKE from the shared pass) and REF's sweep."""
    with torch.no_grad():
        sweep = _sweep(x, s0, grid_sums, floor_s)
        _methods(out, sweep=sweep.pop("method"))
        ref_sweep = None
        if y is not None:  # all rows while they fit paths.REF_SHARE of the floor, else a subsample
            rows = paths.ref_rows(y.shape[0], x.shape[0])
            ref_sweep = _sweep(y.float() if rows is None else y[rows].float(), s0, None, floor_s)
            ref_sweep.pop("method")
            ref_sweep["rows"] = int(y.shape[0] if rows is None else len(rows))
    keep.update(x=x, gen=g, sigma=s0, sweep=sweep, ref_sweep=ref_sweep)


def _embed_all(gen, reference, prompts, opts, key, root, progress, stats, max_bytes=None):
    """GEN's set and the features of GEN, REF and the prompts (None where not given)."""
    try:
        g = _Set(gen, key=key, max_bytes=max_bytes)
        r = _Set(reference, key=key, max_bytes=max_bytes) if reference is not None else None
        plist = _read_prompts(prompts, g, max_bytes) if prompts is not None else None
        enc = _Encoders(opts)
        # float16 features differ from float32 ones in the last bits: cached apart
        ekey = _encoder_key(opts["encoder"], opts["encoder_model"], opts["pixels_size"])
        ekey += "|half" if opts["half"] else ""
        x, y = ranks.embed_sets([g, r], enc, root, ekey, progress, stats)
        t = ranks.embed_prompts(plist, enc, root, progress, stats) if plist is not None else None
    except encoders.EncoderUnavailableError as exc:
        raise CLIError(str(exc)) from None
    except ValueError as exc:  # unreadable images and API checks
        raise CLIError(str(exc).splitlines()[0]) from None
    return g, x, y, t


def _score_set(out, x, names, arg, s0, enough, top, per_mode, crowded, level, unbiased, grid):
    """RKE with its interval, Vendi, the modes and the most / least crowded samples of x.

    One exact pass gives the per-sample sums at every bandwidth of ``arg`` and of the sweep's
    ``grid`` (RKE, the plug-in interval, the crowded lists, the sweep's RKE); its time is the
    floor against which the eigen paths choose exact or rff (`paths.pick_eigen`). Returns the
    sums of the grid ((len(grid), n), float64) and the floor in seconds.
    """
    n, d = x.shape
    sig = list(arg) if isinstance(arg, list) else [arg]
    sx, floor_s = ranks.shared_sums(x, sig + list(grid))
    ci = None
    if enough and not unbiased:  # the plug-in interval from the shared sums
        ci = plugin_interval(sx[: len(sig)], level, isinstance(arg, list))
    elif enough:  # the unbiased one needs the off-diagonal sums: a pass of its own
        ci = rke_interval(x, arg, level=level, unbiased=unbiased)
    # the interval's own estimate: the unbiased RKE with --unbiased, else the plug-in RKE
    # from the same float64 sums (rke_score rounds to x's dtype)
    out["rke"] = _py(ci.estimate) if ci is not None and not unbiased else _py(rke_score(x, arg))
    out["rke_interval"] = {
        "low": _py(ci.low) if ci else None,
        "high": _py(ci.high) if ci else None,
        "level": level,
        "unbiased": unbiased,
    }
    out["rke_interval"]["estimate"] = _py(ci.estimate) if ci else None
    _methods(out, rke="exact", rke_interval="exact")
    meth, err = ranks.pick_eigen(n, "eigvalsh", len(sig), floor_s, n, d)
    out["vendi"] = _py(ranks_spectra.vendi_score(x, 1.0, arg, **_opts(meth)))
    _methods(out, vendi=(meth, err))
    meth, err = ranks.pick_eigen(n, "eigh", 1, floor_s, n, d)
    modes = ranks_spectra.vendi_modes(x, min(top, n), s0, **_opts(meth))
    out["modes"] = _modes_json(modes, names, per_mode, s0)
    _methods(out, modes=(meth, err))
    sums = sx[0]
    order = torch.argsort(sums, descending=True).tolist()
    k = min(crowded, n)
    out["most_crowded"] = [{"file": names[i], "s": float(sums[i])} for i in order[:k]]
    out["least_crowded"] = [{"file": names[i], "s": float(sums[i])} for i in order[::-1][:k]]
    return sx[len(sig) :], floor_s


def _opts(method: str, dim: int | None = None) -> dict[str, Any]:
    """vendi / ken_novelty keyword arguments for a path of `paths.pick_eigen` (dim: rff's)."""
    if method != "rff":
        return {"method": method}
    return {"method": method, "dim": dim or paths.APPROX_DIM}


def _methods(out: dict[str, Any], **paths_: Any) -> None:
    """Record which path produced each output (``methods``) and, where approximate, its stated
    error (``methods_error``: 1 / sqrt(dim), see `rkekernels.evaluation.paths`)."""
    for name, p in paths_.items():
        meth, err = p if isinstance(p, tuple) else (p, 0.0)
        out.setdefault("methods", {})[name] = meth
        if meth != "exact":
            out.setdefault("methods_error", {})[name] = err


def _score_prompts(out, x, t, arg, sigma_t, enough, level, unbiased) -> None:
    """The conditional RKE (with its interval) and conditional Vendi given the prompts t."""
    st = float(sigma_t) if sigma_t is not None else _default_sigma(t)
    out["sigma_t"] = st
    # cond_rke is the plug-in score, as rke is; unbiased changes only the interval (and its
    # own estimate, cond_rke_interval["estimate"])
    if enough:
        cci = cond_rke_interval(x, t, arg, st, level=level, unbiased=unbiased)
        plug = cci.estimate if not unbiased else cond_rke_score(x, t, arg, st)
        out["cond_rke"] = _py(plug)
        out["cond_rke_interval"] = {
            "low": _py(cci.low),
            "high": _py(cci.high),
            "estimate": _py(cci.estimate),
            "unbiased": unbiased,
        }
    else:
        out["cond_rke"] = _py(cond_rke_score(x, t, arg, st))
        out["cond_rke_interval"] = {"low": None, "high": None, "estimate": None}
        out["cond_rke_interval"]["unbiased"] = unbiased
    out["cond_vendi"] = _py(vendi.cond_vendi_score(x, t, 1.0, arg, st))


def _score_reference(out, x, y, names, arg, s0, many, top, per_mode, null, floor_s) -> None:
    """Relative RKE and KEN novelty (with the novel modes and its null) of x against y.

    KEN is exact (a general eigenproblem of n + m rows) while `paths.pick_eigen` predicts it
    cheap enough against the floor ``floor_s`` (the shared pass over n samples), else rff.
    """
    draws, seed = null
    n, m = x.shape[0], y.shape[0]
    out["m"] = int(m)
    rel_path = paths.pick_pairs(n * m, floor_s, n)
    if rel_path == "exact":
        out["relative_rke"] = _py(relative_rke(x, y, arg))
        _methods(out, relative_rke="exact")
    else:  # the n m cross pairs would cost more than the shared pass: random features
        sig = arg if isinstance(arg, list) else [arg]
        est = [paths.cross_rff(x, y, s) for s in sig]
        out["relative_rke"] = [e for e, _ in est] if many else est[0][0]
        _methods(out, relative_rke=("rff", max(err for _, err in est)))
    draws = draws if m >= 2 * n else 0  # the null needs reference subsets of n and the rest
    meth, err = ranks.pick_eigen(n + m, "eig", 1, floor_s, n, x.shape[1])
    # the null's eigvalsh fit the floor (decided on rank 0, as the path)
    dim = ranks.on_root(paths.null_dim, draws, floor_s) if meth == "rff" and draws else None
    err = 1.0 / math.sqrt(dim) if dim else err
    opts = {"top": top, "per_mode": per_mode, "null_draws": draws, "seed": seed, **_opts(meth, dim)}
    nov = ken_novelty(x, y, s0, **opts)
    _methods(out, novelty=(meth, err))
    out["novelty"] = nov.score
    out["novel_mass"] = nov.novel_mass
    out["novelty_null"] = (
        {"mean": nov.null_mean, "std": nov.null_std, "draws": draws} if draws else None
    )
    out["novelty_p"] = nov.p_value
    out["novel_modes"] = _modes_json(nov.modes, names, per_mode, s0)
    if many:
        out["novelty_sigma"] = s0


def _grid(s0: float) -> list[float]:
    """The sweep's 9 bandwidths s0 * 2^(-2 .. 2) in half-octave steps."""
    return [s0 * 2.0 ** (k / 2.0) for k in range(-4, 5)]


def _sweep(x: torch.Tensor, s0: float, sums, floor_s: float) -> dict[str, Any]:
    """RKE (with its interval) and Vendi over the 9 bandwidths of `_grid`, and the Vendi path.

    ``sums``: x's per-sample sums over the grid from the shared pass (None: computed here).
    Vendi runs exact or rff (``paths.SWEEP_DIM`` features: a curve, not a headline number) as
    `paths.pick_eigen` decides for 9 problems against ``floor_s``.
    """
    grid = _grid(s0)
    if x.shape[0] < 2:  # one sample: RKE = 1 at every bandwidth, no interval
        ones = [1.0] * len(grid)
        return {"sigma": grid, "rke": ones, "low": ones, "high": ones, "vendi": ones,
                "method": "exact"}  # fmt: skip
    if sums is None:
        sums, _ = ranks.shared_sums(x, grid)
    ci = plugin_interval(sums, 0.95, True)
    n, d = x.shape
    meth, err = ranks.pick_eigen(n, "eigvalsh", len(grid), floor_s, n, d, paths.SWEEP_DIM)
    return {
        "sigma": grid,
        "rke": [float(v) for v in ci.estimate],
        "low": [float(v) for v in ci.low],
        "high": [float(v) for v in ci.high],
        "vendi": _py(ranks_spectra.vendi_score(x, 1.0, grid, **_opts(meth, paths.SWEEP_DIM))),
        "method": (meth, err),
    }

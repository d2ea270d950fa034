"""Evaluation beyond one number: per-sample sums, confidence intervals, two-set similarity.

Gaussian kernel k_s(a, b) = exp(-||a - b||^2 / (2 s^2)) as everywhere in the library (SPEC 2).

- `sample_sums`: s_i = sum_j k(x_i, x_j)^2, the density of each sample's mode (large = crowded,
  1 = alone), streamed in O(n) memory over the tiles of the fused score kernels; sum_i s_i is the
  denominator F of RKE = n^2 / F.
- `rke_interval`, `cond_rke_interval`: jackknife confidence intervals for RKE and conditional
  RKE from these sums in O(n) extra work (leave-one-out: F_{-i} = F - 2 s_i + 1), optionally for
  the unbiased (U-statistic, off-diagonal) estimator.
- `relative_rke`: n m / sum_ij k(x_i, y_j)^2 over the cross pairs (exact, streamed): the inverse
  mean cross similarity of two sets.

KEN novelty against a reference (`ken_novelty`, with its null) is `rkekernels.evaluation.novelty`;
the modes of one set and its Vendi scores are `rkekernels.vendi_modes` / `vendi_score`.
"""

from __future__ import annotations

import functools
import math
from statistics import NormalDist
from typing import Any, NamedTuple

import torch

from .._input import as_tensor, check_matrix, check_same_device, is_torch, to_output
from ..metrics import cross_pair_sums  # the streamed A x B block sums
from ..ops import scores_torch
from ..scores import _pair, _resolve_sigma

__all__ = [
    "Interval",
    "SampleSums",
    "cond_rke_interval",
    "relative_rke",
    "rke_interval",
    "sample_sums",
]


class SampleSums(NamedTuple):
    """Per-sample kernel sums (float64), see `sample_sums`.

    Attributes:
        x: s_i = sum_j Kx[i, j]^2, (n,) (or (K, n) over K bandwidths).
        t: sum_j Kt[i, j]^2 (n,), or None without prompts.
        xt: sum_j Kx^2 Kt^2 (n,) (or (K, n)), or None without prompts.
    """

    x: Any
    t: Any
    xt: Any


class Interval(NamedTuple):
    """A point estimate with a jackknife confidence interval (floats, or arrays over sigma).

    Attributes:
        estimate: the score on all n samples.
        low, high: the interval exp(log(estimate) -/+ z se), z the normal quantile of ``level``.
        se_log: the jackknife standard error of log(estimate).
        level: the coverage asked for (0.95 by default).
    """

    estimate: Any
    low: Any
    high: Any
    se_log: Any
    level: float


# --------------------------------------------------------------------------- per-sample sums


def _centred(*mats: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [m - m.mean(0, keepdim=True) if m is not None else None for m in mats]


def _sums(x, t, sigma, sigma_t, off: bool = False, shard: tuple[int, int] | None = None):
    """Validated inputs -> (n, sigmas, many, torch_out, float64 s_x (K, n), s_t, s_xt).

    ``off``: the off-diagonal row sums r_i = s_i - 1 instead (computed without the diagonal, see
    `_off_row_sums`), and one more item: the recompute of a sum over a subset of the rows.
    ``shard=(rank, world)`` (not with ``off``): only that rank's tiles, partial sums that add up
    over the ranks (`rkekernels.evaluation.ranks`).
    """
    xt, tt, sigmas, many, st, _, torch_out = _pair(x, t, sigma, sigma_t, "torch")
    xc, tc = _centred(xt.detach(), tt.detach() if tt is not None else None)
    inv_t = 1.0 / (st * st) if st is not None else None
    inv_x = [1.0 / (s * s) for s in sigmas]
    if not off:
        sx, s_t, sxt = scores_torch.row_sums(xc, tc, inv_x, inv_t, shard=shard)
        return xt.shape[0], sigmas, many, torch_out, sx, s_t, sxt
    sx, s_t, sxt = _off_row_sums(xc, tc, inv_x, inv_t)

    @functools.cache
    def without(i: int):  # the off-diagonal sums of the set without sample i
        keep = torch.arange(xc.shape[0], device=xc.device) != i
        sub = _off_row_sums(xc[keep], tc[keep] if tc is not None else None, inv_x, inv_t)
        return [v.sum(-1) if v is not None else None for v in sub]

    return xt.shape[0], sigmas, many, torch_out, sx, s_t, sxt, without


def _off_row_sums(xc, tc, inv_sx2, inv_st2):
    """Off-diagonal row sums r_i = sum_{j != i} k^2, float64 ((K, n), (n,) or None, (K, n) or None).

    The tiles of `scores_torch.row_sums` with each diagonal tile's diagonal set to 0 before its
    rows are summed: an off-diagonal mass far below 1 (neighbours at 5e-22) is kept, where
    s_i - 1 or F - n would lose it to the diagonal's ones.
    """
    n, K = xc.shape[0], len(inv_sx2)
    nx = scores_torch.sq_norms(xc)
    nt = scores_torch.sq_norms(tc) if tc is not None else None
    acc = torch.zeros(2 * K + 1, n, dtype=torch.float64, device=xc.device)
    ones = xc.new_ones(min(n, max(scores_torch.BLOCK_ROWS, scores_torch.BLOCK_COLS)))
    for i0, i1, j0, j1, diag in scores_torch.tiles(n):

        def add(slot, tile, i0=i0, j0=j0, diag=diag):
            if diag:
                tile.diagonal().zero_()  # later products (and squares) of this tile need it 0
            scores_torch.add_row_col_sums(acc[slot], tile, i0, j0, diag, ones)

        ta, tb = (tc[i0:i1], tc[j0:j1]) if tc is not None else (None, None)
        na, nb = (nt[i0:i1], nt[j0:j1]) if tc is not None else (None, None)
        scores_torch.block_sums(
            acc, 1.0, xc[i0:i1], nx[i0:i1], xc[j0:j1], nx[j0:j1], diag, inv_sx2,
            ta, na, tb, nb, inv_st2, add=add,
        )  # fmt: skip
    has_t = tc is not None
    return acc[:K], acc[K] if has_t else None, acc[K + 1 :] if has_t else None


def sample_sums(x: Any, t: Any = None, sigma: Any = None, sigma_t: Any = None) -> SampleSums:
    """Per-sample contributions s_i = sum_j k_s(x_i, x_j)^2, streamed in O(n) memory.

    s_i is the (unnormalised) density of the mode of sample i: 1 for a sample far from all
    others, up to n for a set of copies. sum_i s_i = F, the denominator of RKE = n^2 / F, so
    s_i / F is sample i's share of the "crowding". With prompt embeddings also the prompt sums
    sum_j Kt[i,j]^2 and the joint sums sum_j Kx^2 Kt^2 (conditional RKE = sum Kt^2 / sum Kx^2 Kt^2).

    The tiles are those of the fused score kernels (one GEMM per tile of the upper triangle);
    no gradient.

    Args:
        x: (n, d) samples (torch, numpy or ``__dlpack__``).
        t: (n, m) prompt embeddings or None.
        sigma: bandwidth(s) for x, None for the default bandwidth.
        sigma_t: one bandwidth for t (None: its default bandwidth).

    Returns:
        SampleSums(x, t, xt): float64 tensors for torch input, numpy arrays otherwise; x and xt
        are (n,) for one sigma, (K, n) for several.

    Example:
        >>> import numpy as np
        >>> from rkekernels.evaluation import sample_sums
        >>> x = np.array([[0.0], [0.0], [50.0]])  # two copies and one far sample
        >>> sample_sums(x, sigma=1.0).x.round(6).tolist()
        [2.0, 2.0, 1.0]
    """
    _, _, many, torch_out, sx, s_t, sxt = _sums(x, t, sigma, sigma_t)

    def out(v):
        if v is None:
            return None
        if v.dim() == 2 and not many:
            v = v[0]
        return v if torch_out else v.cpu().numpy()

    return SampleSums(out(sx), out(s_t), out(sxt))


# --------------------------------------------------------------------------- intervals


def _z(level: float) -> float:
    if not isinstance(level, int | float) or not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95; got {level!r}")
    return NormalDist().inv_cdf(0.5 + float(level) / 2.0)


def _jackknife(theta: torch.Tensor, loo: torch.Tensor, z: float, level: float, many: bool):
    """theta (K,) = log estimate, loo (K, n) leave-one-out logs -> Interval (floats/arrays)."""
    n = loo.shape[1]
    dev = loo - loo.mean(1, keepdim=True)
    se = torch.sqrt((n - 1) / n * (dev * dev).sum(1))
    vals = [theta.exp(), (theta - z * se).exp(), (theta + z * se).exp(), se]
    arrs = [v.cpu().numpy() for v in vals]
    if not many:
        arrs = [float(a[0]) for a in arrs]
    return Interval(*arrs, level=float(level))


def _need_n(n: int, unbiased: bool) -> None:
    need = 3 if unbiased else 2
    if n < need:
        raise ValueError(
            f"a jackknife interval needs n >= {need} samples (leave-one-out sets of n - 1); got {n}"
        )


#: a leave-one-out off-diagonal sum off - 2 r_i below this fraction of off has lost its digits
#: to cancellation; it is summed again without sample i (at most 2 rows per sum can be that low)
_LOO_RECOMPUTE = 1e-8


def _off_diagonal(r: torch.Tensor, what: str, sigmas, without, slot: int):
    """(off (K,), off_{-i} (K, n)) from off-diagonal row sums r (K, n); ValueError where 0.

    off = sum_i r_i; removing sample i removes its row and column: off_{-i} = off - 2 r_i.
    Where that falls below ``_LOO_RECOMPUTE`` off it is recomputed exactly (``without(i)``, one
    O(n^2) pass over the other rows). No off-diagonal mass (the U-statistic is 1 / 0) in the
    whole set or in a leave-one-out set raises: the estimator, or its jackknife, is undefined.
    """
    off = r.sum(-1)
    if bool((off <= 0).any()):
        raise ValueError(
            f"the unbiased estimator is undefined: every off-diagonal {what} underflows to 0 at "
            f"sigma={sigmas}; use a larger sigma or unbiased=False"
        )
    loo = off[:, None] - 2.0 * r
    lost = (loo <= _LOO_RECOMPUTE * off[:, None]).any(0).nonzero().flatten().tolist()
    for i in lost:
        loo[:, i] = without(i)[slot]
    if bool((loo <= 0).any()):
        i = int((loo <= 0).any(0).nonzero()[0])
        raise ValueError(
            f"the unbiased estimator's jackknife is undefined: without sample {i} every "
            f"off-diagonal {what} underflows to 0 at sigma={sigmas} (that leave-one-out score "
            "is infinite); use a larger sigma or unbiased=False"
        )
    return off, loo


def rke_interval(
    x: Any, sigma: Any = None, *, level: float = 0.95, unbiased: bool = False
) -> Interval:
    """RKE with a jackknife confidence interval, in O(n) work on top of the sums.

    With s_i from `sample_sums` and F = sum_i s_i, removing sample i leaves
    F_{-i} = F - 2 s_i + 1, so every leave-one-out score costs O(1)::

        plug-in  (V-statistic, the library's RKE):  theta = log(n^2 / F)
                 theta_{-i} = log((n - 1)^2 / F_{-i})
        unbiased (U-statistic, off-diagonal pairs): theta = log(n (n - 1) / O)
                 theta_{-i} = log((n - 1)(n - 2) / O_{-i}),   O_{-i} = O - 2 r_i
        se^2 = (n - 1)/n sum_i (theta_{-i} - mean theta_{-.})^2,   CI = exp(theta -/+ z se)

    Unbiased: O = sum_{i != j} k(x_i, x_j)^2 and r_i = sum_{j != i} k(x_i, x_j)^2 are summed
    without the diagonal (not as F - n, which loses a small off-diagonal mass to the n ones);
    an O_{-i} that cancels below 1e-8 O is summed again without sample i (O(n^2), at most two
    such rows). With no off-diagonal mass at all, in the set or in a leave-one-out set (its
    score is infinite), ValueError: the estimator or its jackknife is undefined there.

    The interval is on the log scale (RKE is a ratio; its log is close to normal). The unbiased
    estimator's target is 1 / E[k(x, x')^2] over independent pairs, the population RKE; the
    plug-in one counts the diagonal (k = 1) and so is biased low by O(1/n).

    Args:
        x: (n, d) samples, n >= 2 (n >= 3 with ``unbiased``).
        sigma: bandwidth(s) (None: the default bandwidth); several give arrays.
        level: the coverage, in (0, 1).
        unbiased: use the off-diagonal (U-statistic) estimator.

    Returns:
        Interval(estimate, low, high, se_log, level): floats (numpy arrays for several sigmas).

    Example:
        >>> import numpy as np
        >>> from rkekernels.evaluation import rke_interval
        >>> x = np.random.default_rng(0).normal(size=(200, 2))
        >>> ci = rke_interval(x, sigma=1.0)
        >>> ci.low < ci.estimate < ci.high
        True
    """
    z = _z(level)
    if unbiased:
        n, sigmas, many, _, rx, _, _, without = _sums(x, None, sigma, None, off=True)
        _need_n(n, unbiased)
        off, off_loo = _off_diagonal(rx, "kernel value", sigmas, without, 0)
        theta = math.log(n * (n - 1)) - torch.log(off)
        loo = math.log((n - 1) * (n - 2)) - torch.log(off_loo)
    else:
        n, sigmas, many, _, sx, _, _ = _sums(x, None, sigma, None)
        _need_n(n, unbiased)
        return plugin_interval(sx, level, many)
    return _jackknife(theta, loo, z, level, many)


def plugin_interval(sx: torch.Tensor, level: float = 0.95, many: bool = True) -> Interval:
    """The plug-in `rke_interval` from per-sample sums sx (float64 (K, n), `sample_sums`).

    F = sum_i s_i, F_{-i} = F - 2 s_i + 1; theta = log(n^2 / F), jackknife as in `rke_interval`
    (which calls this). ``many=False`` gives floats for K = 1.
    """
    z = _z(level)
    n = sx.shape[1]
    _need_n(n, False)
    f = sx.sum(1)
    f_loo = f[:, None] - 2.0 * sx + 1.0
    theta = 2.0 * math.log(n) - torch.log(f)
    loo = 2.0 * math.log(n - 1) - torch.log(f_loo)
    return _jackknife(theta, loo, z, level, many)


def cond_rke_interval(
    x: Any,
    t: Any,
    sigma: Any = None,
    sigma_t: Any = None,
    *,
    level: float = 0.95,
    unbiased: bool = False,
) -> Interval:
    """Conditional RKE with a jackknife confidence interval, O(n) work on top of the sums.

    CondRKE = F_t / F_xt with F_t = sum_ij Kt^2, F_xt = sum_ij Kx^2 Kt^2; leaving sample i out
    gives F_{t,-i} = F_t - 2 st_i + 1 and F_{xt,-i} = F_xt - 2 sxt_i + 1 (the row sums of
    `sample_sums`). Unbiased: O_t / O_xt, the sums over the off-diagonal pairs only (summed
    without the diagonal), and leave-one-out O_{t,-i} / O_{xt,-i} with O_{-i} = O - 2 r_i (r_i
    the off-diagonal row sums; recomputed and errors as in `rke_interval`). Jackknife on the log
    scale as in `rke_interval`.

    Args:
        x: (n, d) samples. t: (n, m) prompt embeddings.
        sigma, sigma_t: bandwidths (None: defaults); several sigma give arrays.
        level, unbiased: as in `rke_interval`.

    Returns:
        Interval(estimate, low, high, se_log, level).

    Example:
        >>> import numpy as np
        >>> from rkekernels.evaluation import cond_rke_interval
        >>> rng = np.random.default_rng(0)
        >>> x, t = rng.normal(size=(100, 2)), rng.normal(size=(100, 3))
        >>> ci = cond_rke_interval(x, t, sigma=1.0, sigma_t=1.0)
        >>> ci.low < ci.estimate < ci.high
        True
    """
    if t is None:
        raise ValueError("t is None: cond_rke_interval needs prompt embeddings t of shape (n, m)")
    z = _z(level)
    if unbiased:
        n, sigmas, many, _, _, r_t, rxt, without = _sums(x, t, sigma, sigma_t, off=True)
        _need_n(n, unbiased)
        num, num_loo = _off_diagonal(r_t[None], "prompt kernel value", sigma_t, without, 1)
        den, den_loo = _off_diagonal(rxt, "joint kernel value", sigmas, without, 2)
        theta = torch.log(num) - torch.log(den)
        loo = torch.log(num_loo) - torch.log(den_loo)
    else:
        _, _, many, _, _, s_t, sxt = _sums(x, t, sigma, sigma_t)
        return plugin_cond_interval(s_t, sxt, level, many)
    return _jackknife(theta, loo, z, level, many)


def plugin_cond_interval(
    s_t: torch.Tensor, sxt: torch.Tensor, level: float = 0.95, many: bool = True
) -> Interval:
    """The plug-in `cond_rke_interval` from per-sample sums (`sample_sums`: s_t (n,), s_xt (K, n)).

    F_t = sum_i st_i, F_xt = sum_i sxt_i, theta = log(F_t / F_xt); leaving sample i out:
    F_{t,-i} = F_t - 2 st_i + 1, F_{xt,-i} = F_xt - 2 sxt_i + 1; jackknife as in `rke_interval`
    (`cond_rke_interval` calls this). ``many=False`` gives floats for K = 1.
    """
    z = _z(level)
    _need_n(s_t.shape[0], False)
    ft, fxt = s_t.sum(), sxt.sum(1)
    ft_loo = ft - 2.0 * s_t[None, :] + 1.0
    fxt_loo = fxt[:, None] - 2.0 * sxt + 1.0
    theta = torch.log(ft) - torch.log(fxt)
    loo = torch.log(ft_loo) - torch.log(fxt_loo)
    return _jackknife(theta, loo, z, level, many)


# --------------------------------------------------------------------------- two sets


def _two_sets(x: Any, y: Any, sigma: Any):
    torch_out = is_torch(x)
    xt, yt = as_tensor(x, "x"), as_tensor(y, "y")
    check_same_device(x=xt, y=yt)
    xt, yt = check_matrix(xt, "x"), check_matrix(yt, "y")
    if xt.shape[1] != yt.shape[1]:
        raise ValueError(
            f"x and y must have the same width d: x is (n, {xt.shape[1]}), y is (m, {yt.shape[1]})"
            " (embed both sets with the same encoder)"
        )
    dt = torch.promote_types(xt.dtype, yt.dtype)
    xt, yt = xt.to(dt), yt.to(dt)
    sigmas, many = _resolve_sigma(sigma, xt, "sigma")
    return xt, yt, sigmas, many, torch_out


def relative_rke(x: Any, y: Any, sigma: Any = None):
    """Relative RKE of two sets: n m / sum_ij k_s(x_i, y_j)^2 over the n x m cross pairs.

    The inverse mean squared cross similarity: about RKE(X) when X and Y come from one
    distribution, larger when X lies away from Y (1 when X and Y are copies of one point; up to
    overflow when they share no mode). Exact, streamed over tiles (O((n + m) d) memory). This is
    not rke-score's nuclear-norm RRKE.

    Args:
        x: (n, d) samples (e.g. generated). y: (m, d) samples (e.g. the reference).
        sigma: bandwidth(s); None uses the default bandwidth of x (as ``rke_score(x)``).

    Returns:
        A 0-dim tensor (1-D for several sigmas) for torch x, else a float (numpy array).

    Example:
        >>> import numpy as np
        >>> from rkekernels.evaluation import relative_rke
        >>> x, y = np.zeros((2, 1)), np.array([[0.0], [1.0]])
        >>> round(relative_rke(x, y, sigma=1.0), 6)  # 4 / (2 + 2 exp(-1))
        1.462117
    """

    xt, yt, sigmas, many, torch_out = _two_sets(x, y, sigma)
    centre = torch.cat([xt, yt]).detach().mean(0, keepdim=True)
    out, _ = cross_pair_sums(
        (xt - centre).detach(), (yt - centre).detach(), [1.0 / (s * s) for s in sigmas]
    )
    k = len(sigmas)
    val = xt.shape[0] * yt.shape[0] / out[:k]
    return to_output(val.to(xt.dtype), torch_out, many)

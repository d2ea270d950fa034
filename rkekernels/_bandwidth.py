"""The inputs of the score functions: validation and the default bandwidth.

`_pair` is the one validation and bandwidth-resolution path of the Gaussian scores
(`rkekernels.scores`), the order-q scores (`rkekernels.vendi`) and the evaluation helpers;
`bandwidth_from_tensor` is the default bandwidth (`rkekernels.default_bandwidth`) of a validated
tensor, for the one-process and the distributed scores alike.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ._input import (
    as_tensor,
    check_backend,
    check_matrix,
    check_same_device,
    check_same_rows,
    check_sigmas,
    check_single_sigma,
    is_torch,
)
from .ops.pair_sums import prepare

_MEDIAN_ROWS = 1000


def _prepare(x: Any, name: str) -> torch.Tensor:
    return check_matrix(as_tensor(x, name), name)


def _subsample_sq_dists(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(m x m squared distances of at most 1,000 rows drawn with a fixed seed, the scale a):
    float64, in units of the power-of-two scale a of `prepare` (no overflow)."""
    n = x.shape[0]
    xs = x.detach()
    if n > _MEDIAN_ROWS:
        gen = torch.Generator().manual_seed(0)
        idx = torch.randperm(n, generator=gen)[:_MEDIAN_ROWS].to(x.device)
        xs = xs.index_select(0, idx)
    # power-of-two scaling and anchored centring (exact; no overflow near the float64 limit)
    xs, scale = prepare(xs.double())
    nrm = (xs * xs).sum(1)
    d2 = (nrm[:, None] + nrm[None, :] - 2.0 * xs @ xs.t()).clamp_(min=0.0)
    d2.fill_diagonal_(0.0)
    return d2, scale


def _median_from_tensor(x: torch.Tensor) -> float:
    n = x.shape[0]
    if n < 2:
        return 1.0
    full, scale = _subsample_sq_dists(x)
    return _median_of(full, scale)


def _median_of(full: torch.Tensor, scale: float) -> float:
    m = full.shape[0]
    iu = torch.triu_indices(m, m, offset=1, device=full.device)
    d2 = full[iu[0], iu[1]]
    med = float(torch.quantile(d2.sqrt(), 0.5))  # at most 499,500 pairs
    if med > 0.0:
        return med * scale
    pos = d2[d2 > 0]
    if pos.numel():  # more than half the pairs coincide: fall back to the mean positive distance
        return float(pos.sqrt().mean()) * scale
    return 1.0  # all points equal: every bandwidth gives the same score


#: The grid of `default_bandwidth`: bandwidths from a quarter of the typical nearest-neighbour
#: distance to twice the median distance, and the band of scores in which it looks for the
#: flattest stretch (above: every point is its own mode; below: one mode).
_GRID_POINTS = 25
_PLATEAU_LOW = 1.5
_PLATEAU_HIGH_FRACTION = 0.25


def _default_from_tensor(x: torch.Tensor) -> float:
    n = x.shape[0]
    if n < 2:
        return 1.0
    d2, scale = _subsample_sq_dists(x)
    med = _median_of(d2, scale) / scale
    m = d2.shape[0]
    off = d2 + torch.diag(torch.full((m,), math.inf, dtype=d2.dtype, device=d2.device))
    off = torch.where(off > 0, off, torch.full_like(off, math.inf))  # duplicates are not NNs
    nn = off.min(1).values
    nn = nn[torch.isfinite(nn)]
    if nn.numel() == 0 or med <= 0.0:
        return med * scale
    low = float(nn.sqrt().median()) / 4.0
    grid = torch.logspace(
        math.log10(low), math.log10(2.0 * med), _GRID_POINTS, dtype=torch.float64
    ).to(d2.device)
    # RKE(grid) of the subsample, in one dense pass (m <= 1,000)
    rke = torch.stack([m * m / torch.exp(-d2 / (s * s)).sum() for s in grid])
    lr = torch.log(rke)
    slope = (lr[1:] - lr[:-1]).abs() / (torch.log(grid[1:]) - torch.log(grid[:-1]))
    mid = torch.sqrt(rke[1:] * rke[:-1])
    ok = (mid >= _PLATEAU_LOW) & (mid <= _PLATEAU_HIGH_FRACTION * m)
    if not bool(ok.any()):
        return med * scale
    i = int(torch.argmin(torch.where(ok, slope, torch.full_like(slope, math.inf))))
    return float(torch.sqrt(grid[i] * grid[i + 1])) * scale


def bandwidth_from_tensor(x: torch.Tensor) -> float:
    """The default bandwidth (`default_bandwidth`) of an already validated (n, d) tensor: the
    one-process scores and the distributed ones (on the gathered set) both take it from here."""
    return _default_from_tensor(x)


def _resolve_sigma(sigma: Any, x: torch.Tensor, name: str) -> tuple[list[float], bool]:
    if sigma is None:
        return [bandwidth_from_tensor(x)], False
    return check_sigmas(sigma, name)


def _pair(x: Any, t: Any, sigma: Any, sigma_t: Any, backend: Any):
    torch_out = is_torch(x)
    xt = as_tensor(x, "x")
    tt = as_tensor(t, "t") if t is not None else None
    check_same_device(x=xt, t=tt)
    xt = check_matrix(xt, "x")
    if tt is not None:
        tt = check_matrix(tt, "t")
        check_same_rows(xt, tt)
        if tt.dtype != xt.dtype:
            dt = torch.promote_types(xt.dtype, tt.dtype)
            xt, tt = xt.to(dt), tt.to(dt)
    resolved = check_backend(backend, xt.device)
    sigmas, many = _resolve_sigma(sigma, xt, "sigma")
    st = None
    if tt is not None:
        st = bandwidth_from_tensor(tt) if sigma_t is None else check_single_sigma(sigma_t)
    return xt, tt, sigmas, many, st, resolved, torch_out

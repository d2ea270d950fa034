"""The inputs of the score functions: validation and the default bandwidth.

`_pair` is the one validation and bandwidth-resolution path of the Gaussian scores
(`rkekernels.scores`), the order-q scores (`rkekernels.vendi`) and the evaluation helpers;
`_shard` validates one rank's shard for the distributed scores (`rkekernels.distributed`);
`bandwidth_from_tensor` is the default bandwidth (`rkekernels.default_bandwidth`) of a validated
tensor, for the one-process and the distributed scores alike.
"""

from __future__ import annotations

import math
import warnings
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
from .ops.pair_sums import prepare, scale_of

_MEDIAN_ROWS = 1000


def _prepare(x: Any, name: str) -> torch.Tensor:
    return check_matrix(as_tensor(x, name), name)


def sample_rows(x: torch.Tensor, limit: int = _MEDIAN_ROWS) -> torch.Tensor:
    """At most ``limit`` rows of x, drawn with a fixed seed (x itself when it has no more): the
    subsample of `median_bandwidth` and of guidance's automatic bandwidths."""
    if x.shape[0] <= limit:
        return x
    gen = torch.Generator().manual_seed(0)
    return x.index_select(0, torch.randperm(x.shape[0], generator=gen)[:limit].to(x.device))


def _subsample_sq_dists(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(m x m squared distances of at most 1,000 rows drawn with a fixed seed, the scale a):
    float64, in units of the power-of-two scale a of `prepare` (no overflow)."""
    xs = sample_rows(x.detach())
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


#: `default_bandwidth`: sigma = median distance / _DIVISOR (a pair at the median distance then has
#: k^2 = exp(-_DIVISOR^2) = 0.002: two typical points are two modes). The warning fires when the
#: mean k^2 over pairs is below _STRUCTURE_MIN times that value (the distances concentrate), on
#: sets of at least _WARN_ROWS rows. The rows are canonically ordered by a projection on a fixed
#: direction (seed _KEY_SEED), which makes the choice independent of the input's row order.
_DIVISOR = 2.5
_STRUCTURE_MIN = 2.0
_WARN_ROWS = 20
_KEY_SEED = 0
_NO_STRUCTURE = (
    "default_bandwidth: the pairwise distances of this set concentrate (nearly every pair is "
    "about equally far apart, as in high-dimensional noise), so no bandwidth separates near "
    "points from far ones and the score at the default mostly counts points. Compare sets at "
    "one shared bandwidth over a sweep instead: `rkekernels compare --sweep` or "
    "`rkekernels.rke_sweep`."
)


def _canonical_rows(x: torch.Tensor) -> torch.Tensor:
    """At most 1,000 rows of x in an order that does not depend on the order of x: the rows
    sorted by their projection on a fixed random direction (equal rows tie, and their order is
    immaterial), then, past 1,000 rows, 1,000 evenly spaced ranks of that order."""
    n, d = x.shape
    xs = x.detach()
    gen = torch.Generator().manual_seed(_KEY_SEED)
    w = torch.randn(d, generator=gen, dtype=torch.float64).to(xs.device)
    inv = 1.0 / scale_of(xs)  # an exact power-of-two scaling: the key cannot overflow
    # float64 keys (distinct rows practically never tie), through one reused block of 16,384
    # rows (no float64 copy of x)
    buf = torch.empty(min(n, 1 << 14), d, dtype=torch.float64, device=xs.device)
    parts = []
    for b in xs.split(buf.shape[0]):
        v = buf[: b.shape[0]]
        parts.append(v.copy_(b).mul_(inv) @ w)
    key = torch.cat(parts)
    order = torch.sort(key, stable=True).indices
    if n > _MEDIAN_ROWS:
        pick = torch.linspace(0, n - 1, _MEDIAN_ROWS, dtype=torch.float64).round().long()
        order = order[pick.to(order.device)]
    return xs.index_select(0, order)


def _default_from_tensor(x: torch.Tensor) -> float:
    if x.shape[0] < 2:
        return 1.0
    rows = _canonical_rows(x)
    xs, scale = prepare(rows.double())
    nrm = (xs * xs).sum(1)
    d2 = (nrm[:, None] + nrm[None, :] - 2.0 * xs @ xs.t()).clamp_(min=0.0)
    # equal rows sit next to each other in the canonical order (their keys tie): their distance
    # is exactly 0, not the rounding residue of the Gram expansion
    same = (rows[1:] == rows[:-1]).all(1)
    group = torch.cat([same.new_zeros(1, dtype=torch.long), (~same).long().cumsum(0)])
    d2.masked_fill_(group[:, None] == group[None, :], 0.0)
    m = d2.shape[0]
    iu = torch.triu_indices(m, m, offset=1, device=d2.device)
    pairs = d2[iu[0], iu[1]]  # m (m - 1) / 2 squared distances, in units of scale^2
    med = float(torch.quantile(pairs.sqrt(), 0.5))
    if med <= 0.0:  # most pairs coincide (a collapsed set): the median of the distinct pairs
        pos = pairs[pairs > 0]
        if pos.numel() == 0:
            return 1.0  # all rows equal: every bandwidth gives the same score
        return float(torch.quantile(pos.sqrt(), 0.5)) / _DIVISOR * scale
    s2 = (med / _DIVISOR) ** 2
    if m >= _WARN_ROWS:
        mass = float(torch.exp(-pairs / s2).mean())
        if mass < _STRUCTURE_MIN * math.exp(-_DIVISOR * _DIVISOR):
            warnings.warn(_NO_STRUCTURE, UserWarning, stacklevel=2)
    return math.sqrt(s2) * scale


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


def _shard_matrix(x: Any, name: str) -> torch.Tensor:
    """A 2-D (n, d) finite float tensor; n = 0 is allowed here (an empty shard)."""
    return check_matrix(as_tensor(x, name), name, allow_empty=True)


def _shard(
    x_local: Any, t_local: Any, sigma: Any, sigma_t: Any, with_t: bool
) -> tuple[torch.Tensor, torch.Tensor | None, list[float] | None, bool, float | None]:
    """One rank's inputs of a distributed score, checked before any collective.

    As `_pair`, but a shard may be empty and a bandwidth left None stays None (its default is
    taken later, on the gathered global set). Returns (x, t or None, sigmas or None, many,
    sigma_t or None).
    """
    xt = _shard_matrix(x_local, "x_local")
    tt = None
    if with_t:
        if t_local is None:
            raise ValueError("t_local is None: give this rank's prompt embeddings, shape (n, m)")
        tt = _shard_matrix(t_local, "t_local")
        check_same_device(x_local=xt, t_local=tt)
        check_same_rows(xt, tt, "x_local", "t_local")
    sigmas, many = check_sigmas(sigma, "sigma") if sigma is not None else (None, False)
    st = None
    if with_t and sigma_t is not None:
        st = check_single_sigma(sigma_t)
    return xt, tt, sigmas, many, st

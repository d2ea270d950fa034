"""The streaming RKE metric (`RKEMetric`): the running pair sums, updated batch by batch.

The scores depend on the data only through three pair sums over all ordered pairs (SPEC 2)::

    F_x[k] = sum_ij Kx_k^2,   F_t = sum_ij Kt^2,   F_xt[k] = sum_ij Kx_k^2 Kt^2

When a batch B joins the stored set A, each sum grows by the B x B block plus twice the A x B
block (the kernel is symmetric)::

    F(A u B) = F(A) + F(B) + 2 sum_{i in A, j in B} k(a_i, b_j)^2

so ``update`` costs O(|B| |A| d) + O(|B|^2 d): only the new terms, never the old ones again. The
running sums are float64; the B x B block uses the one-process kernel
(`rkekernels.ops.scores_torch.forward_sums`), the A x B block is streamed tile by tile
(`cross_pair_sums`). Centring: the kernel is translation invariant, so both blocks of a tile are
shifted by the same point, the mean of the new batch, before ``||a||^2 + ||b||^2 - 2 a.b``.
Stored features stay raw (on the metric's device, in the dtype of the first batch).

Under ``torch.distributed`` (an initialised process group), ``compute`` is collective: every rank
all-gathers the other ranks' stored features, the cross-rank blocks are split over the ranks
tile by tile, and one all-reduce adds everything. The result is the score of the union of all
ranks' updates, the same on every rank; the local state is unchanged (updates may go on).

`_Stream` (the checks, the block sums, the sync, the result) is shared with
`rkekernels.metrics.TorchMetricsRKE`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from .. import _collectives as C
from .._input import (
    as_tensor,
    check_matrix,
    check_same_device,
    check_same_rows,
    check_sigmas,
    check_single_sigma,
)
from ..ops import scores_torch
from ..ops.pair_sums import inv_sq
from ..scores import RKEEntropies, entropies_from_sums, scores_from_sums

__all__ = ["RKEMetric", "RKEMetricResult", "cross_pair_sums"]

_COALESCE = 16  # stored batches are concatenated into one block past this many


class RKEMetricResult(NamedTuple):
    """What `RKEMetric.compute` returns.

    Attributes:
        rke: RKE(X) = n^2 / sum_ij Kx^2 (0-dim tensor, 1-D over several sigmas).
        cond_rke: CondRKE(X|T) = sum Kt^2 / sum Kx^2 Kt^2, or None when no t was given.
        entropies: RKEEntropies(h_x, h_t, h_xt, h_x_given_t, mutual_info) in nats, or None
            when no t was given.
    """

    rke: torch.Tensor
    cond_rke: torch.Tensor | None
    entropies: RKEEntropies | None


# --------------------------------------------------------------------------- the block sums


def cross_pair_sums(
    a: torch.Tensor,
    b: torch.Tensor,
    inv_sx2: Sequence[float],
    ta: torch.Tensor | None = None,
    tb: torch.Tensor | None = None,
    inv_st2: float | None = None,
    *,
    out: torch.Tensor | None = None,
    weight: float = 1.0,
    shift: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
    shard: tuple[int, int] | None = None,
    start: int = 0,
) -> tuple[torch.Tensor, int]:
    """Sums over one block of pairs, i in A and j in B (one order only), in float64.

    out[k] += w sum_ij exp(-c_k ||a_i - b_j||^2),   out[K] += w sum_ij exp(-c_t ||ta_i - tb_j||^2),
    out[K + 1 + k] += w sum_ij exp(-c_k ||a_i - b_j||^2) exp(-c_t ||ta_i - tb_j||^2),

    with c_k = ``inv_sx2[k]`` = 1/sigma_k^2 and w = ``weight``; the last K + 1 entries stay zero
    without ``ta``. Streamed over tiles of BLOCK_ROWS rows of A x BLOCK_COLS rows of B, each tile
    `rkekernels.ops.scores_torch.block_sums` (the scores' tile body: one GEMM, sums in the input
    dtype added in float64), so memory is O(tile), never |A| x |B|.

    Args:
        a: (n_a, d) rows of A, already centred (or shifted like B).
        b: (n_b, d) rows of B; each tile of B is shifted by ``shift[0]`` first (may live on
            another device: tiles are moved to a's device).
        inv_sx2: the K values 1/sigma_k^2.
        ta, tb: (n_a, m), (n_b, m) prompt embeddings or None; tb tiles shifted by ``shift[1]``.
        inv_st2: 1/sigma_t^2 (with ``ta``).
        out: (2K + 1,) float64 accumulator (created when None).
        weight: multiplies every tile sum (2 for the off-diagonal blocks of a symmetric sum).
        shard: (rank, world): keep the tiles whose running index (from ``start``) is rank mod world.
        start: the running tile index of the first tile (to shard several blocks as one list).

    Returns:
        (out, next tile index).

    Example:
        >>> import math, torch
        >>> a, b = torch.zeros(2, 1, dtype=torch.float64), torch.ones(3, 1, dtype=torch.float64)
        >>> out, _ = cross_pair_sums(a, b, [1.0])
        >>> round(float(out[0]), 6) == round(6 * math.exp(-1.0), 6)
        True
    """
    K = len(inv_sx2)
    dev = a.device
    if out is None:
        out = torch.zeros(2 * K + 1, dtype=torch.float64, device=dev)
    br, bc = scores_torch.BLOCK_ROWS, scores_torch.BLOCK_COLS
    na, nb = a.shape[0], b.shape[0]
    has_t = ta is not None
    sx, st = shift
    idx = start
    norm_a = scores_torch.sq_norms(a)
    norm_ta = scores_torch.sq_norms(ta) if has_t else None
    for j0 in range(0, nb, bc):
        j1 = min(j0 + bc, nb)
        mine = [
            (i0, min(i0 + br, na))
            for k, i0 in enumerate(range(0, na, br))
            if shard is None or (idx + k) % shard[1] == shard[0]
        ]
        idx += len(range(0, na, br))
        if not mine:
            continue
        bj = b[j0:j1].to(dev)
        bj = bj - sx if sx is not None else bj
        norm_b = scores_torch.sq_norms(bj)
        if has_t:
            tbj = tb[j0:j1].to(dev)
            tbj = tbj - st if st is not None else tbj
            norm_tb = scores_torch.sq_norms(tbj)
        for i0, i1 in mine:
            scores_torch.block_sums(
                out, weight, a[i0:i1], norm_a[i0:i1], bj, norm_b, False, inv_sx2,
                ta[i0:i1] if has_t else None, norm_ta[i0:i1] if has_t else None,
                tbj if has_t else None, norm_tb if has_t else None, inv_st2,
            )  # fmt: skip
    return out, idx


class _Stream:
    """The shared engine of `RKEMetric` and `TorchMetricsRKE`: validation, deltas, sync, scores."""

    def __init__(self, sigma: Any, sigma_t: Any):
        if sigma is None:
            raise ValueError(
                "sigma is None: a streaming metric needs a fixed bandwidth; pick one, e.g. "
                "rkekernels.default_bandwidth(first_batch)"
            )
        self.sigmas, self.many = check_sigmas(sigma, "sigma")
        self.sigma_t = check_single_sigma(sigma_t) if sigma_t is not None else None
        # 1/sigma^2 clamped to float32's range (safe for float32 and float64 batches): no
        # ZeroDivisionError, and no inf * 0 = NaN on the diagonal at a tiny bandwidth
        self.inv_sx2 = inv_sq(self.sigmas, 1.0, torch.float32)
        self.inv_st2 = inv_sq([self.sigma_t], 1.0, torch.float32)[0] if self.sigma_t else None
        self.K = len(self.sigmas)

    def zeros(self, device: Any = None) -> torch.Tensor:
        return torch.zeros(2 * self.K + 1, dtype=torch.float64, device=device)

    def check_batch(self, x, t, *, width, t_width, has_t, device, dtype):
        """Validate one batch against what was stored; return it on the device, in the dtype."""
        xt = check_matrix(as_tensor(x, "x"), "x", allow_empty=True)
        if width is not None and xt.shape[1] != width:
            raise ValueError(
                f"x has {xt.shape[1]} features but earlier updates had {width}: every batch "
                "must have the same width d"
            )
        tt = None
        if t is not None:
            if self.sigma_t is None:
                raise ValueError(
                    "t was given but the metric has no sigma_t: create it as "
                    "RKEMetric(sigma, sigma_t=...) to score prompt embeddings"
                )
            tt = check_matrix(as_tensor(t, "t"), "t", allow_empty=True, width="m")
            if t_width is not None and tt.shape[1] != t_width:
                raise ValueError(
                    f"t has {tt.shape[1]} features but earlier updates had {t_width}: every "
                    "batch of prompt embeddings must have the same width m"
                )
            check_same_device(x=xt, t=tt)
            check_same_rows(xt, tt)
        if has_t is not None and has_t != (tt is not None):
            raise ValueError(
                "t was given in some updates and not in others: pass prompt embeddings t in "
                "every update or in none (call reset() to start over)"
                if has_t
                else "t was not given in earlier updates: pass prompt embeddings t in every "
                "update or in none (call reset() to start over)"
            )
        dtype = dtype or xt.dtype
        device = device if device is not None else xt.device
        xt = xt.detach().to(device=device, dtype=dtype)
        if tt is not None:
            tt = tt.detach().to(device=device, dtype=dtype)
        return xt, tt

    def delta(self, blocks_x, blocks_t, x, t) -> torch.Tensor:
        """The growth of the sums when batch (x, t) joins the stored blocks: F(B) + 2 F(A, B)."""
        cx = x.mean(0, keepdim=True)
        xc = x - cx
        ct = t.mean(0, keepdim=True) if t is not None else None
        tc = t - ct if t is not None else None
        with torch.no_grad():
            fx, ft, fxt = scores_torch.forward_sums(xc, tc, self.inv_sx2, self.inv_st2, True)
            out = self.zeros(x.device)
            out[: self.K] = fx
            if t is not None:
                out[self.K] = ft
                out[self.K + 1 :] = fxt
            for i, b in enumerate(blocks_x):
                tb = blocks_t[i] if t is not None else None
                cross_pair_sums(
                    xc, b, self.inv_sx2, tc, tb, self.inv_st2, out=out, weight=2.0, shift=(cx, ct)
                )
        return out

    def global_sums(self, blocks_x, blocks_t, sums, group):
        """Collective: (global sums, global n, dtype) over every rank's stored blocks."""
        C.reset_comm()
        rank, world = C.rank_world(group)
        x = torch.cat(list(blocks_x)) if len(blocks_x) else None
        t = torch.cat(list(blocks_t)) if len(blocks_t) else None
        dev = sums.device
        comm_dev = C.comm_device(group, dev)
        lay = C.agree_layout(
            x, t, err=None, group=group, comm_dev=comm_dev,
            bandwidths=list(self.sigmas), sigma_t=self.sigma_t,
        )  # fmt: skip
        if lay.n == 0:
            raise ValueError("compute() before any update: no samples on any rank")
        counts, n, width, m, with_t, dtype = lay
        live = [r for r in range(world) if counts[r] > 0]
        empty_x = torch.zeros(0, width, dtype=dtype, device=dev)
        x_all = C.gather_rows(
            x if x is not None else empty_x, counts, width, dtype, group, comm_dev, dev
        )
        t_all = None
        if with_t:
            empty_t = torch.zeros(0, m, dtype=dtype, device=dev)
            t_all = C.gather_rows(
                t if t is not None else empty_t, counts, m, dtype, group, comm_dev, dev
            )
        # one global shift for every cross-rank block (translation invariance), in place
        x_all.sub_(x_all.mean(0, keepdim=True, dtype=torch.float64).to(dtype))
        if t_all is not None:
            t_all.sub_(t_all.mean(0, keepdim=True, dtype=torch.float64).to(dtype))
        offs = [sum(counts[:r]) for r in range(world + 1)]
        xs = [x_all[offs[r] : offs[r + 1]] for r in range(world)]
        ts = [t_all[offs[r] : offs[r + 1]] for r in range(world)] if t_all is not None else None
        part = sums.detach().clone() if x is not None else self.zeros(dev)
        idx = 0
        with torch.no_grad():
            for r in live:
                for s in live:
                    if s <= r:
                        continue
                    _, idx = cross_pair_sums(
                        xs[r],
                        xs[s],
                        self.inv_sx2,
                        ts[r] if ts is not None else None,
                        ts[s] if ts is not None else None,
                        self.inv_st2,
                        out=part,
                        weight=2.0,
                        shard=(rank, world),
                        start=idx,
                    )
        total = C.all_reduce_sum(part, group, comm_dev)
        return total, n, dtype, with_t

    def result(self, sums: torch.Tensor, n: int, dtype: torch.dtype, with_t: bool):
        K = self.K
        fx = sums[:K]

        def shape(v):
            return v.to(dtype) if self.many else v.to(dtype).reshape(())

        if not with_t:
            return RKEMetricResult(shape(scores_from_sums(n, fx)[0]), None, None)
        ft, fxt = sums[K], sums[K + 1 :]
        rke, cond = scores_from_sums(n, fx, ft, fxt)
        ent = RKEEntropies(*(shape(v) for v in entropies_from_sums(n, fx, ft, fxt)))
        return RKEMetricResult(shape(rke), shape(cond), ent)


def _sync_wanted(sync: bool, group: Any) -> bool:
    if not sync:
        return False
    return C.is_distributed(group)


# --------------------------------------------------------------------------- the plain metric


class RKEMetric:
    """Streaming RKE, conditional RKE and entropies of every sample seen by ``update``.

    After updates with batches B_1..B_k (X their union, n rows):
    RKE(X) = n^2 / sum_ij Kx^2; with prompt embeddings also CondRKE(X|T) = sum Kt^2 / sum Kx^2 Kt^2
    and the entropies H2(X), H2(T), H2(X,T), H2(X|T), I2(X;T) (nats). Exactly the one-process
    `rkekernels.rke_score` etc. of the concatenated batches (float64 running sums), but each update
    only adds the new pairs: O(|B| n d) time, O(n d) memory (the stored features).

    Args:
        sigma: bandwidth s > 0 for x, or a sequence of bandwidths (results are then 1-D over
            them). Required: a stream has no data-dependent default.
        sigma_t: bandwidth for the prompt embeddings t; required when updates pass ``t``.
        device: where features are stored and computed (default: the first batch's device).
        group: ``torch.distributed`` process group used by ``compute`` (None: the default group).
        sync_on_compute: under an initialised process group, make ``compute`` collective and score
            the union of all ranks' updates (default True). False: score this rank's updates only.

    Raises:
        ValueError / TypeError: bad sigma or sigma_t.

    Example:
        >>> import torch
        >>> from rkekernels.metrics import RKEMetric
        >>> metric = RKEMetric(sigma=1.0)
        >>> metric.update(torch.tensor([[0.0], [100.0]]))
        >>> metric.update(torch.tensor([[200.0], [0.0]]))
        >>> round(float(metric.compute().rke), 4)  # 4 points, 3 distinct modes: 16 / 6
        2.6667
    """

    def __init__(
        self,
        sigma: Any,
        sigma_t: Any = None,
        *,
        device: Any = None,
        group: Any = None,
        sync_on_compute: bool = True,
    ):
        self._core = _Stream(sigma, sigma_t)
        self.device = torch.device(device) if device is not None else None
        self.group = group
        self.sync_on_compute = bool(sync_on_compute)
        self.reset()

    def reset(self) -> None:
        """Forget every sample (the bandwidths and device stay)."""
        self._x: list[torch.Tensor] = []
        self._t: list[torch.Tensor] = []
        self._sums: torch.Tensor | None = None
        self._n = 0
        self._dtype: torch.dtype | None = None
        self._has_t: bool | None = None

    def __len__(self) -> int:
        """The number of samples stored on this rank."""
        return self._n

    def update(self, x: Any, t: Any = None) -> None:
        """Add a batch of samples (and their prompt embeddings).

        Args:
            x: (b, d) samples, any array type; moved to the metric's device and to the dtype of
                the first batch. b = 0 is a no-op.
            t: (b, m) prompt embeddings: in every update or in none.

        Raises:
            ValueError: wrong rank, NaN/Inf, a width different from earlier batches, x and t with
                different b, t in some updates and not in others, t without sigma_t.
            TypeError: complex, string or object data.
        """
        x, t = self._core.check_batch(
            x,
            t,
            width=self._x[0].shape[1] if self._x else None,
            t_width=self._t[0].shape[1] if self._t else None,
            has_t=self._has_t,
            device=self.device,
            dtype=self._dtype,
        )
        if x.shape[0] == 0:
            return
        if self._sums is None:
            self.device = x.device
            self._dtype = x.dtype
            self._has_t = t is not None
            self._sums = self._core.zeros(x.device)
        self._sums += self._core.delta(self._x, self._t, x, t)
        self._x.append(x)
        if t is not None:
            self._t.append(t)
        self._n += x.shape[0]
        if len(self._x) > _COALESCE:
            self._x = [torch.cat(self._x)]
            self._t = [torch.cat(self._t)] if self._t else []

    def compute(self) -> RKEMetricResult:
        """The scores of everything seen so far (all ranks' updates under torch.distributed).

        Returns:
            RKEMetricResult(rke, cond_rke, entropies): tensors in the dtype of the stored features
            (0-dim, or 1-D for several sigmas); cond_rke and entropies are None without t.

        Raises:
            ValueError: no samples (on any rank); under torch.distributed also ranks that disagree
                on the width or on t (collective: call it on every rank).
        """
        if _sync_wanted(self.sync_on_compute, self.group):
            sums = self._sums if self._sums is not None else self._core.zeros(self.device)
            total, n, dtype, with_t = self._core.global_sums(self._x, self._t, sums, self.group)
            return self._core.result(total, n, dtype, with_t)
        if self._n == 0:
            raise ValueError("compute() before any update: the metric holds no samples")
        return self._core.result(self._sums, self._n, self._dtype, bool(self._has_t))

    def to(self, device: Any) -> RKEMetric:
        """Move the stored features and sums to ``device`` (returns self)."""
        self.device = torch.device(device)
        self._x = [b.to(self.device) for b in self._x]
        self._t = [b.to(self.device) for b in self._t]
        if self._sums is not None:
            self._sums = self._sums.to(self.device)
        return self

"""Exact RKE scores over ``torch.distributed``: each rank holds a shard, every rank gets the result.

The pair sums behind every score run over all ordered pairs of the *global* set::

    F_x[k] = sum_ij Kx_k^2,   F_t = sum_ij Kt^2,   F_xt[k] = sum_ij Kx_k^2 Kt^2
    RKE = n^2 / F_x,   CondRKE = F_t / F_xt,   H2(X) = -log(F_x / n^2), ...

They are sums over the tiles of the upper triangle of an n x n matrix, so they split over ranks
without approximation:

1. *Sizes.* One ``all_gather`` of a short float64 vector per rank (n_r, d, m, dtype, sigma, an
   error flag), so shards of unequal size, empty shards ``(0, d)`` and bad input on one rank are
   handled identically on every rank (a rank with bad input raises its own error, the others raise
   a ValueError naming that rank: nobody is left waiting in a collective).
2. *Features.* Each shard is padded to the largest shard, ``all_gather``-ed and trimmed, so every
   rank holds the global (n, d) set X in rank order (and T).
3. *Tiles.* Every rank centres X with the global mean (translation invariance) and reduces the
   tiles ``i % P == rank`` of the upper triangle with the same kernel as one process, in float64:
   on CUDA the fused Triton kernel (`rkekernels.ops.scores_triton.forward_sums` with
   ``shard=(rank, P)``: the programs rank, rank + P, ...), else the torch tile loop
   (`rkekernels.ops.scores_torch.forward_sums`, the same argument). ``backend`` chooses as in
   the one-process scores ("auto": Triton for CUDA tensors when it imports).
4. *Sums.* One ``all_reduce`` (SUM) of the 2K + 1 float64 partial sums.

Per rank: compute O(n^2 d / P), memory O(n d), communication O(n d) (all-gather) + O(K)
(all-reduce).
Every rank returns the same value, equal to the one-process result on the concatenated shards.

Without an initialised process group (``torch.distributed.is_initialized()`` is False) the
functions fall back to the one-process `rkekernels.rke_score` etc. on ``x_local``.
Results of the distributed path are detached (no autograd through the collectives); the fallback
keeps autograd like the one-process API.

`all_gather_commit` and `SharedFeatureBank` share a guidance `FeatureBank` between ranks: what one
rank commits is all-gathered and added, in rank order, to every rank's bank.

The collectives themselves (the size exchange that raises on every rank, the gathers, the
all-reduce) are `rkekernels._collectives`, shared with the shared bank and the metric's sync.
Communication goes through the group's backend: NCCL on GPUs (tensors travel on the current CUDA
device), gloo on CPUs. The sizes of the last collective exchange are kept in
``rkekernels._collectives.last_comm`` (bytes each rank received through ``all_gather`` and the
bytes of its ``all_reduce``), for benchmarks.
"""

from __future__ import annotations

from typing import Any

import torch

from . import _collectives as C
from . import scores
from ._bandwidth import _shard, _shard_matrix, bandwidth_from_tensor
from ._collectives import is_distributed
from ._input import check_backend, check_same_device, is_torch, to_output
from .guidance import FeatureBank
from .ops.pair_sums import backend_module, inv_sq
from .scores import RKEEntropies, entropies_from_sums, scores_from_sums

__all__ = [
    "SharedFeatureBank",
    "all_gather_commit",
    "cond_rke_score",
    "is_distributed",
    "rke_entropies",
    "rke_score",
    "share_bank",
]


def _one_process(score: str, x_local, t_local, sigma, sigma_t, backend):
    """Without a process group: the one-process ``rkekernels.<score>`` of this rank's data
    (a conditional score or the entropies: t_local is required)."""
    if t_local is None:
        raise ValueError("t_local is None: give this rank's prompt embeddings, shape (n, m)")
    return getattr(scores, score)(x_local, t_local, sigma, sigma_t, backend=backend)


# --------------------------------------------------------------------------- the distributed sums


def _global_pair_sums(x_local, t_local, sigma, sigma_t, group, with_t, want_fx, backend):
    """Validate, exchange sizes, all-gather, reduce this rank's tiles, all-reduce.

    Returns (n, fx, ft, fxt, dtype, out_device, many) with float64 sums on ``out_device``.
    """
    C.reset_comm()
    rank, world = C.rank_world(group)
    err: BaseException | None = None
    xt = tt = None
    sigmas, many, st = None, False, None
    try:
        xt, tt, sigmas, many, st = _shard(x_local, t_local, sigma, sigma_t, with_t)
        backend = check_backend(backend, xt.device)
    except Exception as exc:  # raised after the exchange, so no other rank waits for this one
        err = exc
    data_dev = xt.device if xt is not None else torch.device("cpu")
    comm_dev = C.comm_device(group, data_dev)
    lay = C.agree_layout(
        xt, tt, err=err, group=group, comm_dev=comm_dev, names=("x_local", "t_local"),
        bandwidths=[float(many), *(sigmas or [])], sigma_t=st,
    )  # fmt: skip
    counts, n, width, m, dtype = lay.counts, lay.n, lay.width, lay.m, lay.dtype
    if n == 0:
        raise ValueError(
            "x_local is empty on every rank (global n = 0): need at least one sample in total"
        )

    # gathered buffers are this function's own (never the caller's tensors): centred in place
    xc = C.gather_rows(xt, counts, width, dtype, group, comm_dev, data_dev)
    tc = C.gather_rows(tt, counts, m, dtype, group, comm_dev, data_dev) if with_t else None
    if sigmas is None:  # the same default on every rank: it only sees the gathered global set
        sigmas = [bandwidth_from_tensor(xc)]
    if with_t and st is None:
        st = bandwidth_from_tensor(tc)

    xc.sub_(xc.mean(0, keepdim=True))  # the GLOBAL mean: the same centring on every rank
    if tc is not None:
        tc.sub_(tc.mean(0, keepdim=True))
    # 1/sigma^2 clamped to the dtype's range: no ZeroDivisionError or inf * 0 at tiny sigma
    inv_sx2 = inv_sq(sigmas, 1.0, dtype)
    inv_st2 = inv_sq([st], 1.0, dtype)[0] if st is not None else None
    with torch.no_grad():
        fx, ft, fxt = backend_module(backend).forward_sums(
            xc, tc, inv_sx2, inv_st2, want_fx, shard=(rank, world)
        )
    K = len(sigmas)
    zeros = torch.zeros(K, dtype=torch.float64, device=data_dev)
    packed = torch.cat(
        [
            fx if fx is not None else zeros,
            ft.reshape(1) if ft is not None else zeros[:0],
            fxt if fxt is not None else zeros[:0],
        ]
    )
    packed = C.all_reduce_sum(packed, group, comm_dev)
    fx = packed[:K]
    ft = packed[K] if with_t else None
    fxt = packed[K + 1 : 2 * K + 1] if with_t else None
    return n, fx, ft, fxt, dtype, data_dev, many


# --------------------------------------------------------------------------- public scores


def rke_score(x_local: Any, sigma: Any, *, group: Any = None, backend: str = "auto"):
    """RKE score of the union of every rank's shard, computed by all ranks together.

    RKE(X) = n^2 / sum_ij k_s(x_i, x_j)^2 over the global set X (all shards, rank order; the
    order does not matter), k_s(a, b) = exp(-||a - b||^2 / (2 s^2)).

    Collective: every rank of ``group`` must call it (with the same ``sigma``). Each rank
    all-gathers the shards, reduces 1/P of the upper-triangle tiles, and one all-reduce adds the
    float64 sums: O(n^2 d / P) compute, O(n d) memory and communication per rank. Every rank
    returns the same value, equal to `rkekernels.rke_score` of the concatenated shards.
    Without an initialised process group it is `rkekernels.rke_score` (x_local, sigma).

    Args:
        x_local: (n_r, d) this rank's samples (torch tensor, numpy array or ``__dlpack__`` array);
            shards may have different sizes and may be empty, shape (0, d), as long as the global
            n >= 1.
        sigma: bandwidth s > 0, a sequence of them (1-D result), or None for the
            `rkekernels.default_bandwidth` of the concatenated shards.
        group: a ``torch.distributed`` process group (None: the default group).
        backend: "auto" (the fused Triton kernel for CUDA tensors), "triton" or "torch".

    Returns:
        torch input: a 0-dim tensor (1-D for several sigmas) on x_local's device, detached
        (no autograd through the collectives). Other input: a float (numpy array).

    Raises:
        ValueError: global n = 0, wrong rank, NaN/Inf, bad sigma, shards of different widths,
            different sigma on different ranks; raised on every rank (the rank with the bad input
            raises its own message, the others name that rank).
        TypeError: complex, string or object data.

    Example:
        >>> import torch
        >>> from rkekernels import distributed
        >>> x = torch.tensor([[0.0], [100.0], [200.0]])
        >>> float(distributed.rke_score(x, 1.0))  # no process group: the one-process score
        3.0
    """
    if not C.is_distributed(group):
        return scores.rke_score(x_local, sigma, backend=backend)
    n, fx, _, _, dtype, _, many = _global_pair_sums(
        x_local, None, sigma, None, group, False, True, backend
    )
    return to_output(scores_from_sums(n, fx)[0].to(dtype), is_torch(x_local), many)


def cond_rke_score(
    x_local: Any,
    t_local: Any,
    sigma: Any,
    sigma_t: Any,
    *,
    group: Any = None,
    backend: str = "auto",
):
    """Conditional RKE of the global set given its prompts, computed by all ranks together.

    CondRKE(X|T) = sum_ij Kt[i,j]^2 / sum_ij Kx[i,j]^2 Kt[i,j]^2 over the union of the shards.
    Collective, like `rke_score` (same cost, same guarantees, same fallback without a process
    group: `rkekernels.cond_rke_score`).

    Args:
        x_local: (n_r, d) this rank's samples; n_r = 0 allowed (global n >= 1).
        t_local: (n_r, m) their prompt embeddings.
        sigma: bandwidth for x (float, sequence for a 1-D result, or None: the global
            default_bandwidth).
        sigma_t: bandwidth for t (one float, or None for the global default_bandwidth of t).
        group: process group (None: the default group).
        backend: "auto", "triton" or "torch", as in `rke_score`.

    Returns:
        As `rke_score`: detached tensor for torch input, else a float.

    Raises:
        ValueError / TypeError: as `rke_score`, plus x_local and t_local with different n.

    Example:
        >>> import torch
        >>> from rkekernels import distributed
        >>> x = torch.tensor([[0.0], [100.0], [200.0], [300.0]])
        >>> t = torch.tensor([[0.0], [0.0], [50.0], [50.0]])
        >>> round(float(distributed.cond_rke_score(x, t, 1.0, 1.0)), 6)
        2.0
    """
    if not C.is_distributed(group):
        return _one_process("cond_rke_score", x_local, t_local, sigma, sigma_t, backend)
    n, _, ft, fxt, dtype, _, many = _global_pair_sums(
        x_local, t_local, sigma, sigma_t, group, True, False, backend
    )
    return to_output(scores_from_sums(n, None, ft, fxt)[1].to(dtype), is_torch(x_local), many)


def rke_entropies(
    x_local: Any,
    t_local: Any,
    sigma: Any,
    sigma_t: Any,
    *,
    group: Any = None,
    backend: str = "auto",
) -> RKEEntropies:
    """Order-2 entropies (nats) of the global set and its prompts, computed by all ranks together.

    H2(X) = -log(sum Kx^2 / n^2), H2(T), H2(X,T) = -log(sum Kx^2 Kt^2 / n^2),
    H2(X|T) = H2(X,T) - H2(T), I2(X;T) = H2(X) + H2(T) - H2(X,T), over the union of the shards.
    Collective, like `rke_score`; falls back to `rkekernels.rke_entropies` without a group.

    Args:
        x_local, t_local, sigma, sigma_t, group, backend: as in `cond_rke_score`.

    Returns:
        RKEEntropies(h_x, h_t, h_xt, h_x_given_t, mutual_info), detached tensors for torch input
        (1-D over sigma when several are given), floats otherwise.

    Example:
        >>> import torch
        >>> from rkekernels import distributed
        >>> x = torch.tensor([[0.0], [100.0], [200.0], [300.0]])
        >>> t = torch.tensor([[0.0], [0.0], [50.0], [50.0]])
        >>> [round(float(v), 4) for v in distributed.rke_entropies(x, t, 1.0, 1.0)]
        [1.3863, 0.6931, 1.3863, 0.6931, 0.6931]
    """
    if not C.is_distributed(group):
        return _one_process("rke_entropies", x_local, t_local, sigma, sigma_t, backend)
    n, fx, ft, fxt, dtype, _, many = _global_pair_sums(
        x_local, t_local, sigma, sigma_t, group, True, True, backend
    )
    vals = entropies_from_sums(n, fx, ft, fxt)
    return RKEEntropies(*(to_output(v.to(dtype), is_torch(x_local), many) for v in vals))


# --------------------------------------------------------------------------- a bank shared by ranks


def _local_add(bank: Any, f: torch.Tensor, cond: torch.Tensor | None) -> None:
    """``bank.append``: without the collective of a `SharedFeatureBank` (no recursion); a bank
    without ``append`` (anything with ``add(f, cond)``) gets ``add``."""
    append = getattr(bank, "append", None)
    (append if append is not None else bank.add)(f, cond)


def _commit_input(bank: Any, f: Any, cond: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    ft = _shard_matrix(f, "f")
    ct = None
    if cond is not None:
        ct = _shard_matrix(cond, "cond")
        check_same_device(f=ft, cond=ct)
        if ct.shape[0] != ft.shape[0]:
            raise ValueError(
                f"cond must have one row per row of f: f has {ft.shape[0]}, cond {ct.shape[0]}"
            )
    dim = getattr(bank, "dim", None)
    if ft.shape[0] and dim is not None and ft.shape[1] != dim:
        raise ValueError(
            f"f has width {ft.shape[1]} but the bank holds features of width {dim}; map every "
            "latent with the same features() settings"
        )
    if dim is not None and len(bank):
        holds = getattr(bank, "cond_dim", None) is not None
        if holds != (cond is not None):
            raise ValueError(
                "cond missing: the bank holds prompt embeddings; pass cond in every commit"
                if holds
                else "cond given, but the bank was filled without prompt embeddings"
            )
    return ft, ct


def all_gather_commit(bank: Any, f: Any, cond: Any = None, *, group: Any = None) -> int:
    """Add every rank's new samples to every rank's bank (collective): the bank is shared.

    Each rank passes the features it just generated (any number of rows, 0 included); the
    blocks are all-gathered and added to ``bank`` in rank order, so after the call every rank's
    bank holds the same entries and each rank's guidance steers away from the samples of all
    ranks. Communication: the new rows only (O(b d) per commit), never the bank.
    Without an initialised process group it is ``bank.add(f, cond)`` (a no-op for 0 rows).

    Args:
        bank: a `rkekernels.FeatureBank` (or anything with ``add(f, cond)``), the same on every
            rank (filled only through this function).
        f: (b_r, D) this rank's new features (already mapped by `rkekernels.features`); b_r = 0
            is allowed.
        cond: (b_r, m) their prompt embeddings, on every rank or on none.
        group: a ``torch.distributed`` process group (None: the default group).

    Returns:
        int: the number of rows added on every rank (sum of the b_r).

    Raises:
        ValueError: NaN/Inf, wrong rank, a width other than the bank's, cond on some ranks and
            not on others; raised on every rank (no rank is left waiting).
        TypeError: complex, string or object data.

    Example:
        >>> import torch, rkekernels
        >>> from rkekernels.distributed import all_gather_commit
        >>> bank = rkekernels.FeatureBank(10)
        >>> all_gather_commit(bank, torch.eye(3))  # one process: a plain add
        3
        >>> len(bank)
        3
    """
    if not C.is_distributed(group):
        ft, ct = _commit_input(bank, f, cond)
        if ft.shape[0]:
            _local_add(bank, ft, ct)
        return int(ft.shape[0])
    C.reset_comm()
    err: BaseException | None = None
    ft = ct = None
    try:
        ft, ct = _commit_input(bank, f, cond)
    except Exception as exc:  # raised after the exchange, so no other rank waits for this one
        err = exc
    data_dev = ft.device if ft is not None else torch.device("cpu")
    comm_dev = C.comm_device(group, data_dev)
    lay = C.agree_layout(ft, ct, err=err, group=group, comm_dev=comm_dev, names=("f", "cond"))
    if lay.n == 0:
        return 0
    out_dev = getattr(bank, "device", None) or data_dev
    fs = C.gather_rows(ft, lay.counts, lay.width, lay.dtype, group, comm_dev, out_dev)
    cs = None
    if lay.with_t:
        local_c = ct if ct is not None else torch.zeros(0, 0)
        cs = C.gather_rows(local_c, lay.counts, lay.m, lay.dtype, group, comm_dev, out_dev)
    _local_add(bank, fs, cs)
    return lay.n


class SharedFeatureBank(FeatureBank):
    """A `rkekernels.FeatureBank` whose ``add`` is collective: a bank shared by all ranks.

    ``add(f, cond)`` is `all_gather_commit`: every rank passes its new samples (0 rows
    allowed) and every rank's bank receives all of them, in rank order. Everything else
    (``len``, ``features``, ``cond``, ``state_dict``, use in `rkekernels.guidance_grad`) is
    the plain FeatureBank; ``append`` and ``load_state_dict`` are local. To share the bank of a
    `rkekernels.DiversityGuidance`, use `share_bank` (its ``commit`` then syncs).

    Args:
        capacity, device, dtype: as `rkekernels.FeatureBank`.
        group: ``torch.distributed`` process group (None: the default group).

    Example:
        >>> import torch
        >>> from rkekernels.distributed import SharedFeatureBank
        >>> bank = SharedFeatureBank(8)
        >>> bank.add(torch.eye(2))  # one process: a plain add
        >>> len(bank)
        2
    """

    def __init__(
        self,
        capacity: int,
        *,
        device: Any = None,
        dtype: torch.dtype = torch.float32,
        group: Any = None,
    ) -> None:
        super().__init__(capacity, device=device, dtype=dtype)
        self.group = group

    def add(self, f: Any, cond: Any = None) -> None:
        """Collective add: see `all_gather_commit` (``append`` stays local)."""
        all_gather_commit(self, f, cond, group=self.group)


def share_bank(guidance: Any, *, group: Any = None) -> Any:
    """Make a `rkekernels.DiversityGuidance` commit to a bank shared by all ranks.

    Replaces ``guidance.bank`` by a `SharedFeatureBank` with the same capacity, device, dtype
    and contents; ``guidance.commit(latents, cond)`` then all-gathers the committed samples, so
    every rank steers away from everything generated so far on any rank. Call it on every rank.

    Args:
        guidance: a DiversityGuidance (anything with a ``bank`` FeatureBank attribute).
        group: ``torch.distributed`` process group (None: the default group).

    Returns:
        The new SharedFeatureBank (also set as ``guidance.bank``).

    Example:
        >>> import torch, rkekernels
        >>> from rkekernels.distributed import share_bank
        >>> g = rkekernels.DiversityGuidance(sigma=0.5, capacity=4)
        >>> type(share_bank(g)).__name__
        'SharedFeatureBank'
    """
    old = guidance.bank
    shared = SharedFeatureBank(old.capacity, device=old.device, dtype=old.dtype, group=group)
    if len(old):
        shared.load_state_dict(old.state_dict())
    guidance.bank = shared
    return shared

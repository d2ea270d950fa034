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

Communication goes through the group's backend: NCCL on GPUs (tensors travel on the current CUDA
device), gloo on CPUs. The sizes of the last collective exchange are kept in ``_last_comm`` (bytes
each rank received through ``all_gather`` and the bytes of its ``all_reduce``), for benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from ._input import (
    as_tensor,
    check_backend,
    check_finite,
    check_same_device,
    check_sigma,
    check_sigmas,
    is_torch,
    to_output,
)
from .guidance import FeatureBank
from .ops.pair_sums import backend_module, inv_sq
from .scores import RKEEntropies, _median_from_tensor, entropies_from_sums

__all__ = [
    "SharedFeatureBank",
    "all_gather_commit",
    "cond_rke_score",
    "is_distributed",
    "rke_entropies",
    "rke_score",
    "share_bank",
]

# bytes this rank received through all_gather and sent to all_reduce (last call), for benchmarks
_last_comm: dict[str, int] = {"gathered_bytes": 0, "reduced_bytes": 0}

_DTYPES = (torch.float32, torch.float64)


# --------------------------------------------------------------------------- collective helpers


def is_distributed(group: Any = None) -> bool:
    """True when ``torch.distributed`` is available and a process group is initialised.

    The functions of this module take their distributed path exactly when this is True.

    Example:
        >>> from rkekernels import distributed
        >>> distributed.is_distributed()  # a plain Python process
        False
    """
    return dist.is_available() and dist.is_initialized()


def _rank_world(group: Any) -> tuple[int, int]:
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group: this process is not a member of the given process group")
    return rank, dist.get_world_size(group)


def _comm_device(group: Any, data_device: torch.device) -> torch.device:
    """Where tensors travel: the current CUDA device for NCCL, the CPU for gloo."""
    backend = str(dist.get_backend(group)).lower()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return torch.device("cpu")
    return data_device


def _reset_comm() -> None:
    _last_comm["gathered_bytes"] = 0
    _last_comm["reduced_bytes"] = 0


def _exchange(vec: list[float], group: Any, comm_dev: torch.device) -> torch.Tensor:
    """all_gather of one short float64 vector per rank -> (P, L) on the CPU."""
    _, world = _rank_world(group)
    local = torch.tensor(vec, dtype=torch.float64, device=comm_dev)
    out = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(out, local, group=group)
    _last_comm["gathered_bytes"] += world * local.numel() * 8
    return torch.stack(out).cpu()


def _check_same_bandwidths(
    k_column: torch.Tensor,
    values: list[float],
    sigma_t: float | None,
    group: Any,
    comm_dev: torch.device,
) -> None:
    """Collective: every rank must pass the same bandwidths, in the same order.

    ``k_column`` holds each rank's ``len(values)`` from an earlier exchange: equal lengths are
    checked first (every rank reaches the same verdict), then the values themselves are
    all-gathered and compared exactly (a checksum would let [1, 2] and [2, 1] through).
    """
    if not bool((k_column == k_column[0]).all()):
        raise ValueError("sigma must be the same on every rank (different numbers of bandwidths)")
    table = _exchange([*values, sigma_t if sigma_t is not None else -1.0], group, comm_dev)
    if not bool((table == table[0]).all()):
        raise ValueError("sigma and sigma_t must be the same on every rank, in the same order")


_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _gather_rows(
    x: torch.Tensor,
    counts: Sequence[int],
    width: int,
    dtype: torch.dtype,
    group: Any,
    comm_dev: torch.device,
    out_dev: torch.device,
) -> torch.Tensor:
    """All ranks' (n_r, width) blocks stacked in rank order: (sum n_r, width), a fresh buffer.

    Each block is padded to max n_r (no copy when this rank's block already has that size),
    gathered into ONE (P * max n_r, width) buffer, and compacted in place: peak memory is the
    gathered buffer plus at most one padded block. ``x`` may be an empty block of any width.
    Nothing is sent when every block is empty. The result is never ``x`` itself.
    """
    world = len(counts)
    top = max(counts)
    n = sum(counts)
    if top == 0:
        return torch.zeros(0, width, dtype=dtype, device=out_dev)
    x = x.detach()
    if x.shape == (top, width) and x.dtype == dtype and x.device == comm_dev and x.is_contiguous():
        send = x
    else:
        send = torch.zeros(top, width, dtype=dtype, device=comm_dev)
        if x.shape[0]:
            send[: x.shape[0]] = x.to(device=comm_dev, dtype=dtype)
    buf = torch.empty(world * top, width, dtype=dtype, device=comm_dev)
    _gather_single(buf, send, group=group)
    del send
    _last_comm["gathered_bytes"] += buf.numel() * buf.element_size()
    off = 0
    for r, c in enumerate(counts):  # close the padding gaps, moving blocks towards the front
        src = r * top
        if c and src != off:
            block = buf[src : src + c]
            buf[off : off + c] = block.clone() if off + c > src else block
        off += c
    return buf[:n].to(out_dev)


def _all_reduce_sum(v: torch.Tensor, group: Any, comm_dev: torch.device) -> torch.Tensor:
    buf = v.to(comm_dev, torch.float64).contiguous()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    _last_comm["reduced_bytes"] += buf.numel() * 8
    return buf.to(v.device)


def _raise_collective(err: BaseException | None, flags: torch.Tensor, what: str) -> None:
    """Raise on every rank when any rank flagged bad input (after the exchange: no deadlock)."""
    bad = [r for r, f in enumerate(flags.tolist()) if f]
    if not bad:
        return
    if err is not None:
        raise err
    raise ValueError(f"{what} is invalid on rank(s) {bad} (see the error raised there)")


# --------------------------------------------------------------------------- local validation


def _local_matrix(x: Any, name: str) -> torch.Tensor:
    """A 2-D (n, d) finite float tensor; n = 0 is allowed here (an empty shard)."""
    t = as_tensor(x, name)
    if t.dim() != 2:
        hint = (
            f"reshape it with {name}.reshape(len({name}), -1)"
            if t.dim() > 2
            else f"for n points in 1-D use {name}.reshape(-1, 1); an empty shard is (0, d)"
        )
        raise ValueError(f"{name} must be 2-D (n, d); got shape {tuple(t.shape)}: {hint}")
    if t.shape[0] and t.shape[1] == 0:
        raise ValueError(f"{name} has no features (d = 0); got shape {tuple(t.shape)}")
    check_finite(t, name)
    return t


def _local_sigmas(sigma: Any, name: str) -> tuple[list[float] | None, bool]:
    if sigma is None:
        return None, False
    return check_sigmas(sigma, name)


def _prepare_local(x_local, t_local, sigma, sigma_t, with_t):
    xt = _local_matrix(x_local, "x_local")
    tt = None
    if with_t:
        if t_local is None:
            raise ValueError("t_local is None: give this rank's prompt embeddings, shape (n, m)")
        tt = _local_matrix(t_local, "t_local")
        check_same_device(x_local=xt, t_local=tt)
        if tt.shape[0] != xt.shape[0]:
            raise ValueError(
                f"x_local and t_local must have the same number of rows: x_local has "
                f"{xt.shape[0]}, t_local has {tt.shape[0]} (one prompt embedding per sample)"
            )
    sigmas, many = _local_sigmas(sigma, "sigma")
    st = None
    if with_t and sigma_t is not None:
        if isinstance(sigma_t, list | tuple) or (
            isinstance(sigma_t, torch.Tensor) and sigma_t.numel() > 1
        ):
            raise ValueError(
                "sigma_t must be a single bandwidth; several bandwidths go in sigma (for x)"
            )
        st = check_sigma(sigma_t, "sigma_t")
    return xt, tt, sigmas, many, st


# --------------------------------------------------------------------------- the distributed sums


def _global_pair_sums(x_local, t_local, sigma, sigma_t, group, with_t, want_fx, backend):
    """Validate, exchange sizes, all-gather, reduce this rank's tiles, all-reduce.

    Returns (n, fx, ft, fxt, dtype, out_device, many) with float64 sums on ``out_device``.
    """
    _reset_comm()
    rank, world = _rank_world(group)
    err: BaseException | None = None
    xt = tt = None
    sigmas, many, st = None, False, None
    try:
        xt, tt, sigmas, many, st = _prepare_local(x_local, t_local, sigma, sigma_t, with_t)
        backend = check_backend(backend, xt.device)
    except Exception as exc:  # raised after the exchange, so no other rank waits for this one
        err = exc
    data_dev = xt.device if xt is not None else torch.device("cpu")
    comm_dev = _comm_device(group, data_dev)
    n_r = xt.shape[0] if xt is not None else 0
    d_r = xt.shape[1] if xt is not None else 0
    m_r = tt.shape[1] if tt is not None else 0
    f64 = 1.0 if xt is not None and xt.dtype == torch.float64 else 0.0
    if tt is not None and tt.dtype == torch.float64:
        f64 = 1.0
    s_list = sigmas or []
    meta = [
        1.0 if err is not None else 0.0,
        float(n_r),
        float(d_r),
        float(m_r),
        f64,
        float(len(s_list)),
    ]
    table = _exchange(meta, group, comm_dev)
    _raise_collective(err, table[:, 0], "x_local/t_local/sigma")

    counts = [int(v) for v in table[:, 1].tolist()]
    n = sum(counts)
    if n == 0:
        raise ValueError(
            "x_local is empty on every rank (global n = 0): need at least one sample in total"
        )
    live = [r for r in range(world) if counts[r] > 0]
    widths = {int(table[r, 2]) for r in live}
    if len(widths) > 1:
        raise ValueError(
            f"x_local has a different number of features on different ranks: {sorted(widths)}"
        )
    width = widths.pop()
    m = 0
    if with_t:
        ms = {int(table[r, 3]) for r in live}
        if len(ms) > 1:
            raise ValueError(
                f"t_local has a different number of features on different ranks: {sorted(ms)}"
            )
        m = ms.pop()
    _check_same_bandwidths(table[:, 5], [float(many), *s_list], st, group, comm_dev)
    dtype = torch.float64 if any(table[r, 4] > 0 for r in live) else torch.float32

    # gathered buffers are this function's own (never the caller's tensors): centred in place
    xc = _gather_rows(xt, counts, width, dtype, group, comm_dev, data_dev)
    tc = _gather_rows(tt, counts, m, dtype, group, comm_dev, data_dev) if with_t else None
    if sigmas is None:  # the same median on every rank: it only sees the gathered global set
        sigmas = [_median_from_tensor(xc)]
    if with_t and st is None:
        st = _median_from_tensor(tc)

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
    packed = _all_reduce_sum(packed, group, comm_dev)
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
        sigma: bandwidth s > 0, a sequence of them (1-D result), or None for the median bandwidth
            of the global set (`rkekernels.median_bandwidth` of the concatenated shards).
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
    if not is_distributed(group):
        from . import scores

        return scores.rke_score(x_local, sigma, backend=backend)
    n, fx, _, _, dtype, _, many = _global_pair_sums(
        x_local, None, sigma, None, group, False, True, backend
    )
    return to_output((n * n / fx).to(dtype), is_torch(x_local), many)


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
        sigma: bandwidth for x (float, sequence for a 1-D result, or None for the global median).
        sigma_t: bandwidth for t (one float, or None for the global median of t).
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
    if not is_distributed(group):
        from . import scores

        if t_local is None:
            raise ValueError("t_local is None: give this rank's prompt embeddings, shape (n, m)")
        return scores.cond_rke_score(x_local, t_local, sigma, sigma_t, backend=backend)
    _, _, ft, fxt, dtype, _, many = _global_pair_sums(
        x_local, t_local, sigma, sigma_t, group, True, False, backend
    )
    return to_output((ft / fxt).to(dtype), is_torch(x_local), many)


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
    if not is_distributed(group):
        from . import scores

        if t_local is None:
            raise ValueError("t_local is None: give this rank's prompt embeddings, shape (n, m)")
        return scores.rke_entropies(x_local, t_local, sigma, sigma_t, backend=backend)
    n, fx, ft, fxt, dtype, _, many = _global_pair_sums(
        x_local, t_local, sigma, sigma_t, group, True, True, backend
    )
    vals = entropies_from_sums(n, fx, ft, fxt)
    return RKEEntropies(*(to_output(v.to(dtype), is_torch(x_local), many) for v in vals))


# --------------------------------------------------------------------------- a bank shared by ranks


def _local_add(bank: Any, f: torch.Tensor, cond: torch.Tensor | None) -> None:
    """``bank.add`` without the collective of a `SharedFeatureBank` (no recursion)."""
    if isinstance(bank, FeatureBank):
        FeatureBank.add(bank, f, cond)
    else:
        bank.add(f, cond)


def _commit_input(bank: Any, f: Any, cond: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    ft = _local_matrix(f, "f")
    ct = None
    if cond is not None:
        ct = _local_matrix(cond, "cond")
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
    if not is_distributed(group):
        ft, ct = _commit_input(bank, f, cond)
        if ft.shape[0]:
            _local_add(bank, ft, ct)
        return int(ft.shape[0])
    _reset_comm()
    _, world = _rank_world(group)
    err: BaseException | None = None
    ft = ct = None
    try:
        ft, ct = _commit_input(bank, f, cond)
    except Exception as exc:  # raised after the exchange, so no other rank waits for this one
        err = exc
    data_dev = ft.device if ft is not None else torch.device("cpu")
    comm_dev = _comm_device(group, data_dev)
    meta = [
        1.0 if err is not None else 0.0,
        float(ft.shape[0]) if ft is not None else 0.0,
        float(ft.shape[1]) if ft is not None else 0.0,
        1.0 if ct is not None else 0.0,
        float(ct.shape[1]) if ct is not None else 0.0,
        1.0 if ft is not None and ft.dtype == torch.float64 else 0.0,
    ]
    table = _exchange(meta, group, comm_dev)
    _raise_collective(err, table[:, 0], "f/cond")
    counts = [int(v) for v in table[:, 1].tolist()]
    total = sum(counts)
    if total == 0:
        return 0
    live = [r for r in range(world) if counts[r] > 0]
    widths = {int(table[r, 2]) for r in live}
    if len(widths) > 1:
        raise ValueError(f"f has a different width on different ranks: {sorted(widths)}")
    if len({int(table[r, 3]) for r in live}) > 1:
        raise ValueError("cond was given on some ranks and not on others: pass it on every rank")
    with_cond = bool(table[live[0], 3])
    ms = {int(table[r, 4]) for r in live}
    if with_cond and len(ms) > 1:
        raise ValueError(f"cond has a different width on different ranks: {sorted(ms)}")
    dtype = torch.float64 if any(table[r, 5] > 0 for r in live) else torch.float32
    out_dev = getattr(bank, "device", None) or data_dev
    fs = _gather_rows(ft, counts, widths.pop(), dtype, group, comm_dev, out_dev)
    cs = None
    if with_cond:
        local_c = ct if ct is not None else torch.zeros(0, 0)
        cs = _gather_rows(local_c, counts, ms.pop(), dtype, group, comm_dev, out_dev)
    _local_add(bank, fs, cs)
    return total


class SharedFeatureBank(FeatureBank):
    """A `rkekernels.FeatureBank` whose ``add`` is collective: a bank shared by all ranks.

    ``add(f, cond)`` is `all_gather_commit`: every rank passes its new samples (0 rows
    allowed) and every rank's bank receives all of them, in rank order. Everything else
    (``len``, ``features``, ``cond``, ``state_dict``, use in `rkekernels.guidance_grad`) is
    the plain FeatureBank; ``load_state_dict`` is local. To share the bank of a
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
        self._local = False

    def add(self, f: Any, cond: Any = None) -> None:
        """Collective add: see `all_gather_commit`."""
        if self._local:
            FeatureBank.add(self, f, cond)
            return
        all_gather_commit(self, f, cond, group=self.group)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Local (not collective): replace the contents by ``state``."""
        self._local = True
        try:
            super().load_state_dict(state)
        finally:
            self._local = False


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

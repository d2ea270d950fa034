"""The collectives behind every multi-process feature: distributed scores, the shared bank and
the metric's sync.

Each caller validates its local input, then calls `agree_layout` *before* raising anything, so
that a rank with bad input never leaves the others waiting in a collective: one ``all_gather`` of
a short float64 vector per rank (an error flag, the rows, the widths, whether there are prompt
embeddings, the dtype, the number of bandwidths) gives every rank the same table and the same
verdict. The rank at fault raises its own error, every other rank a ValueError naming it. Then
`gather_rows` stacks every rank's rows in rank order (padded to the largest block, one
``all_gather``, compacted in place) and `all_reduce_sum` adds float64 partial sums.

Tensors travel on the group backend's device: the current CUDA device for NCCL, the CPU for
gloo. ``last_comm`` keeps the bytes this rank received through ``all_gather`` and those of its
``all_reduce`` in the last collective call, for benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

__all__ = [
    "Layout",
    "agree_layout",
    "all_reduce_sum",
    "check_same_bandwidths",
    "comm_device",
    "exchange",
    "gather_rows",
    "is_distributed",
    "last_comm",
    "raise_collective",
    "rank_world",
    "reset_comm",
]

# bytes this rank received through all_gather and sent to all_reduce (last call), for benchmarks
last_comm: dict[str, int] = {"gathered_bytes": 0, "reduced_bytes": 0}


def is_distributed(group: Any = None) -> bool:
    """True when ``torch.distributed`` is available and a process group is initialised.

    The functions of this module take their distributed path exactly when this is True.

    Example:
        >>> from rkekernels import distributed
        >>> distributed.is_distributed()  # a plain Python process
        False
    """
    return dist.is_available() and dist.is_initialized()


def rank_world(group: Any) -> tuple[int, int]:
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group: this process is not a member of the given process group")
    return rank, dist.get_world_size(group)


def comm_device(group: Any, data_device: torch.device) -> torch.device:
    """Where tensors travel: the current CUDA device for NCCL, the CPU for gloo."""
    backend = str(dist.get_backend(group)).lower()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return torch.device("cpu")
    return data_device


def reset_comm() -> None:
    for k in list(last_comm):  # and any counter a caller added (evaluate's broadcast_bytes)
        last_comm[k] = 0


def exchange(vec: list[float], group: Any, comm_dev: torch.device) -> torch.Tensor:
    """all_gather of one short float64 vector per rank -> (P, L) on the CPU."""
    _, world = rank_world(group)
    local = torch.tensor(vec, dtype=torch.float64, device=comm_dev)
    out = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(out, local, group=group)
    last_comm["gathered_bytes"] += world * local.numel() * 8
    return torch.stack(out).cpu()


def check_same_bandwidths(
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
    table = exchange([*values, sigma_t if sigma_t is not None else -1.0], group, comm_dev)
    if not bool((table == table[0]).all()):
        raise ValueError("sigma and sigma_t must be the same on every rank, in the same order")


_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def gather_rows(
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
    last_comm["gathered_bytes"] += buf.numel() * buf.element_size()
    off = 0
    for r, c in enumerate(counts):  # close the padding gaps, moving blocks towards the front
        src = r * top
        if c and src != off:
            block = buf[src : src + c]
            buf[off : off + c] = block.clone() if off + c > src else block
        off += c
    return buf[:n].to(out_dev)


def all_reduce_sum(v: torch.Tensor, group: Any, comm_dev: torch.device) -> torch.Tensor:
    buf = v.to(comm_dev, torch.float64).contiguous()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    last_comm["reduced_bytes"] += buf.numel() * 8
    return buf.to(v.device)


def raise_collective(err: BaseException | None, flags: torch.Tensor, what: str) -> None:
    """Raise on every rank when any rank flagged bad input (after the exchange: no deadlock)."""
    bad = [r for r, f in enumerate(flags.tolist()) if f]
    if not bad:
        return
    if err is not None:
        raise err
    raise ValueError(f"{what} is invalid on rank(s) {bad} (see the error raised there)")


class Layout(NamedTuple):
    """What every rank agreed on: the rows of each rank and the common widths and dtype."""

    counts: list[int]  # rows on each rank, in rank order
    n: int  # their sum
    width: int  # features of x (0 when n = 0)
    m: int  # features of t (0 without t)
    with_t: bool  # t given (on every rank that holds rows)
    dtype: torch.dtype  # float64 when any rank holds float64 rows, else float32


def agree_layout(
    x: torch.Tensor | None,
    t: torch.Tensor | None,
    *,
    err: BaseException | None,
    group: Any,
    comm_dev: torch.device,
    names: tuple[str, str] = ("x", "t"),
    bandwidths: list[float] | None = None,
    sigma_t: float | None = None,
) -> Layout:
    """Collective: exchange each rank's sizes, raise on every rank at the first mistake.

    Args:
        x, t: this rank's validated (n_r, d) and (n_r, m) blocks (t None without prompts);
            both None when this rank's validation failed.
        err: the exception this rank's validation raised, or None.
        group, comm_dev: the process group and the device its tensors travel on.
        names: the arguments' names for the messages.
        bandwidths, sigma_t: checked to be the same on every rank, in the same order (skipped
            when ``bandwidths`` is None or no rank holds rows).

    Returns:
        The `Layout`; with n = 0 the widths are not checked (the caller says what is empty).

    Raises:
        ValueError: (the rank's own ``err`` on the rank at fault) bad input on some rank, x or t
            of different widths on different ranks, t on some ranks only, other bandwidths.
    """
    f64 = any(v is not None and v.dtype == torch.float64 for v in (x, t))
    meta = [
        1.0 if err is not None else 0.0,
        float(x.shape[0]) if x is not None else 0.0,
        float(x.shape[1]) if x is not None else 0.0,
        1.0 if t is not None else 0.0,
        float(t.shape[1]) if t is not None else 0.0,
        1.0 if f64 else 0.0,
        float(len(bandwidths)) if bandwidths is not None else 0.0,
    ]
    table = exchange(meta, group, comm_dev)
    raise_collective(err, table[:, 0], "/".join(names))
    counts = [int(v) for v in table[:, 1].tolist()]
    n = sum(counts)
    if n == 0:
        return Layout(counts, 0, 0, 0, False, torch.float32)
    live = [r for r, c in enumerate(counts) if c > 0]
    x_name, t_name = names
    widths = sorted({int(table[r, 2]) for r in live})
    if len(widths) > 1:
        raise ValueError(
            f"{x_name} has a different number of features on different ranks: {widths}"
        )
    if len({int(table[r, 3]) for r in live}) > 1:
        raise ValueError(
            f"{t_name} was given on some ranks and not on others: pass it on every rank"
        )
    with_t = bool(table[live[0], 3])
    ms = sorted({int(table[r, 4]) for r in live})
    if with_t and len(ms) > 1:
        raise ValueError(f"{t_name} has a different number of features on different ranks: {ms}")
    if bandwidths is not None:
        check_same_bandwidths(table[:, 6], bandwidths, sigma_t, group, comm_dev)
    dtype = torch.float64 if any(table[r, 5] > 0 for r in live) else torch.float32
    return Layout(counts, n, widths[0], ms[0] if with_t else 0, with_t, dtype)

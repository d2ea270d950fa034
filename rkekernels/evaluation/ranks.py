"""``torchrun --nproc_per_node=P -m rkekernels evaluate``: the evaluation split over ranks.

Under an initialised ``torch.distributed`` process group of P > 1 ranks (`session` starts one
from torchrun's environment), `rkekernels.evaluation.evaluate` runs on every rank and the work is
split as follows; without one (or with P = 1) every function here is the one-process function it
wraps, unchanged::

    encoding     rank r encodes files r, r + P, r + 2P, ... of GEN (and REF, and the prompts):
                 new or slow files spread over the ranks; one all-gather puts the (n, d)
                 features on every rank, back in file order (the exact pair sums below need the
                 other ranks' rows, as `rkekernels.distributed` does)
    exact sums   s_k[i] = sum_j k_k(x_i, x_j)^2 for every bandwidth k (RKE, the plug-in
                 interval, the crowded lists, the sweep): rank r reduces the upper-triangle
                 tiles t with t % P == r, adding row and column sums into a (K, n) float64
                 partial; one all-reduce of K n float64 (`shared_sums`); likewise the prompt
                 sums of the conditional interval and relative RKE's cross sums
    rff paths    Vendi, the modes, KEN (`rkekernels.evaluation.ranks_spectra`): C = sum_i
                 phi(x_i) phi(x_i)^T (D x D) over each rank's block of rows, one all-reduce
                 (the same seed, hence the same random features, on every rank; no features
                 move); the modes' members need only each sample's loadings
                 phi(x_i) v_j / sqrt(lambda_j): an (n, k) all-gather; the KEN null's draws are
                 split over the ranks (draw j on rank j % P)
    exact eigen  (small sets: Vendi, modes, KEN) and the unbiased intervals: on rank 0, the
                 result broadcast (conditional Vendi: every rank, redundantly)
    the choice   `pick_eigen` runs on rank 0 (its measured floor: the time of the sharded
                 pass) and is broadcast, so every rank takes the same path

Every rank returns the same result; the command line prints and writes on rank 0 alone. The
exact outputs equal one process's within 1e-10 (the same float32 tiles, added in float64 in
another order), the rff ones within rounding of the same random features (far inside their
stated error ``methods_error``).

Bad input: an error on any rank (an unreadable image in its share, weights missing where only
that rank needs the encoder) is agreed on before the next collective (`_agree`): the rank at
fault raises its own error, every other rank a `CLIError` with its message, so no rank is left
waiting. Rank 0's own work (an exact eigen path, the report's folder check) is wrapped by
`on_root`, which broadcasts an exception as well as a result.

The embedding cache: every rank opens the folder's cache (the same file) and writes the entries
of its share; concurrent writers are safe only with the chunked cache of
`rkekernels.evaluation.embeddings` (each write is atomic, but before it lands the last writer's
file holds only its own share: a rerun encodes the rest again).

Communication per evaluation (n samples of d float32 features, K bandwidths, D rff features):
the features once (P n_max d 4 bytes gathered per rank), K n 8 bytes all-reduced for the sums,
8 D^2 per rff spectrum, 8 n k for the modes' loadings. `rkekernels._collectives.last_comm` holds
the totals of the last run (reset when the encoding starts).
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .. import _collectives as C
from .._errors import CLIError
from .._input import to_output
from ..metrics import cross_pair_sums
from . import paths
from .embeddings import _embed_prompts, _embed_sets
from .statistics import Interval, _sums, _two_sets, plugin_cond_interval, plugin_interval
from .statistics import cond_rke_interval as _cond_interval_one
from .statistics import relative_rke as _relative_one
from .statistics import rke_interval as _rke_interval_one

__all__ = [
    "active",
    "cond_rke_interval",
    "embed_prompts",
    "embed_sets",
    "on_root",
    "pick_eigen",
    "relative_rke",
    "rke_interval",
    "session",
    "shared_sums",
    "world",
]


# --------------------------------------------------------------------------- the process group


def world() -> tuple[int, int]:
    """(rank, P) of the default process group; (0, 1) without one.

    Example:
        >>> from rkekernels.evaluation import ranks
        >>> ranks.world()  # a plain Python process
        (0, 1)
    """
    if not C.is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def active() -> bool:
    """True when evaluate's work is split: a process group of more than one rank."""
    return world()[1] > 1


@contextmanager
def session(device: str = "cpu") -> Iterator[tuple[int, str]]:
    """Start the process group of a ``torchrun`` launch for one evaluation; yield (rank, device).

    Under torchrun (WORLD_SIZE > 1 in the environment) and without a process group yet:
    ``init_process_group`` from the environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT),
    NCCL when ``device`` is CUDA (after ``torch.cuda.set_device(LOCAL_RANK)``; "cuda" becomes
    "cuda:LOCAL_RANK"), else gloo; the group is destroyed on exit. An existing group is used
    as it is (and left alone); a plain process yields (0, device). On ranks other than 0 the
    Hugging Face progress bars and advice are turned off (`_QUIET`), so that rank 0 alone
    prints.

    Example:
        >>> from rkekernels.evaluation import ranks
        >>> with ranks.session("cpu") as (rank, device):  # not under torchrun: nothing starts
        ...     rank, device
        (0, 'cpu')
    """
    own = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not C.is_distributed():
        cuda = str(device).startswith("cuda")
        if cuda:
            index = torch.device(device).index
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local if index is None else index)
            device = f"cuda:{torch.cuda.current_device()}"
        try:
            dist.init_process_group("nccl" if cuda else "gloo")
        except (ValueError, RuntimeError) as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CLIError(f"torch.distributed: cannot start the process group: {msg}") from None
        own = True
    rank = world()[0]
    saved = {k: os.environ.get(k) for k in _QUIET}
    if rank:  # ranks other than 0 print nothing: no weight-loading bars or hub advice either
        os.environ.update({k: v for k, v in _QUIET.items() if os.environ.get(k) is None})
    try:
        yield rank, device
    finally:
        os.environ.update({k: v for k, v in saved.items() if v is not None})
        for k in [k for k, v in saved.items() if v is None]:
            os.environ.pop(k, None)
        if own:
            dist.destroy_process_group()


#: the environment of the ranks other than 0 under `session` (read when transformers loads)
_QUIET = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}


def _bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous block [lo, hi) of n items (sizes differ by at most 1)."""
    return n * rank // size, n * (rank + 1) // size


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _agree(err: BaseException | None, counts: Sequence[int]) -> list[int]:
    """Collective: raise on every rank when any rank failed, else the sums of ``counts``.

    One ``all_gather_object`` of (first line of the error or None, counts). The rank at fault
    re-raises its own exception; the others raise `CLIError` with the first failing rank's
    message, which is what rank 0 prints.
    """
    box: list[Any] = [None] * world()[1]
    dist.all_gather_object(box, (_first_line(err) if err is not None else None, list(counts)))
    for msg, _ in box:
        if msg is not None:
            if err is not None:
                raise err
            raise CLIError(msg)
    return [sum(c[i] for _, c in box) for i in range(len(counts))]


def on_root(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` on rank 0, its result (or its exception) on every rank.

    The result travels pickled (``broadcast_object_list``): return CPU tensors, numbers, numpy
    arrays. An exception raised on rank 0 is raised on every rank (nobody waits). Without a
    process group: ``fn(*args, **kwargs)``.

    Example:
        >>> from rkekernels.evaluation import ranks
        >>> ranks.on_root(max, 2, 3)
        3
    """
    if not active():
        return fn(*args, **kwargs)
    box: list[Any] = [None, None]
    if world()[0] == 0:
        try:
            box[0] = fn(*args, **kwargs)
        except Exception as exc:  # raised on every rank below
            box[1] = exc
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise box[1]
    return box[0]


def _comm(dev: torch.device) -> torch.device:
    return C.comm_device(None, dev)


def _gather(local: torch.Tensor | None, strided: bool = False) -> torch.Tensor:
    """Every rank's (n_r, w) block (None: no rows) stacked in rank order, on every rank;
    ``strided``: rank r held rows r, r + P, ... (`_part`), put back in their order."""
    dev = local.device if local is not None else torch.device("cpu")
    cdev = _comm(dev)
    lay = C.agree_layout(local, None, err=None, group=None, comm_dev=cdev)
    src = local if local is not None else torch.zeros(0, lay.width)
    rows = C.gather_rows(src, lay.counts, lay.width, lay.dtype, None, cdev, dev)
    if not strided:
        return rows
    out = torch.empty_like(rows)
    for r, lo in enumerate(np.cumsum([0, *lay.counts[:-1]]).tolist()):
        out[r :: len(lay.counts)] = rows[lo : lo + lay.counts[r]]
    return out


def _reduce(v: torch.Tensor) -> torch.Tensor:
    return C.all_reduce_sum(v, None, _comm(v.device))


def _broadcast(v: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``v`` on every rank (same shape and dtype everywhere)."""
    cdev = _comm(v.device)
    buf = v.to(cdev).contiguous()
    dist.broadcast(buf, src=0)
    C.last_comm["broadcast_bytes"] = C.last_comm.get("broadcast_bytes", 0) + buf.numel() * 8
    return buf.to(v.device)


# --------------------------------------------------------------------------- sharded encoding


def _part(s: Any, rank: int, size: int) -> Any:
    """This rank's share of a folder's images, files rank, rank + P, ... (a shallow copy with
    ``images`` and ``names`` sliced, the same ``path``: every rank uses the folder's cache);
    None for an empty share; an embedding file (or no set) as it is."""
    if s is None or s.matrix is not None:
        return s
    if rank >= len(s.images):
        return None
    part = copy.copy(s)
    part.images, part.names = s.images[rank::size], s.names[rank::size]
    return part


def embed_sets(sets, enc, cache_root, key: str, progress: bool, stats: dict):
    """`rkekernels.evaluation.embeddings._embed_sets`, each rank encoding its share of files.

    Rank r encodes images r, r + P, ... of each folder (an embedding file is read whole by
    every rank); errors are agreed on (`_agree`), the cache counts summed into ``stats``, and
    the (n, d) features all-gathered in file order: every rank returns what one process
    returns. Progress bars on rank 0 only (its share).
    """
    if not active():
        return _embed_sets(sets, enc, cache_root, key, progress, stats)
    rank, size = world()
    C.reset_comm()
    C.last_comm["broadcast_bytes"] = 0
    parts = [_part(s, rank, size) for s in sets]
    local: dict = {"cached": 0, "encoded": 0}
    feats: list[Any] = [None] * len(sets)
    err = None
    try:
        feats = _embed_sets(parts, enc, cache_root, key, progress and rank == 0, local)
    except Exception as exc:  # agreed on below, so no rank waits in the gather
        err = exc
    cached, encoded = _agree(err, [local["cached"], local["encoded"]])
    stats["cached"] += cached
    stats["encoded"] += encoded
    if local.get("_cache_off"):
        stats["_cache_off"] = True
    images = [s is not None and s.matrix is None for s in sets]
    return [_gather(f, True) if img else f for img, f in zip(images, feats)]


def embed_prompts(prompts, enc, cache_root, progress: bool, stats: dict):
    """`rkekernels.evaluation.embeddings._embed_prompts`, each rank embedding prompts rank,
    rank + P, ... (an embedding matrix is returned as it is); gathered in order like
    `embed_sets`."""
    if not active() or isinstance(prompts, torch.Tensor):
        return _embed_prompts(prompts, enc, cache_root, progress, stats)
    rank, size = world()
    local: dict = {}
    t, err = None, None
    try:
        if rank < len(prompts):
            t = _embed_prompts(prompts[rank::size], enc, cache_root, progress and rank == 0, local)
    except Exception as exc:  # agreed on below
        err = exc
    (cached,) = _agree(err, [local.get("cached_prompts", 0)])
    stats["cached_prompts"] = cached
    if local.get("_cache_off"):
        stats["_cache_off"] = True
    return _gather(t, True)


# --------------------------------------------------------------------------- exact sums


def shared_sums(x: torch.Tensor, sigmas: list[float]) -> tuple[torch.Tensor, float]:
    """`paths.shared_sums` over the ranks: s[k, i] = sum_j k_{sigma_k}(x_i, x_j)^2, float64 (K, n).

    x: the whole (n, d) set on every rank. Each rank reduces the tiles t % P == rank of the
    upper triangle (row and column sums, the tiles of one process), then one all-reduce of the
    K n partial sums. Returns the sums and this rank's wall time of the pass (the floor of
    `pick_eigen`, decided on rank 0).

    Example:
        >>> import torch
        >>> from rkekernels.evaluation import ranks
        >>> s, _ = ranks.shared_sums(torch.tensor([[0.0], [0.0], [50.0]]), [1.0])
        >>> s.tolist()
        [[2.0, 2.0, 1.0]]
    """
    if not active():
        return paths.shared_sums(x, sigmas)
    t0 = time.perf_counter()
    sx = _reduce(_sums(x, None, list(sigmas), None, shard=world())[4])
    return sx, time.perf_counter() - t0


def relative_rke(x: Any, y: Any, sigma: Any = None):
    """`rkekernels.evaluation.relative_rke` (n m / sum_ij k(x_i, y_j)^2) over the ranks.

    Each rank reduces every P-th tile of the n x m cross block (`cross_pair_sums` with
    ``shard``); one all-reduce of K float64 sums.

    Example:
        >>> import numpy as np
        >>> from rkekernels.evaluation import ranks
        >>> round(ranks.relative_rke(np.zeros((2, 1)), np.array([[0.0], [1.0]]), 1.0), 6)
        1.462117
    """
    if not active():
        return _relative_one(x, y, sigma)
    xt, yt, sigmas, many, torch_out = _two_sets(x, y, sigma)
    centre = torch.cat([xt, yt]).detach().mean(0, keepdim=True)
    inv = [1.0 / (s * s) for s in sigmas]
    out, _ = cross_pair_sums((xt - centre).detach(), (yt - centre).detach(), inv, shard=world())
    val = xt.shape[0] * yt.shape[0] / _reduce(out)[: len(sigmas)]
    return to_output(val.to(xt.dtype), torch_out, many)


def rke_interval(x: Any, sigma: Any = None, *, level: float = 0.95, unbiased: bool = False):
    """`rkekernels.evaluation.rke_interval`: the plug-in one from the split sums (`shared_sums`'s
    tiles, one all-reduce), the unbiased one on rank 0 (`on_root`)."""
    if not active():
        return _rke_interval_one(x, sigma, level=level, unbiased=unbiased)
    if unbiased:
        return on_root(_rke_interval_one, x, sigma, level=level, unbiased=True)
    _, _, many, _, sx, _, _ = _sums(x, None, sigma, None, shard=world())
    return plugin_interval(_reduce(sx), level, many)


def cond_rke_interval(
    x: Any, t: Any, sigma: Any = None, sigma_t: Any = None, *, level: float = 0.95,
    unbiased: bool = False,
) -> Interval:  # fmt: skip
    """`rkekernels.evaluation.cond_rke_interval` with the plug-in sums split over the ranks.

    st_i = sum_j Kt^2 and sxt_k[i] = sum_j Kx_k^2 Kt^2 from every rank's tiles, one all-reduce
    of (K + 1) n float64, then the jackknife (`plugin_cond_interval`); the unbiased estimator
    runs on rank 0 (`on_root`).

    Example:
        >>> import numpy as np
        >>> from rkekernels.evaluation import ranks
        >>> x = np.array([[0.0], [100.0], [200.0], [300.0]])
        >>> t = np.array([[0.0], [0.0], [50.0], [50.0]])
        >>> round(ranks.cond_rke_interval(x, t, 1.0, 1.0).estimate, 6)
        2.0
    """
    if not active():
        return _cond_interval_one(x, t, sigma, sigma_t, level=level, unbiased=unbiased)
    if unbiased or t is None:
        kw = {"level": level, "unbiased": unbiased}
        return on_root(_cond_interval_one, x, t, sigma, sigma_t, **kw)
    _, _, many, _, _, s_t, sxt = _sums(x, t, sigma, sigma_t, shard=world())
    both = _reduce(torch.cat([s_t[None], sxt]))
    return plugin_cond_interval(both[0], both[1:], level, many)


def pick_eigen(*args: Any, **kwargs: Any) -> tuple[str, float]:
    """`paths.pick_eigen` decided on rank 0 (its probe, its floor) and broadcast: every rank
    takes the same path (the rff paths are collective)."""
    return on_root(paths.pick_eigen, *args, **kwargs)

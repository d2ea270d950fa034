"""``torchrun --nproc_per_node=P -m rkekernels evaluate``: the evaluation split over ranks.

Under an initialised ``torch.distributed`` process group of P > 1 ranks (`session` starts one
from torchrun's environment), `rkekernels.evaluation.evaluate` runs on every rank and the work is
split as follows; without one (or with P = 1) every function here is the one-process function it
wraps, unchanged::

    encoding     rank r encodes the contiguous block [r n / P, (r + 1) n / P) of GEN's (and
                 REF's, and the prompts') files; one all-gather puts the (n, d) features on
                 every rank in file order (the exact pair sums below need the other ranks' rows,
                 as `rkekernels.distributed` does)
    exact sums   s_k[i] = sum_j k_k(x_i, x_j)^2 for every bandwidth k (RKE, the plug-in
                 interval, the crowded lists, the sweep): rank r reduces the upper-triangle
                 tiles t with t % P == r, adding row and column sums into a (K, n) float64
                 partial; one all-reduce of K n float64 (`shared_sums`); likewise the prompt
                 sums of the conditional interval and relative RKE's cross sums
    rff paths    Vendi, the modes, KEN: C = sum_i phi(x_i) phi(x_i)^T (D x D) over each rank's
                 block of rows, one all-reduce (the same seed, hence the same random features,
                 on every rank; no features move); the modes' members need only each sample's
                 loadings phi(x_i) v_j / sqrt(lambda_j): an (n, k) all-gather; the KEN null's
                 draws are split over the ranks (draw j on rank j % P)
    exact eigen  (small sets: Vendi, modes, KEN) and the unbiased intervals: on rank 0, the
                 result broadcast (conditional Vendi: every rank, redundantly)
    the choice   `pick_eigen` runs on rank 0 (its measured floor: the time of the sharded
                 pass) and is broadcast, so every rank takes the same path

Every rank returns the same result; the command line prints and writes on rank 0 alone. The
exact outputs equal one process's within 1e-10 (the same float32 tiles, added in float64 in
another order), the rff ones within rounding of the same random features (far inside their
stated error ``methods_error``).

Bad input: an error on any rank (an unreadable image in its block, weights missing where only
that rank needs the encoder) is agreed on before the next collective (`_agree`): the rank at
fault raises its own error, every other rank a `CLIError` with its message, so no rank is left
waiting. Rank 0's own work (an exact eigen path, the report's folder check) is wrapped by
`on_root`, which broadcasts an exception as well as a result.

The embedding cache: every rank opens the folder's cache (the same file) and writes the entries
of its block; concurrent writers are safe only with the chunked cache of
`rkekernels.evaluation.embeddings` (each write is atomic, but before it lands the last writer's
file holds only its own block: a rerun encodes the rest again).

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
from .. import vendi
from .._errors import CLIError
from .._input import to_output
from .._methods import check_order
from ..metrics import cross_pair_sums
from ..ops import spectra
from . import paths
from .embeddings import _embed_prompts, _embed_sets
from .novelty import Novelty, _check_counts, _ken_of, _novelty
from .novelty import ken_novelty as _ken_one
from .statistics import Interval, _sums, _two_sets, plugin_cond_interval, plugin_interval
from .statistics import cond_rke_interval as _cond_interval_one
from .statistics import relative_rke as _relative_one
from .statistics import rke_interval as _rke_interval_one

__all__ = [
    "active",
    "cond_rke_interval",
    "embed_prompts",
    "embed_sets",
    "ken_novelty",
    "on_root",
    "pick_eigen",
    "relative_rke",
    "rke_interval",
    "session",
    "shared_sums",
    "vendi_modes",
    "vendi_score",
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
    as it is (and left alone); a plain process yields (0, device).

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
    try:
        yield world()[0], device
    finally:
        if own:
            dist.destroy_process_group()


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


def _gather(local: torch.Tensor | None) -> torch.Tensor:
    """Every rank's (n_r, w) block (None: no rows) stacked in rank order, on every rank."""
    dev = local.device if local is not None else torch.device("cpu")
    cdev = _comm(dev)
    lay = C.agree_layout(local, None, err=None, group=None, comm_dev=cdev)
    src = local if local is not None else torch.zeros(0, lay.width)
    return C.gather_rows(src, lay.counts, lay.width, lay.dtype, None, cdev, dev)


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
    """This rank's block of a folder's images (a shallow copy with ``images`` and ``names``
    sliced, the same ``path``: every rank uses the folder's cache); None for an empty block;
    an embedding file (or no set) as it is."""
    if s is None or s.matrix is not None:
        return s
    lo, hi = _bounds(len(s.images), rank, size)
    if hi == lo:
        return None
    part = copy.copy(s)
    part.images, part.names = s.images[lo:hi], s.names[lo:hi]
    return part


def embed_sets(sets, enc, cache_root, key: str, progress: bool, stats: dict):
    """`rkekernels.evaluation.embeddings._embed_sets`, each rank encoding its block of files.

    Rank r encodes the images [r n / P, (r + 1) n / P) of each folder (an embedding file is
    read whole by every rank); errors are agreed on (`_agree`), the cache counts summed into
    ``stats``, and the (n, d) features all-gathered in file order: every rank returns what one
    process returns. Progress bars on rank 0 only (its block).
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
    return [f if s is None or s.matrix is not None else _gather(f) for s, f in zip(sets, feats)]


def embed_prompts(prompts, enc, cache_root, progress: bool, stats: dict):
    """`rkekernels.evaluation.embeddings._embed_prompts`, each rank embedding its block of
    prompts (an embedding matrix is returned as it is); gathered in order like `embed_sets`."""
    if not active() or isinstance(prompts, torch.Tensor):
        return _embed_prompts(prompts, enc, cache_root, progress, stats)
    rank, size = world()
    lo, hi = _bounds(len(prompts), rank, size)
    local: dict = {}
    t, err = None, None
    try:
        if hi > lo:
            t = _embed_prompts(prompts[lo:hi], enc, cache_root, progress and rank == 0, local)
    except Exception as exc:  # agreed on below
        err = exc
    (cached,) = _agree(err, [local.get("cached_prompts", 0)])
    stats["cached_prompts"] = cached
    if local.get("_cache_off"):
        stats["_cache_off"] = True
    return _gather(t)


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
    x: Any,
    t: Any,
    sigma: Any = None,
    sigma_t: Any = None,
    *,
    level: float = 0.95,
    unbiased: bool = False,
) -> Interval:
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


# --------------------------------------------------------------------------- rff spectra


def _rff_cov(fmap, lo: int, hi: int, width: int, dtype: torch.dtype, dev) -> torch.Tensor:
    """sum_{lo <= i < hi} phi_i phi_i^T (width x width, float64), streamed in row blocks."""
    if hi <= lo:
        return torch.zeros(width, width, dtype=torch.float64, device=dev)
    return spectra.covariance(lambda i0, i1: fmap(lo + i0, lo + i1), hi - lo, width, dev, dtype)


def _loadings(fmap, lo: int, hi: int, vecs: torch.Tensor, scale: Any = 1.0) -> torch.Tensor:
    """(phi_i . v_j) * scale_j for lo <= i < hi, float64 (hi - lo, k), all ranks' gathered."""
    rows = [
        (fmap(lo + i0, lo + i1).to(torch.float64) @ vecs) * scale
        for i0, i1 in spectra.row_blocks(hi - lo, vecs.shape[0])
    ]
    return _gather(torch.cat(rows) if rows else None)


def _eigh_on_root(mat: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, all) and the top-k eigenvectors of the symmetric ``mat``,
    computed on rank 0 and broadcast (every rank maps its samples with the same vectors)."""
    n = mat.shape[0]
    out = torch.zeros(n, 1 + k, dtype=torch.float64, device=mat.device)
    if world()[0] == 0:
        w, v = torch.linalg.eigh(mat)
        out[:, 0], out[:, 1:] = w.flip(0), v.flip(1)[:, :k]
    out = _broadcast(out)
    return out[:, 0], out[:, 1:]


def vendi_score(x: Any, q: float = 1.0, sigma: Any = None, *, method: str = "auto", **kw: Any):
    """`rkekernels.vendi_score` for evaluate: "rff" with the covariance summed over the ranks.

    For each bandwidth s: u = (x - mean) / s, C = sum_r sum_{i in rank r's rows} phi(u_i)
    phi(u_i)^T (the same ``dim`` random Fourier features from ``seed`` on every rank), one
    all-reduce of K D^2 float64; Vendi_q = exp(H_q(eig(C / tr C))) as one process. Other
    methods run on rank 0 (`on_root`). x: the whole (n, d) tensor on every rank.

    Example:
        >>> import torch
        >>> from rkekernels.evaluation import ranks
        >>> x = torch.tensor([[0.0], [100.0], [200.0]])
        >>> round(float(ranks.vendi_score(x, 1.0, 1.0, method="exact")), 6)
        3.0
    """
    if not active():
        return vendi.vendi_score(x, q, sigma, method=method, **kw)
    if method != "rff":
        res = on_root(lambda: _cpu(vendi.vendi_score(x, q, sigma, method=method, **kw)))
        return res.to(x.device) if isinstance(res, torch.Tensor) else res
    q = check_order(q)
    many = isinstance(sigma, list | tuple)
    dim, seed = kw.get("dim") or vendi.DEFAULT_DIM["rff"], int(kw.get("seed", 0))
    xd = x.detach()
    lo, hi = _bounds(xd.shape[0], *world())
    covs = []
    for s in list(sigma) if many else [sigma]:
        u = (xd - xd.mean(0, keepdim=True)) / s
        fmap = spectra.rff_map(u, dim, seed)
        covs.append(_rff_cov(fmap, lo, hi, 2 * (dim // 2), u.dtype, u.device))
    covs = _reduce(torch.stack(covs))
    vals = torch.stack([_entropy(c, q).exp() for c in covs]).to(xd.dtype)
    return to_output(vals, True, many)


def _entropy(cov: torch.Tensor, q: float) -> torch.Tensor:
    """H_q of the spectrum of C / tr C, as `rkekernels.ops.kernel_entropy.entropy` takes it."""
    if q == 2.0:
        return spectra.order2_entropy_from_cov(cov)
    return spectra.renyi_entropy(spectra.spectrum_of_cov(cov), q)


def vendi_modes(x: Any, k: int = 5, sigma: Any = None, *, method: str = "auto", **kw: Any):
    """`rkekernels.vendi_modes` for evaluate: "rff" from the all-reduced covariance.

    C (D x D) as in `vendi_score`; its top-k eigenpairs (lambda_j, v_j) on rank 0, broadcast;
    each rank maps its rows, u_j[i] = phi(u_i) . v_j / sqrt(lambda_j), and the (n, k) loadings
    are all-gathered: the members of each mode as one process assigns them
    (`rkekernels.vendi._modes_of`). Other methods run on rank 0.

    Example:
        >>> import torch
        >>> from rkekernels.evaluation import ranks
        >>> x = torch.cat([torch.zeros(6, 2), torch.full((3, 2), 50.0)])
        >>> [round(m.weight, 3) for m in ranks.vendi_modes(x, 2, 1.0, method="exact")]
        [0.667, 0.333]
    """
    if not active():
        return vendi.vendi_modes(x, k, sigma, method=method, **kw)
    if method != "rff":
        return on_root(vendi.vendi_modes, x, k, sigma, method=method, **kw)
    dim, seed = kw.get("dim") or vendi.DEFAULT_DIM["rff"], int(kw.get("seed", 0))
    xd = x.detach()
    n = xd.shape[0]
    lo, hi = _bounds(n, *world())
    u = (xd - xd.mean(0, keepdim=True)) / sigma
    fmap = spectra.rff_map(u, dim, seed)
    width = 2 * (dim // 2)
    cov = _reduce(_rff_cov(fmap, lo, hi, width, u.dtype, u.device))
    k = min(int(k), n, width)
    w, v = _eigh_on_root(cov, k)
    w = w[:k]
    scale = 1.0 / w.clamp(min=torch.finfo(torch.float64).tiny).sqrt()
    vecs = _loadings(fmap, lo, hi, v, scale)
    return vendi._modes_of(w / torch.trace(cov), vecs)


def _cpu(v: Any) -> Any:
    return v.detach().cpu() if isinstance(v, torch.Tensor) else v


# --------------------------------------------------------------------------- KEN novelty


def ken_novelty(x: Any, y: Any, sigma: Any = None, *, method: str = "auto", **kw: Any) -> Novelty:
    """`rkekernels.evaluation.ken_novelty` for evaluate: "rff" split over the ranks.

    With phi the ``dim`` random Fourier features of the centred (x, y) / sigma (the same on
    every rank), KEN's matrix is C_x / n - eta C_Y / m', C_x = sum_i phi(x_i) phi(x_i)^T and
    C_Y over the reference rows it is computed against (all m; with the null the seeded subset
    of m' = m - n rows of one process): the covariances are summed over the ranks' blocks (one
    all-reduce), the eigenpairs taken on rank 0 and broadcast, the modes' loadings all-gathered.
    The null's draws j (reference subsets of n rows against the rest, at the same sigma) run on
    rank j % P from the rotated reference features (each rank computes them, none move), their
    KEN values all-reduced; p and the null's moments as one process. Other methods: rank 0.

    Example:
        >>> import numpy as np
        >>> from rkekernels.evaluation import ranks
        >>> ref = np.array([[0.0], [0.0], [100.0], [100.0]])
        >>> round(ranks.ken_novelty(ref, ref, 1.0, method="exact").score, 6)
        0.0
    """
    if not active():
        return _ken_one(x, y, sigma, method=method, **kw)
    if method != "rff":
        return on_root(_ken_one, x, y, sigma, method=method, **kw)
    top, per_mode = kw.get("top", 8), kw.get("per_mode", 16)
    draws, seed, eta = kw.get("null_draws", 0), int(kw.get("seed", 0)), float(kw.get("eta", 1.0))
    dim = kw.get("dim", 4096)
    _check_counts(top, per_mode, draws)
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
        raise ValueError(f"dim must be an integer >= 2 (random features); got {dim!r}")
    xt, yt, sigmas, _, _ = _two_sets(x, y, sigma)
    n, m = xt.shape[0], yt.shape[0]
    if draws and m < 2 * n:
        raise ValueError(f"null_draws={draws} needs a reference of at least {2 * n} rows; got {m}")
    both = torch.cat([xt, yt]).detach().double()
    u = (both - both.mean(0, keepdim=True)) / sigmas[0]
    return _ken_rff(u, n, dim, eta, top, per_mode, draws, seed)


def _ken_rff(u, n, dim, eta, top, per_mode, draws, seed) -> Novelty:
    """KEN (and its null) from the scaled, centred rows u = [x; y] (see `ken_novelty`)."""
    rank, size = world()
    m, dev, width = u.shape[0] - n, u.device, 2 * (dim // 2)
    fmap = spectra.rff_map(u, dim, seed)
    k = m - n if draws else m
    gen = torch.Generator().manual_seed(seed)
    lo, hi = _bounds(n, rank, size)
    ylo, yhi = _bounds(m, rank, size)
    covs = [_rff_cov(fmap, lo, hi, width, torch.float64, dev)]
    covs.append(_rff_cov(fmap, n + ylo, n + yhi, width, torch.float64, dev))  # all of Y
    if draws:  # KEN against the seeded subset of k reference rows, the null's size
        sub = torch.randperm(m, generator=gen)[:k]
        slo, shi = _bounds(k, rank, size)
        fsub = spectra.rff_map(u[n + sub[slo:shi].to(dev)], dim, seed)  # the same draws of W
        covs.append(_rff_cov(fsub, 0, shi - slo, width, torch.float64, dev))
    covs = _reduce(torch.stack(covs))
    top_k = min(top, width)
    vals, w = _eigh_on_root(covs[0] / n - eta * covs[-1] / k, top_k)
    obs = _novelty(vals, _loadings(fmap, lo, hi, w), n, top, per_mode)
    if not draws:
        return obs
    lam, rot = torch.linalg.eigh(covs[1])  # the same matrix on every rank
    fy = fmap(n, n + m).to(torch.float64) @ rot  # now fy^T fy = diag(lam)
    null = torch.zeros(draws, dtype=torch.float64, device=dev)
    for j in range(draws):  # every rank draws every subset: the generator stays in step
        pick = torch.randperm(m, generator=gen)[:n].to(dev)
        if j % size != rank:
            continue
        a = fy[pick]
        mat = (a.T @ a).mul_(1.0 / n + eta / k)
        mat.diagonal().sub_(lam * (eta / k))
        null[j] = _ken_of(torch.linalg.eigvalsh(mat))[0]
    vals_null = _reduce(null).cpu().numpy()
    p = (1 + int((vals_null >= obs.score).sum())) / (1 + draws)
    std = float(np.std(vals_null, ddof=1)) if draws > 1 else 0.0
    return obs._replace(null_mean=float(vals_null.mean()), null_std=std, p_value=p)

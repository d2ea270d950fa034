"""Compare sets at one bandwidth: `rke_scores` (several sets, one shared sigma), `rke_sweep`
(score against sigma) and `plot_sweep`.

Scores at each set's own default bandwidth (`default_bandwidth`, or the median distance) use a
different kernel for every set, so they do not compare across sets: a set twice as spread out
gets a bandwidth twice as wide and the same score. To compare generators, score every set with
the same sigma (taken from a reference set, or given), or compare whole curves RKE(sigma).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from ._input import check_sigma
from .scores import _default_from_tensor, _median_of, _prepare, _subsample_sq_dists, rke_score

__all__ = ["BandwidthSweep", "SharedScores", "plot_sweep", "rke_scores", "rke_sweep"]


class SharedScores(NamedTuple):
    """What `rke_scores` returns.

    Attributes:
        sigma: the one bandwidth every set was scored with.
        scores: {name: RKE} in the order given (names "0", "1", ... for a sequence of sets).
        sigma_from: where sigma came from: "given", "reference" (`default_bandwidth` of the
            ``reference`` set or array) or "first" (`default_bandwidth` of the first set).
    """

    sigma: float
    scores: dict[str, float]
    sigma_from: str = "given"


class BandwidthSweep(NamedTuple):
    """What `rke_sweep` returns: RKE of one set at each bandwidth (numpy arrays, same length)."""

    sigma: np.ndarray
    rke: np.ndarray


def _named(sets: Any) -> dict[str, Any]:
    if isinstance(sets, Mapping):
        named = {str(k): v for k, v in sets.items()}
    elif isinstance(sets, Sequence) and not isinstance(sets, str | bytes):
        named = {str(i): v for i, v in enumerate(sets)}
    else:
        raise TypeError(
            "sets must be a dict {name: (n, d) array} or a list of (n, d) arrays, "
            f"got {type(sets).__name__}"
        )
    if not named:
        raise ValueError("sets is empty: give at least one (n, d) array")
    return named


def rke_scores(
    sets: Any, sigma: Any = None, *, reference: Any = None, backend: str = "auto"
) -> SharedScores:
    """RKE of several sets at ONE shared bandwidth, so that the scores compare.

    Every comparison shares one bandwidth by construction: the result states it (``sigma``) and
    where it came from (``sigma_from``).

    RKE(X_s) = n_s^2 / sum_ij k_sigma(x_i, x_j)^2 for every set s, with the same sigma: the one
    given, else `default_bandwidth` of the reference set (a name or index into ``sets``, or an
    array of its own; default: the first set, e.g. the real data).

    Args:
        sets: {name: (n_s, d) array} or a list of them (same d).
        sigma: the shared bandwidth (one number; for several, `rke_sweep` each set), or None to
            take it from ``reference``.
        reference: which set gives the bandwidth when sigma is None: a key/index of ``sets``
            or an (n, d) array (say, real data). Ignored when sigma is given.
        backend: as in `rke_score`.

    Returns:
        SharedScores(sigma, scores, sigma_from): scores as floats by name; sigma_from says
        where the shared sigma came from ("given", "reference" or "first").

    Raises:
        ValueError / TypeError: as `rke_score`, naming the set; sets (or a reference array)
            of different widths d, naming them; a sequence of sigmas; an unknown reference.

    Example:
        >>> import numpy as np, rkekernels
        >>> rng = np.random.default_rng(0)
        >>> tight, wide = rng.normal(size=(100, 4)), 3.0 * rng.normal(size=(100, 4))
        >>> [round(rkekernels.rke_score(v), 2) for v in (tight, wide)]  # own defaults: alike
        [18.54, 18.84]
        >>> res = rkekernels.rke_scores({"tight": tight, "wide": wide})  # sigma from "tight"
        >>> round(res.sigma, 2), {k: round(v, 2) for k, v in res.scores.items()}, res.sigma_from
        (1.03, {'tight': 18.54, 'wide': 92.59}, 'first')
    """
    named = _named(sets)
    sigma_from = "given" if sigma is not None else "first" if reference is None else "reference"
    if sigma is not None:
        sigma = _one_sigma(sigma)
    prepared = {}
    for name, x in named.items():
        try:
            prepared[name] = _prepare(x, "x")
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"set {name!r}: {exc}") from None
    widths: dict[int, list[str]] = {}
    for name, x in prepared.items():
        widths.setdefault(int(x.shape[1]), []).append(name)
    if len(widths) > 1:
        listed = "; ".join(f"d={d}: {names}" for d, names in widths.items())
        raise ValueError(
            f"sets must all have the same width d (one encoder, one kernel); got {listed}"
        )
    if sigma is None:
        if reference is None:
            ref = next(iter(named.values()))
        elif isinstance(reference, str | int) and not isinstance(reference, bool):
            key = str(reference)
            if key not in named:
                raise ValueError(f"reference {reference!r} is not one of the sets {list(named)}")
            ref = named[key]
        else:
            ref = reference
        ref = _prepare(ref, "reference")
        (d,) = widths
        if ref.shape[1] != d:
            raise ValueError(
                f"reference has width d={ref.shape[1]} but the sets have d={d}: its bandwidth "
                "would belong to another space (embed it with the sets' encoder)"
            )
        sigma = _default_from_tensor(ref)
    scores = {}
    for name, x in prepared.items():
        try:
            scores[name] = float(rke_score(x, sigma, backend=backend))
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"set {name!r}: {exc}") from None
    return SharedScores(float(sigma), scores, sigma_from)


def _one_sigma(sigma: Any) -> float:
    """The one shared bandwidth of `rke_scores`; a sequence of them is refused by name."""
    if np.ndim(sigma) > 0 and not (hasattr(sigma, "numel") and sigma.numel() == 1):
        raise ValueError(
            f"sigma must be one bandwidth shared by every set (rke_scores compares the sets at "
            f"one sigma); got {np.ndim(sigma)}-D {sigma!r}: for RKE against several "
            "bandwidths use rkekernels.rke_sweep(x, sigmas) on each set"
        )
    return check_sigma(sigma, "sigma")


def sweep_grid(x: Any, num: int = 25) -> np.ndarray:
    """The default bandwidths of `rke_sweep`: ``num`` values evenly in log from a quarter of
    the median nearest-neighbour distance to 4x the median pairwise distance of x."""
    xt = _prepare(x, "x")
    if xt.shape[0] < 2:
        return np.geomspace(0.1, 10.0, num)
    d2, scale = _subsample_sq_dists(xt)
    med = _median_of(d2, scale)
    off = d2.clone().fill_diagonal_(float("inf"))
    off = off.where(off > 0, float("inf")).min(1).values
    pos = off[off < float("inf")]
    low = float(pos.sqrt().median()) * scale / 4.0 if pos.numel() else med / 100.0
    return np.geomspace(low, 4.0 * med, num)


def rke_sweep(
    x: Any, sigmas: Any = None, *, num: int = 25, backend: str = "auto"
) -> BandwidthSweep:
    """RKE(x) against the bandwidth, all bandwidths in one pass over the pairs.

    Args:
        x: (n, d) samples.
        sigmas: the bandwidths (a sequence), or None for `sweep_grid` (x, num).
        num: number of bandwidths of the default grid.
        backend: as in `rke_score`.

    Returns:
        BandwidthSweep(sigma, rke): numpy arrays. RKE falls from n (sigma -> 0, distinct
        points) to 1 (sigma -> inf); a plateau at k means k well-separated groups.

    Example:
        >>> import numpy as np, rkekernels
        >>> x = np.repeat(np.array([[0.0], [100.0]]), 20, axis=0)
        >>> sw = rkekernels.rke_sweep(x, [1.0, 10.0, 1000.0])
        >>> [round(float(v), 2) for v in sw.rke]
        [2.0, 2.0, 1.0]
    """
    grid = sweep_grid(x, num) if sigmas is None else np.asarray(sigmas, dtype=np.float64)
    vals = rke_score(x, [float(s) for s in grid], backend=backend)
    vals = vals.detach().cpu().double().numpy() if hasattr(vals, "detach") else np.asarray(vals)
    return BandwidthSweep(grid, vals)


def plot_sweep(curves: Any, path: Any = None, *, ax: Any = None, title: str | None = None):
    """Plot RKE against sigma (log x axis) for one or several sweeps; returns the Axes.

    Args:
        curves: a `BandwidthSweep`, or {name: BandwidthSweep}.
        path: save the figure there (any matplotlib format), or None.
        ax: draw into these Axes; None makes a new figure.
        title: the plot's title.

    Raises:
        ImportError: matplotlib is not installed (``pip install matplotlib`` or
            ``rkekernels[demo]``).
    """
    try:
        import matplotlib

        if ax is None and path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            "plot_sweep needs matplotlib: pip install matplotlib (or rkekernels[demo])"
        ) from None
    if isinstance(curves, BandwidthSweep):
        curves = {"": curves}
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, sw in curves.items():
        ax.plot(sw.sigma, sw.rke, marker=".", label=name or None)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bandwidth sigma")
    ax.set_ylabel("RKE (effective number of modes)")
    if title:
        ax.set_title(title)
    if any(curves):
        ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    if path is not None:
        ax.figure.tight_layout()
        ax.figure.savefig(path, dpi=120)
    return ax

"""The kernels and spectral methods of the order-q scores: their argument checks and the choice.

`rkekernels.vendi` and the dot-kernel path of `rkekernels.rke_score` both check their
arguments here (`check_order`, `check_kernel`, `reject_bandwidth`, `check_options`) and resolve
``method`` with `pick_method` (re-exported as `rkekernels.vendi.pick_method`).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

__all__ = [
    "AUTO_EXACT_MAX_N",
    "DEFAULT_DIM",
    "DEFAULT_TOP_K",
    "KERNELS",
    "MAX_COV_WIDTH",
    "METHODS",
    "check_kernel",
    "check_options",
    "check_order",
    "pick_method",
    "reject_bandwidth",
]

#: the logger of the method choice: the documented name (that of `rkekernels.vendi`)
logger = logging.getLogger("rkekernels.vendi")

KERNELS = ("gaussian", "cosine", "linear")
METHODS = ("auto", "exact", "covariance", "rff", "nystrom", "lanczos")
_FOR_KERNEL = {
    "gaussian": ("exact", "rff", "nystrom", "lanczos"),
    "cosine": ("exact", "covariance"),
    "linear": ("exact", "covariance"),
}

#: method="auto": the Gaussian kernel uses "exact" up to this n, where its modelled time reaches
#: `rkekernels._approx_error.EXACT_BUDGET_S` (15 s on 2 cores; 16 n^2 bytes = 657 MB at the
#: peak); past it the data decide (`rkekernels._approx_error.refine_auto`)
AUTO_EXACT_MAX_N = 6408
#: default random-feature dimension D (rff) and number of landmarks (nystrom)
DEFAULT_DIM = {"rff": 4096, "nystrom": 1024}
#: default number of eigenvalues for method="lanczos"
DEFAULT_TOP_K = 100
#: widest covariance (d, or d * m for a joint dot-product kernel) the covariance path builds
MAX_COV_WIDTH = 16384


def check_order(q: Any) -> float:
    """The order q of a Rényi entropy: a real number > 0 (1 included) or ``math.inf``."""
    if isinstance(q, torch.Tensor) and q.numel() == 1:
        q = q.item()
    if isinstance(q, bool) or not isinstance(q, int | float | np.integer | np.floating):
        raise TypeError(f"q must be a positive number or math.inf, got {type(q).__name__}")
    qf = float(q)
    if math.isnan(qf) or qf <= 0.0:
        raise ValueError(
            f"q must be > 0 or math.inf (q = 1 is the von Neumann entropy, the usual Vendi "
            f"score; q = 0 would only count the nonzero eigenvalues); got q={q!r}"
        )
    return qf


def check_kernel(kernel: Any) -> str:
    if not isinstance(kernel, str) or kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return kernel


def pick_method(method: str, *, kernel: str, n: int, width: int, q: float) -> str:
    """Resolve ``method`` for a kernel and problem size, checking that the pairing is valid.

    "auto": Gaussian -> "exact" when q = 2 (the streamed Frobenius sum, any n) or
    n <= AUTO_EXACT_MAX_N (the exact time budget), else "rff", which the order-q scores refine
    from the data (`rkekernels._approx_error.refine_auto`: an RFF dim whose predicted error is
    within 5%, or "exact"); cosine/linear -> "covariance" when the feature width
    (d, or d * m for the joint kernel) is below n and at most MAX_COV_WIDTH, else "exact".
    The choice is logged (logger ``rkekernels.vendi``, level INFO).

    Args:
        method: one of METHODS.
        kernel: one of KERNELS.
        n: number of samples. width: the feature width (d; d * m for a joint dot kernel).
        q: the order (already checked).

    Returns:
        str: the method that will run.

    Example:
        >>> from rkekernels.vendi import pick_method
        >>> pick_method("auto", kernel="cosine", n=1_000_000, width=768, q=1.0)
        'covariance'
        >>> pick_method("auto", kernel="gaussian", n=100_000, width=768, q=1.0)
        'rff'
    """
    kernel = check_kernel(kernel)
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        if kernel == "gaussian":
            chosen = "exact" if q == 2.0 or n <= AUTO_EXACT_MAX_N else "rff"
        else:
            chosen = "covariance" if width < n and width <= MAX_COV_WIDTH else "exact"
        logger.info(
            "method='auto' chose %r (kernel=%r, n=%d, width=%d, q=%g)", chosen, kernel, n, width, q
        )
        return chosen
    if method not in _FOR_KERNEL[kernel]:
        raise ValueError(
            f"method={method!r} does not apply to kernel={kernel!r}; "
            f"use one of {_FOR_KERNEL[kernel]} (or 'auto')"
        )
    if method == "covariance" and width > MAX_COV_WIDTH:
        raise ValueError(
            f"method='covariance' would build a {width} x {width} covariance (feature width "
            f"{width} > {MAX_COV_WIDTH}); use method='exact'"
        )
    return method


def check_options(method: str, n: int, dim: Any, top_k: Any, seed: Any) -> dict:
    if dim is not None and method not in ("rff", "nystrom"):
        raise ValueError(f"dim applies to method='rff' or 'nystrom' only (method is {method!r})")
    if top_k is not None and method != "lanczos":
        raise ValueError(f"top_k applies to method='lanczos' only (method is {method!r})")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    opts: dict[str, Any] = {"seed": int(seed)}
    if method in ("rff", "nystrom"):
        d = DEFAULT_DIM[method] if dim is None else dim
        if isinstance(d, bool) or not isinstance(d, int | np.integer) or d < 2:
            raise ValueError(f"dim must be an int >= 2, got {dim!r}")
        if method == "rff" and d % 2:
            raise ValueError(f"dim must be even for method='rff' (cos and sin pairs), got {d}")
        opts["dim"] = min(int(d), n) if method == "nystrom" else int(d)
    if method == "lanczos":
        k = min(DEFAULT_TOP_K, n - 2) if top_k is None else top_k
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1 or k > n - 2:
            raise ValueError(
                f"top_k must be an int with 1 <= top_k <= n - 2 = {n - 2} for method='lanczos' "
                f"(got {top_k!r}); use method='exact' for small sets"
            )
        opts["top_k"] = int(k)
    return opts


def reject_bandwidth(kernel: str, **bandwidths: Any) -> None:
    """Raise when a bandwidth (a keyword argument not None) comes with a dot-product kernel."""
    for name, val in bandwidths.items():
        if val is not None:
            raise ValueError(
                f"{name} applies to kernel='gaussian' only; the {kernel} kernel has no "
                f"bandwidth (got {name}={val!r})"
            )

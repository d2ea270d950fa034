"""The settings of `DiversityGuidance` and its automatic bandwidths (the guidance side).

Constants: the objectives, step rules and prompt-fade tau, the default scale and window (the
frontier's knee), and the rules of ``sigma=None`` / ``sigma_cond=None``. Functions:
`auto_sigma` (the feature bandwidth from the bank plus the batch), `auto_sigma_cond` (the prompt
bandwidth) and `known_prompts`; `check_unit` validates start / stop / progress. The scores'
default bandwidth is `rkekernels.default_bandwidth` (the scoring side); guidance needs a local
scale (a k-th nearest-neighbour distance), not a between-group one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ._bandwidth import sample_rows
from ._input import check_sigma
from .guidance import GuidanceResult

__all__ = [
    "AUTO_COND_DIV",
    "AUTO_COND_UNIT",
    "AUTO_KNN",
    "AUTO_MIN_ROWS",
    "AUTO_ROWS",
    "DEFAULT_SCALE",
    "DEFAULT_START",
    "DEFAULT_STOP",
    "OBJECTIVES",
    "PROMPT_FADE_TAU",
    "STEP_RULES",
    "auto_sigma",
    "auto_sigma_cond",
    "check_choice",
    "check_count",
    "check_latents",
    "check_scale",
    "check_sigma_cond",
    "check_unit",
    "known_prompts",
    "objective_fade",
    "prompt_fade",
    "rescaled_step",
]

#: "log": -grad log S (SPEC, the paper's direction). "log1p": -grad log(1 + 2 S), the log of the
#: actual rise 2 S + 1 of CondRKE's denominator: the same direction times 2S / (1 + 2S) in [0, 1].
#: Only the gradient's length differs, so under `DiversityGuidance.apply`'s rescaled step (which
#: divides by ||g||) the two are the same; they differ only where the step is not rescaled
#: (`guided_denoiser`'s raw score-space scale). The factor is small wherever S is small, which
#: is the case for an unrelated prompt but also for a matching prompt whose sample is merely far
#: from the bank: it is not a prompt fade (that is ``step_rule="prompt_fade"``).
OBJECTIVES = ("log", "log1p")

#: "prompt_fade" (default): the step is multiplied by f = min(1, max_j w_j / PROMPT_FADE_TAU),
#: w_j = k_sc(y, c_j)^2 the prompt-side weights of the entries of S; "paper": the published
#: step (f = 1).
STEP_RULES = ("prompt_fade", "paper")

#: tau of the prompt fade: some prompt weight w_j >= 0.05 gives the paper's step exactly; all
#: w_j <= 1e-3 give f <= 0.02 (at most 2% of a matching prompt's step). On unit-normalised text
#: embeddings with sigma_cond = 0.45, w_j = 0.05 is a cosine similarity of 0.70.
PROMPT_FADE_TAU = 0.05


#: ``sigma=None``: the feature bandwidth is the median distance from a row to its AUTO_KNN-th
#: nearest neighbour, over the bank's rows and the batch's own (features as the bank stores
#: them; at most 1,000 bank rows, drawn with a fixed seed).
AUTO_KNN = 3

#: While the bank holds fewer rows than this, the automatic bandwidths are recomputed at every
#: guided step from the bank plus the current batch (O((n + b)^2) on n < 64 rows); from then
#: on they are cached and refreshed when the bank's size has doubled (or shrunk: a cleared or
#: reloaded bank), so O(rows) work now and then.
AUTO_MIN_ROWS = 64

#: The default step size and schedule window: the knee of the frontier benchmark
#: (``python -m benchmarks.bench_frontier``; docs/choosing_guidance.md): the largest scale of
#: the sweep within 5% of unguided k-NN precision on both tuning models (learned digit
#: denoisers, ``guided_denoiser``'s raw step); a window 0.2-0.7 was no better at equal precision.
#: A finer grid (0.1, 0.15, 0.2, 0.25 on all four models, ``--scales``) keeps it: 0.15 is
#: already at 94% / 93% of unguided precision on the two unconditional models.
DEFAULT_SCALE = 0.1
DEFAULT_START = 0.0
DEFAULT_STOP = 1.0

#: ``sigma_cond=None`` with two or more distinct prompts: sigma_cond = (smallest distance
#: between two distinct prompts) / AUTO_COND_DIV, so a distinct prompt has weight
#: w = k^2 <= exp(-AUTO_COND_DIV^2) = exp(-9) ~ 1.2e-4.
AUTO_COND_DIV = 3.0

#: ``sigma_cond=None`` with a single distinct prompt: sigma_cond = AUTO_COND_UNIT x the RMS
#: norm of the prompt embeddings (0.3 on unit-normalised embeddings, where orthogonal prompts
#: get w = exp(-2 / 0.09) ~ 2e-10); all-zero prompts: 1.0 (every prompt equal, weight 1).
AUTO_COND_UNIT = 0.3


#: At most this many bank rows (drawn with a fixed seed) enter an automatic bandwidth.
AUTO_ROWS = 1000


def check_unit(value: Any, name: str) -> float:
    """``value`` as a float in [0, 1] (start, stop, progress); TypeError / ValueError naming
    ``name`` otherwise.

    Example:
        >>> check_unit(0.25, "start")
        0.25
    """
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.detach().cpu().item()
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return v


def check_choice(value: Any, choices: tuple[str, ...], name: str) -> str:
    """``value`` if it is one of ``choices``; a ValueError naming ``name`` otherwise.

    Example:
        >>> check_choice("paper", STEP_RULES, "step_rule")
        'paper'
    """
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_count(value: Any, name: str) -> int:
    """``value`` as an int >= 1 (every, capacity); TypeError / ValueError naming ``name``.

    Example:
        >>> check_count(10, "every")
        10
    """
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int >= 1, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def check_scale(value: Any) -> float:
    """The step size: a finite float >= 0 (0 disables guidance).

    Example:
        >>> check_scale(0.1)
        0.1
    """
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"scale must be a finite float, got {type(value).__name__}")
    if not math.isfinite(float(value)) or float(value) < 0.0:
        raise ValueError(
            f"scale must be finite and >= 0 (a negative step reduces diversity), got {value!r}"
        )
    return float(value)


def check_sigma_cond(value: Any) -> float | None:
    """``sigma_cond``: None (automatic), ``math.inf`` (prompts ignored) or a bandwidth > 0.

    Example:
        >>> import math
        >>> check_sigma_cond(None), check_sigma_cond(math.inf), check_sigma_cond(0.5)
        (None, inf, 0.5)
    """
    if value is None:
        return None
    if isinstance(value, float | int) and not isinstance(value, bool) and value == math.inf:
        return math.inf
    return check_sigma(value, "sigma_cond")


def _stack(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The first part (the bank's rows) subsampled to `AUTO_ROWS`, then the others, float64."""
    rows = [sample_rows(parts[0], AUTO_ROWS), *parts[1:]]
    return torch.cat([r.to(device=rows[0].device, dtype=torch.float64) for r in rows])


def auto_sigma(parts: Sequence[torch.Tensor]) -> float:
    """The feature bandwidth of ``sigma=None``: the median k-th nearest-neighbour distance.

    ::

        sigma = median_i ||x_i - x_(k)(i)||,     k = min(AUTO_KNN, rows - 1) = min(3, rows - 1)

    over the rows of ``parts`` (the bank's features, at most `AUTO_ROWS` of them drawn with a
    fixed seed, then the batch's own). Fewer than 2 rows give 1.0 (S is empty then, nothing to
    push against); all rows equal give their RMS norm (1.0 for zero rows). O(m^2 D).

    Args:
        parts: (n_i, D) tensors: the bank's rows first (may be empty), then the batch's.

    Returns:
        float: sigma > 0.

    Example:
        >>> import torch
        >>> auto_sigma([torch.tensor([[0.0], [1.0], [3.0], [6.0]])])  # 3rd-NN: 6, 5, 3, 6
        5.0
    """
    parts = [p for p in parts if p.shape[0]]
    if not parts:
        return 1.0
    x = _stack(parts)
    if x.shape[0] < 2:
        return 1.0
    d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    d.fill_diagonal_(math.inf)
    k = min(AUTO_KNN, x.shape[0] - 1)
    sig = float(d.kthvalue(k, dim=1).values.median())
    if not sig > 0.0:
        sig = float(x.pow(2).sum(1).mean().sqrt()) or 1.0
    return sig


def auto_sigma_cond(parts: Sequence[torch.Tensor]) -> tuple[float, torch.Tensor]:
    """The prompt bandwidth of ``sigma_cond=None`` and the distinct prompts it was taken from.

    ::

        sigma_cond = min_{p != q distinct} ||p - q|| / AUTO_COND_DIV       (two or more prompts)
                   = AUTO_COND_UNIT * RMS(||p||)                            (one distinct prompt)
                   = 1.0                                                    (zero embeddings)

    so another prompt weighs at most exp(-9) ~ 1.2e-4. Prompts closer than 1e-6 x their RMS
    norm count as one.

    Args:
        parts: (n_i, m) prompt embeddings: the bank's first, then the batch's (at least one row).

    Returns:
        (sigma_cond, the (p, m) float64 distinct prompts).

    Example:
        >>> import torch
        >>> s, p = auto_sigma_cond([torch.eye(2)])
        >>> round(s, 4), p.shape[0]
        (0.4714, 2)
    """
    p = _stack([q for q in parts if q.shape[0]] or [torch.zeros(1, 1)])
    rms = float(p.pow(2).sum(1).mean().sqrt())
    p = torch.unique(p, dim=0)
    dmin = 0.0
    if p.shape[0] > 1:
        d = torch.cdist(p, p, compute_mode="donot_use_mm_for_euclid_dist")
        d.fill_diagonal_(math.inf)
        far = d > 1e-6 * rms
        dmin = float(d[far].min()) if bool(far.any()) else 0.0
    if dmin > 0.0:
        return dmin / AUTO_COND_DIV, p
    return (AUTO_COND_UNIT * rms if rms > 0.0 else 1.0), p


def known_prompts(c: torch.Tensor, prompts: torch.Tensor) -> bool:
    """Whether every row of ``c`` is one of ``prompts`` (within 1e-6 x their RMS norm): a batch
    that brings a new prompt refreshes the automatic sigma_cond.

    Example:
        >>> import torch
        >>> known_prompts(torch.eye(2)[:1], torch.eye(2, dtype=torch.float64))
        True
    """
    c = c.reshape(-1, c.shape[-1]).to(prompts)
    tol = 1e-6 * float(prompts.pow(2).sum(1).mean().sqrt()) + 1e-30
    return bool((torch.cdist(c, prompts).amin(1) <= tol).all())


def prompt_fade(
    cond: torch.Tensor,
    bank_cond: torch.Tensor | None,
    sigma_cond: float,
    include_batch: bool,
    b: int | None = None,
) -> torch.Tensor:
    """The prompt fade of ``step_rule="prompt_fade"``: each sample's step factor f_a.

    ::

        f_a = min(1, max_j w_aj / PROMPT_FADE_TAU),   w_aj = exp(-||y_a - c_j||^2 / sigma_cond^2)

    over the entries j of S: the bank's prompt embeddings and, with ``include_batch``, the
    other samples of the batch. One pass over the (n, m) prompt embeddings only. S without
    entries gives f = 1 (the gradient is zero there anyway).

    Args:
        cond: (b, m) or (m,) prompt embeddings of the batch (validated).
        bank_cond: (n, m) the bank's prompt embeddings, or None (no bank entries).
        sigma_cond: the prompt bandwidth (> 0).
        include_batch: the other samples of the batch count as entries of S.
        b: the batch size (to expand a single embedding); default: cond's rows.

    Returns:
        (b,) tensor in (0, 1] on cond's device (float64 for float64 cond, else float32).

    Example:
        >>> import torch
        >>> prompt_fade(torch.eye(2), torch.eye(2)[:1], 0.5, include_batch=False)
        tensor([1.0000, 0.0067])
    """
    c = cond[None] if cond.dim() == 1 else cond
    rows = c.shape[0] if b is None else b
    cdt = torch.float64 if c.dtype == torch.float64 else torch.float32
    c = (c.expand(rows, -1) if c.shape[0] == 1 else c).to(cdt)
    exact = "donot_use_mm_for_euclid_dist"  # no cancellation for nearly equal prompts
    d2 = torch.full((rows,), math.inf, device=c.device, dtype=cdt)
    if bank_cond is not None:
        bc = bank_cond.to(device=c.device, dtype=cdt)
        d2 = torch.cdist(c, bc, compute_mode=exact).amin(dim=1) ** 2
    if include_batch and rows > 1:
        inner = torch.cdist(c, c, compute_mode=exact) ** 2
        inner.fill_diagonal_(math.inf)
        d2 = torch.minimum(d2, inner.amin(dim=1))
    log_w = -d2 / sigma_cond**2
    fade = torch.exp(log_w - math.log(PROMPT_FADE_TAU)).clamp(max=1.0)
    return torch.where(torch.isinf(d2), torch.ones_like(fade), fade)


def rescaled_step(
    latents: torch.Tensor, grad: torch.Tensor, scale: float, fade: torch.Tensor | None = None
) -> torch.Tensor:
    """The paper's rescaled step ``z_a + f_a * scale * ||z_a|| / ||g_a|| * g_a``.

    g_a = 0 leaves z_a unchanged; ``fade`` holds the f_a (None: f = 1). Norms are taken over
    all entries of each sample, in float32 (float64 for float64 latents); the result has the
    latents' shape and dtype.

    Args:
        latents: (b, ...) latents z. grad: the same shape, the direction g.
        scale: the step relative to ||z_a||. fade: (b,) factors or None.

    Returns:
        The moved latents (latents' shape and dtype).

    Example:
        >>> import torch
        >>> z = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
        >>> rescaled_step(z, torch.tensor([[0.0, 9.0], [0.0, 0.0]]), 0.5)  # ||z_0|| = 5
        tensor([[3.0000, 6.5000],
                [1.0000, 0.0000]])
    """
    b = latents.shape[0]
    cdt = torch.float64 if latents.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        z = latents.detach().reshape(b, -1).to(cdt)
        g = grad.detach().reshape(b, -1).to(device=z.device, dtype=cdt)
        gn = g.norm(dim=1, keepdim=True)
        direction = torch.where(gn > 0, g / gn, torch.zeros_like(g))
        if fade is not None:
            direction = direction * fade.to(device=z.device, dtype=cdt).reshape(b, 1)
        out = z + (scale * z.norm(dim=1, keepdim=True)) * direction
    return out.to(latents.dtype).reshape(latents.shape)


def check_latents(latents: Any) -> torch.Tensor:
    """``latents`` if it is a floating-point torch tensor (b, ...) with b >= 1; TypeError /
    ValueError naming ``latents`` otherwise.

    Example:
        >>> import torch
        >>> check_latents(torch.zeros(2, 3)).shape
        torch.Size([2, 3])
    """
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a torch tensor, got {type(latents).__name__}")
    if latents.dim() < 1 or latents.shape[0] == 0:
        raise ValueError(
            f"latents must be (b, ...) with b >= 1 samples; got shape {tuple(latents.shape)}"
        )
    if not latents.is_floating_point():
        raise TypeError(f"latents must be floating point, got {latents.dtype}")
    return latents


def objective_fade(objective: str, res: GuidanceResult) -> GuidanceResult:
    """The gradient of ``objective``: "log" returns ``res`` as it is; "log1p" gives
    -grad log(1 + 2S) = 2S / (1 + 2S) * (-grad log S), per sample (see `OBJECTIVES`).

    Example:
        >>> import torch
        >>> from rkekernels import GuidanceResult
        >>> r = GuidanceResult(torch.ones(1, 2), torch.tensor([0.0]))   # S = 1: factor 2/3
        >>> objective_fade("log1p", r).grad
        tensor([[0.6667, 0.6667]])
    """
    if objective == "log":
        return res
    log_s = torch.as_tensor(res.log_s)
    grad = torch.as_tensor(res.grad)
    fade = torch.sigmoid(log_s.to(grad.dtype) + math.log(2.0))
    return GuidanceResult(grad * fade.reshape(-1, *([1] * (grad.dim() - 1))), res.log_s)

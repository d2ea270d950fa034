"""`DiversityGuidance`: SPARKE guidance for any sampler, as a schedule plus one update rule.

For a batch of b latents z_a being sampled, the bank of earlier samples f_1..f_n (features) with
prompt embeddings c_j, and the current prompt embeddings y_a (SPEC section 2)::

    S(z_a)  = sum_j w_j k_s(phi(z_a), f_j)^2,       w_j = k_sc(y_a, c_j)^2  (1 when unconditional)
    g_a     = -grad_{z_a} log S(z_a)                (`rkekernels.guidance_grad`)
    z_a    <- z_a + f_a * scale * ||z_a|| / ||g_a|| * g_a   (the rescaled step; g_a = 0: no move)

with f_a = 1 for ``step_rule="paper"`` (the published step) and, by default
(``step_rule="prompt_fade"``), ``f_a = min(1, max_j w_j / 0.05)``: a sample whose prompt is
unrelated to every entry of S barely moves, one with a matching prompt takes the paper's step.

Minimising S maximises the conditional RKE diversity of the bank plus the new sample. A
``feature_fn`` (for example an image encoder applied to the decoded prediction) replaces phi's
input: S is then evaluated on ``feature_fn(z)`` and the gradient is carried back to z by one
vector-Jacobian product (the only autograd in the library).

The schedule: `apply` is called once per sampler step with the sampler's ``progress`` in [0, 1]
(0 = first step, e.g. ``step_index / num_steps``). Call number k (0-based, counted since the last
`commit` or `reset`, or given explicitly as ``step=k``) is guided iff::

    k % every == 0   and   start <= progress <= stop

so ``every=10`` guides calls 0, 10, 20, ... and ``start``/``stop`` keep a window of the
trajectory. After the last step, `commit` puts the finished samples into the bank (and restarts
the count for the next batch).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ._input import BACKENDS, as_tensor, check_backend, check_sigma
from .guidance import FeatureBank, GuidanceResult, features, guidance_grad
from .ops import guidance_kernels

__all__ = [
    "AUTO_KNN",
    "AUTO_MIN_ROWS",
    "DEFAULT_SCALE",
    "DEFAULT_START",
    "DEFAULT_STOP",
    "OBJECTIVES",
    "PROMPT_FADE_TAU",
    "STEP_RULES",
    "DiversityGuidance",
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


def _check_unit(value: Any, name: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.detach().cpu().item()
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return v


class DiversityGuidance:
    """SPARKE diversity guidance: a schedule, the rescaled update, and a bank of past samples.

    Each guided step moves every sample a of the batch along the diversity gradient
    g_a = -grad log S(z_a) (see `rkekernels.guidance_grad`), rescaled to the latent's norm::

        z_a <- z_a + f_a * scale * ||z_a|| / ||g_a|| * g_a        (g_a = 0: z_a unchanged)

    with the prompt fade f_a of `step_fade` (``step_rule="prompt_fade"``, the default; 1 for
    unconditional guidance and for ``step_rule="paper"``).

    Call `apply` once per sampler step, `commit` once per finished batch.

    Schedule: call number k (counted by `apply` since the last `commit`/`reset`, or passed as
    ``step=k``) with sampler progress p in [0, 1] is guided iff ``k % every == 0`` and
    ``start <= p <= stop`` (both ends included). ``progress`` may be omitted only when
    ``start == 0`` and ``stop == 1`` (then only ``every`` selects steps). With ``scale == 0``
    no gradient is computed and latents come back untouched.

    Args:
        sigma: bandwidth s of the kernel on features (> 0), or None (default): automatic, the
            median 3rd-nearest-neighbour distance of the bank's rows and the batch's own,
            read at each guided step and refreshed as the bank grows (`bandwidths`). For
            unit-normalised latents the paper's s_c = 0.6 to 0.8 corresponds to
            ``sigma = sqrt(2) * s_c`` ~ 0.85 to 1.1.
        sigma_cond: bandwidth of the kernel on prompt embeddings. None (default): automatic;
            the guidance becomes prompt-aware (`conditional`) at the first ``cond`` it is
            given (the diffusers adapters capture the pipeline's own prompt embeddings,
            wherever it has some), and from then on every `apply`/`commit` needs one;
            sigma_cond is then the smallest distance between distinct prompts / 3 (another
            prompt weighs <= 1.2e-4), or 0.3 x the prompts' RMS norm while there is one prompt
            (`bandwidths`). A number: prompt-aware from the start (cond required).
            ``math.inf``: prompts ignored (the prompt kernel is 1; a cond is accepted and
            unused).
        scale: step size (finite, >= 0; 0 disables): relative to ||z_a|| in `apply` (the paper
            uses 0.02 to 0.4), the raw score-space weight in `guided_denoiser`. Default
            `DEFAULT_SCALE` = 0.1, the knee of the frontier benchmark (docs: "Choosing a
            guidance").
        every: guide every ``every``-th call (int >= 1).
        start, stop: progress window, 0 <= start <= stop <= 1 (defaults 0 and 1: a window
            gave no better trade-off on the frontier).
        capacity: bank size (int >= 1); the oldest entries go first.
        normalize: features divide each flattened sample by its L2 norm.
        include_batch: the other samples of the batch count as bank entries.
        feature_fn: optional differentiable map latents (b, ...) -> features (b, ...); the bank
            then stores ``features(feature_fn(latents))``.
        device, bank_dtype: where and in which dtype the bank lives (see `FeatureBank`).
        backend: "auto", "torch" or "triton", passed to `guidance_grad`.
        objective: "log" (default, -grad log S) or "log1p" (-grad log(1 + 2 S)): only
            `grad`'s length changes, per sample, so the two are the same under `apply`'s
            rescaled step and differ in `guided_denoiser`'s raw step only (see `OBJECTIVES`).
        step_rule: "prompt_fade" (default) or "paper". With conditional guidance,
            "prompt_fade" multiplies each sample's step by
            ``f_a = min(1, max_j w_aj / PROMPT_FADE_TAU)`` (tau = 0.05), ``w_aj = k_sc(y_a,
            c_j)^2`` over the entries of S (the bank and, with include_batch, the other samples
            of the batch), so a sample whose prompt is unrelated to everything in S barely moves
            (all w <= 1e-3: at most 2% of a matching prompt's step) and any w >= tau gives the
            paper's step exactly. "paper": the published step. Unconditional: the same (w = 1).
        novelty: an optional novelty term (`rkekernels.guidance_novelty.novelty_guidance`): on every
            selected step, after the diversity step, the samples also move away from its
            reference bank, with its own scale.
        algorithm: "rke" (default) or "vendi" (the first-order gain in the order-1 Vendi
            entropy of bank + sample; see `rkekernels.guidance_grad`); ``objective``,
            ``sigma_cond`` and the step rules keep their meaning with either.
        kernel: "gaussian" (default), "cosine" or "linear": the kernel on features.

    Attributes:
        bank: the `FeatureBank` of committed samples (``len(guidance.bank)`` entries).
        calls: number of `apply` calls since the last `commit` or `reset`.
        last: the `GuidanceResult` of the last guided step (``.log_s`` for logging), or None.

    Raises:
        ValueError / TypeError: an argument out of range or of the wrong type (the message
            names it).

    Example:
        >>> import torch
        >>> from rkekernels import DiversityGuidance
        >>> guide = DiversityGuidance(sigma=1.0, scale=0.1, every=2)
        >>> guide.commit(torch.tensor([[1.0, 0.0]]))             # one earlier sample
        >>> z = torch.tensor([[1.0, 0.1]])
        >>> z = guide.apply(z, progress=0.0)                    # call 0: guided
        >>> z                                                   # pushed away from [1, 0]
        tensor([[0.9900, 0.2000]])
        >>> guide.apply(z, progress=0.5) is z                   # call 1: skipped
        True
        >>> guide.commit(z); len(guide.bank)
        2
    """

    def __init__(
        self,
        sigma: float | None = None,
        *,
        sigma_cond: float | None = None,
        scale: float = DEFAULT_SCALE,
        every: int = 1,
        start: float = DEFAULT_START,
        stop: float = DEFAULT_STOP,
        capacity: int = 10_000,
        normalize: bool = True,
        include_batch: bool = True,
        feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        device: torch.device | str | None = None,
        bank_dtype: torch.dtype = torch.float32,
        backend: str = "auto",
        objective: str = "log",
        step_rule: str = "prompt_fade",
        novelty: DiversityGuidance | None = None,
        algorithm: str = "rke",
        kernel: str = "gaussian",
    ) -> None:
        guidance_kernels.check(algorithm, kernel)
        self.algorithm, self.kernel = algorithm, kernel
        if novelty is not None and not isinstance(novelty, DiversityGuidance):
            raise TypeError(
                "novelty must be None or a term from "
                f"rkekernels.guidance_novelty.novelty_guidance, got {type(novelty).__name__}"
            )
        self.novelty = novelty
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        self.objective = objective
        if step_rule not in STEP_RULES:
            raise ValueError(f"step_rule must be one of {STEP_RULES}, got {step_rule!r}")
        self.step_rule = step_rule
        self.sigma = None if sigma is None else check_sigma(sigma, "sigma")
        if sigma_cond is None or (
            isinstance(sigma_cond, float | int)
            and not isinstance(sigma_cond, bool)
            and sigma_cond == math.inf
        ):
            self.sigma_cond = None if sigma_cond is None else math.inf
        else:
            self.sigma_cond = check_sigma(sigma_cond, "sigma_cond")
        self._cond_seen = False  # sigma_cond=None: becomes conditional at the first cond
        self._auto: dict[str, Any] = {}  # cached automatic bandwidths (see `bandwidths`)
        if isinstance(scale, bool) or not isinstance(scale, int | float | np.integer | np.floating):
            raise TypeError(f"scale must be a finite float, got {type(scale).__name__}")
        if not math.isfinite(float(scale)) or float(scale) < 0.0:
            raise ValueError(
                f"scale must be finite and >= 0 (a negative step reduces diversity), got {scale!r}"
            )
        self.scale = float(scale)
        if isinstance(every, bool) or not isinstance(every, int | np.integer):
            raise TypeError(f"every must be an int >= 1, got {type(every).__name__}")
        if every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        self.every = int(every)
        self.start = _check_unit(start, "start")
        self.stop = _check_unit(stop, "stop")
        if self.start > self.stop:
            raise ValueError(f"start must be <= stop, got start={start!r}, stop={stop!r}")
        if isinstance(capacity, bool) or not isinstance(capacity, int | np.integer):
            raise TypeError(f"capacity must be an int >= 1, got {type(capacity).__name__}")
        if capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        for name, flag in (("normalize", normalize), ("include_batch", include_batch)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        self.normalize = normalize
        self.include_batch = include_batch
        if feature_fn is not None and not callable(feature_fn):
            raise TypeError(f"feature_fn must be callable or None, got {type(feature_fn).__name__}")
        self.feature_fn = feature_fn
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "triton":
            check_backend(backend, torch.device("cpu"))  # Triton missing: say what to install
        self.backend = backend
        self.bank = FeatureBank(int(capacity), device=device, dtype=bank_dtype)
        self.calls = 0
        self.last: GuidanceResult | None = None

    # ------------------------------------------------------------------ schedule

    @property
    def conditional(self) -> bool:
        """True when the guidance is prompt-aware now.

        A finite ``sigma_cond``: always. ``sigma_cond=None`` (automatic): from the first `apply`,
        `grad` or `commit` that is given a cond on, or once the bank holds prompt embeddings
        (e.g. loaded by ``bank.load_state_dict``); then every later call needs a cond, and a
        bank already filled without prompts refuses one. ``sigma_cond=math.inf``: never (a given
        cond is accepted and ignored).
        """
        if self.sigma_cond is None:  # a bank loaded with prompts counts as a cond seen
            return self._cond_seen or self.bank.cond_dim is not None
        return math.isfinite(self.sigma_cond)

    @property
    def windowed(self) -> bool:
        """True when ``start``/``stop`` restrict the schedule (then `apply` needs progress)."""
        return self.start > 0.0 or self.stop < 1.0

    def active(self, step: int, progress: float | None = None) -> bool:
        """Whether call number ``step`` at sampler ``progress`` is guided.

        ``step % every == 0`` and, when ``progress`` is given, ``start <= progress <= stop``.

        Example:
            >>> from rkekernels import DiversityGuidance
            >>> g = DiversityGuidance(1.0, every=3, start=0.2, stop=0.8)
            >>> [k for k in range(10) if g.active(k, k / 10)]
            [3, 6]
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if step % self.every != 0:
            return False
        if progress is None:
            if self.windowed:
                raise ValueError(
                    "progress is required when start/stop restrict the schedule "
                    f"(start={self.start}, stop={self.stop}); pass progress in [0, 1]"
                )
            return True
        p = _check_unit(progress, "progress")
        return self.start <= p <= self.stop

    def reset(self) -> None:
        """Restart the call count (`commit` does this too); the bank is kept."""
        self.calls = 0

    # ------------------------------------------------------------------ guidance

    def _cond(self, cond: Any, b: int, device: torch.device) -> torch.Tensor | None:
        """Check ``cond`` against the mode; return (b, m) embeddings or None.

        ``sigma_cond=math.inf`` ignores cond; ``sigma_cond=None`` turns conditional at the
        first cond (unless the bank already holds rows without prompts).
        """
        if self.sigma_cond == math.inf:
            return None
        if self.sigma_cond is None and not self.conditional:
            if cond is None:
                return None
            if len(self.bank) and self.bank.cond is None:
                raise ValueError(
                    "cond was given but the bank already holds samples committed without cond; "
                    "pass cond from the first batch on, or build the DiversityGuidance with "
                    "sigma_cond=math.inf to ignore prompts"
                )
            c = self._cond_tensor(cond, b, device)
            self._cond_seen = True
            return c
        if cond is None:
            raise ValueError(
                f"cond is required: this guidance is conditional (sigma_cond={self.sigma_cond}); "
                "pass one prompt embedding per sample, shape (b, m)"
            )
        return self._cond_tensor(cond, b, device)

    @staticmethod
    def _cond_tensor(cond: Any, b: int, device: torch.device) -> torch.Tensor:
        c = as_tensor(cond, "cond", device=None if isinstance(cond, torch.Tensor) else device)
        if c.dim() == 1:
            c = c[None]
        if c.dim() != 2:
            raise ValueError(
                f"cond must be (b, m) or (m,); got shape {tuple(c.shape)}: pool token "
                "embeddings into one vector per sample first (e.g. cond.mean(dim=1))"
            )
        if c.shape[0] == 1 and b > 1:
            c = c.expand(b, -1)
        elif c.shape[0] != b:
            raise ValueError(
                f"cond has {c.shape[0]} rows but latents has {b} samples; give one embedding "
                "per sample (or a single one for all)"
            )
        return c

    def bandwidths(self, feats: Any = None, cond: Any = None) -> tuple[float, float | None]:
        """The (sigma, sigma_cond) the next guided step uses: the given ones, or automatic.

        ``sigma=None``: the median distance from a row to its `AUTO_KNN`-th nearest neighbour
        (k = min(3, rows - 1)), over the bank's rows (at most 1,000, drawn with a fixed seed)
        and the batch's own ``feats`` (the features of the current latents, as the bank stores
        them), so guidance works from the first batch on. Degenerate rows: fewer than 2 rows
        (nothing to push against, S is empty) give 1.0; all rows equal give their RMS norm
        (1.0 for zero rows).

        ``sigma_cond=None`` (once conditional): the smallest distance between two distinct
        prompts of the bank and the batch, divided by `AUTO_COND_DIV` (3), so another prompt
        weighs at most exp(-9) ~ 1.2e-4; with a single distinct prompt, `AUTO_COND_UNIT` (0.3)
        times the prompts' RMS norm (0.3 on unit-normalised embeddings); zero embeddings 1.0.
        Prompts closer than 1e-6 times their RMS norm count as one. None when unconditional;
        ``math.inf``: None (prompt kernel 1, prompts ignored).

        Both are computed afresh at every guided step while the bank holds fewer than
        `AUTO_MIN_ROWS` (64) rows; then cached, and refreshed when the bank has doubled in
        size, when it shrinks (cleared, or replaced by ``bank.load_state_dict``) or when the
        batch brings a prompt not seen at the last refresh. Explicit values are returned as
        given (`rkekernels.guidance_grad` itself always takes explicit bandwidths).

        Args:
            feats: (b, D) the batch's features (`rkekernels.features` of the latents, or of
                ``feature_fn(latents)``), or None (the bank's rows only).
            cond: (b, m) the batch's prompt embeddings, or None.

        Example:
            >>> import torch
            >>> from rkekernels import DiversityGuidance
            >>> g = DiversityGuidance(normalize=False)
            >>> g.commit(torch.tensor([[0.0], [1.0], [3.0], [6.0]]))
            >>> g.bandwidths()      # 3rd-NN distances 6, 5, 3, 6: median (the lower middle) 5
            (5.0, None)
        """
        n = len(self.bank)
        auto_s, auto_c = self.sigma is None, self.sigma_cond is None and self.conditional
        if not (auto_s or auto_c):
            return float(self.sigma), (self.sigma_cond if self.conditional else None)
        cache = self._auto
        fresh = (
            not cache
            or n < AUTO_MIN_ROWS
            or n < cache["rows"]
            or n >= 2 * cache["rows"]
            or (auto_c and cache.get("sigma_cond") is None)
        )
        if auto_c and not fresh and cond is not None:
            fresh = not self._known_prompts(torch.as_tensor(cond), cache["prompts"])
        if fresh:
            cache = self._auto = self._compute_bandwidths(feats, cond, auto_s, auto_c)
        sigma = cache["sigma"] if auto_s else float(self.sigma)
        sigma_cond = cache["sigma_cond"] if auto_c else self.sigma_cond
        return sigma, (sigma_cond if self.conditional else None)

    def refresh(self) -> None:
        """Forget the cached automatic bandwidths (the next guided step recomputes them)."""
        self._auto = {}

    @staticmethod
    def _known_prompts(c: torch.Tensor, prompts: torch.Tensor) -> bool:
        c = c.reshape(-1, c.shape[-1]).to(prompts)
        tol = 1e-6 * float(prompts.pow(2).sum(1).mean().sqrt()) + 1e-30
        return bool((torch.cdist(c, prompts).amin(1) <= tol).all())

    def _sample_rows(self, t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] <= 1000:
            return t
        gen = torch.Generator().manual_seed(0)
        return t[torch.randperm(t.shape[0], generator=gen)[:1000].to(t.device)]

    def _compute_bandwidths(self, feats: Any, cond: Any, auto_s: bool, auto_c: bool) -> dict:
        n = len(self.bank)
        out: dict[str, Any] = {"rows": n, "sigma": None, "sigma_cond": None}
        if auto_s:
            rows = [self._sample_rows(self.bank.features)] if n else []
            if feats is not None:
                rows.append(torch.as_tensor(feats).detach().reshape(len(feats), -1))
            x = (
                torch.cat([r.to(device=rows[0].device, dtype=torch.float64) for r in rows])
                if rows
                else torch.zeros(0, 1, dtype=torch.float64)
            )
            if x.shape[0] < 2:
                sig = 1.0
            else:
                d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
                d.fill_diagonal_(math.inf)
                k = min(AUTO_KNN, x.shape[0] - 1)
                sig = float(d.kthvalue(k, dim=1).values.median())
                if not sig > 0.0:
                    sig = float(x.pow(2).sum(1).mean().sqrt()) or 1.0
            out["sigma"] = sig
        if auto_c:
            rows = [self._sample_rows(self.bank.cond)] if n and self.bank.cond is not None else []
            if cond is not None:
                c = torch.as_tensor(cond).detach()
                rows.append(c.reshape(-1, c.shape[-1]))
            p = torch.cat([r.to(device=rows[0].device, dtype=torch.float64) for r in rows])
            rms = float(p.pow(2).sum(1).mean().sqrt())
            p = torch.unique(p, dim=0)
            if p.shape[0] > 1:
                d = torch.cdist(p, p, compute_mode="donot_use_mm_for_euclid_dist")
                d.fill_diagonal_(math.inf)
                tol = 1e-6 * rms
                dmin = float(d[d > tol].min()) if bool((d > tol).any()) else 0.0
            else:
                dmin = 0.0
            if dmin > 0.0:
                out["sigma_cond"] = dmin / AUTO_COND_DIV
            else:
                out["sigma_cond"] = AUTO_COND_UNIT * rms if rms > 0.0 else 1.0
            out["prompts"] = p
        return out

    @staticmethod
    def _latents(latents: Any) -> torch.Tensor:
        if not isinstance(latents, torch.Tensor):
            raise TypeError(f"latents must be a torch tensor, got {type(latents).__name__}")
        if latents.dim() < 1 or latents.shape[0] == 0:
            raise ValueError(
                f"latents must be (b, ...) with b >= 1 samples; got shape {tuple(latents.shape)}"
            )
        if not latents.is_floating_point():
            raise TypeError(f"latents must be floating point, got {latents.dtype}")
        return latents

    def grad(self, latents: torch.Tensor, cond: Any = None) -> GuidanceResult:
        """The raw diversity gradient against the bank, without schedule or scale.

        ``GuidanceResult(grad, log_s)`` with ``grad = -d log S / d latents`` (latents' shape)
        and ``log_s`` (b,), as `rkekernels.guidance_grad` computes it; with ``feature_fn``,
        S is evaluated on ``feature_fn(latents)`` and the gradient is pulled back to the latents
        by one vector-Jacobian product. Works under ``torch.no_grad()``.

        Args:
            latents: (b, ...) current samples (or denoised predictions).
            cond: (b, m) or (m,) prompt embeddings; required iff ``sigma_cond`` is set.

        Raises:
            ValueError: cond missing/unexpected or of the wrong shape; bad latents (see
                `guidance_grad`); a ``feature_fn`` whose output does not depend on the latents
                through autograd.

        Example:
            >>> import torch
            >>> from rkekernels import DiversityGuidance
            >>> g = DiversityGuidance(sigma=1.0, normalize=False)
            >>> g.commit(torch.zeros(1, 2))
            >>> g.grad(torch.tensor([[0.5, 0.0]])).grad    # (2/s^2) (z - f): away from the bank
            tensor([[1., 0.]])
        """
        latents = self._latents(latents)
        cond = self._cond(cond, latents.shape[0], latents.device)
        if self.feature_fn is None and (self.sigma is None or self.sigma_cond is None):
            feats = (
                features(latents.detach(), normalize=self.normalize) if self.sigma is None else None
            )
            sigma, sigma_cond = self.bandwidths(feats, cond)
        elif self.feature_fn is None:
            sigma, sigma_cond = self.bandwidths()
        else:
            sigma = sigma_cond = None  # resolved below, on feature_fn's output
        kwargs = dict(
            cond=cond,
            sigma=sigma,
            sigma_cond=sigma_cond,
            normalize=self.normalize,
            include_batch=self.include_batch,
            backend=self.backend,
            algorithm=self.algorithm,
            kernel=self.kernel,
        )
        if self.feature_fn is None:
            return self._fade(guidance_grad(latents.detach(), self.bank, **kwargs))
        with torch.enable_grad():
            z = latents.detach().requires_grad_(True)
            f = self.feature_fn(z)
            if not isinstance(f, torch.Tensor) or f.dim() < 1 or f.shape[0] != z.shape[0]:
                raise ValueError(
                    "feature_fn must return a tensor (b, ...) with one row per sample; got "
                    f"{type(f).__name__} {tuple(getattr(f, 'shape', ()))}"
                )
            if not f.requires_grad:
                raise ValueError(
                    "feature_fn output does not depend on the latents through autograd "
                    "(was it computed under torch.no_grad() or detached?)"
                )
            feats = features(f.detach(), normalize=self.normalize) if self.sigma is None else None
            kwargs["sigma"], kwargs["sigma_cond"] = self.bandwidths(feats, cond)
            res = guidance_grad(f.detach(), self.bank, **kwargs)
            (gz,) = torch.autograd.grad(
                f, z, grad_outputs=res.grad.to(f.dtype).reshape(f.shape), allow_unused=True
            )
        if gz is None:
            gz = torch.zeros_like(latents)
        return self._fade(GuidanceResult(gz.detach(), res.log_s))

    def _fade(self, res: GuidanceResult) -> GuidanceResult:
        """objective="log1p": -grad log(1 + 2S) = 2S / (1 + 2S) * (-grad log S), per sample."""
        if self.objective == "log":
            return res
        log_s = torch.as_tensor(res.log_s)
        grad = torch.as_tensor(res.grad)
        fade = torch.sigmoid(log_s.to(grad.dtype) + math.log(2.0))
        return GuidanceResult(grad * fade.reshape(-1, *([1] * (grad.dim() - 1))), res.log_s)

    def step_fade(self, cond: Any, b: int | None = None) -> torch.Tensor | None:
        """The prompt fade f_a of each sample's step, or None where the step is not faded.

        ``f_a = min(1, max_j w_aj / tau)``, ``w_aj = exp(-||y_a - c_j||^2 / sigma_cond^2)``
        over the entries j of S: the bank's prompt embeddings and, with ``include_batch``, the
        other samples of the batch (tau = `PROMPT_FADE_TAU`). One pass over the (n, m) prompt
        embeddings of the bank only, not over its features. S without entries gives f = 1 (the
        gradient is zero there anyway). None for ``step_rule="paper"`` or unconditional
        guidance.

        Args:
            cond: (b, m) or (m,) prompt embeddings of the batch.
            b: the batch size (to expand a single (m,) embedding); default: cond's rows.

        Returns:
            (b,) tensor in (0, 1] on cond's device (float64 for float64 cond, else float32),
            or None.

        Example:
            >>> import torch
            >>> from rkekernels import DiversityGuidance
            >>> g = DiversityGuidance(1.0, sigma_cond=0.5, include_batch=False)
            >>> g.commit(torch.randn(1, 4), cond=torch.tensor([[1.0, 0.0]]))
            >>> g.step_fade(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # same prompt, unrelated
            tensor([1.0000, 0.0067])
        """
        if self.step_rule == "paper" or not self.conditional:
            return None
        sigma_cond = self.sigma_cond
        if sigma_cond is None:  # automatic: the value of the last guided step (or fresh)
            sigma_cond = self._auto.get("sigma_cond") or self.bandwidths(None, cond)[1]
        c = as_tensor(cond, "cond")
        c = c[None] if c.dim() == 1 else c
        rows = c.shape[0] if b is None else b
        cdt = torch.float64 if c.dtype == torch.float64 else torch.float32
        c = (c.expand(rows, -1) if c.shape[0] == 1 else c).to(cdt)
        exact = "donot_use_mm_for_euclid_dist"  # no cancellation for nearly equal prompts
        d2 = torch.full((rows,), math.inf, device=c.device, dtype=cdt)
        bank_cond = self.bank.cond
        if bank_cond is not None and len(self.bank):
            bc = bank_cond.to(device=c.device, dtype=cdt)
            d2 = torch.cdist(c, bc, compute_mode=exact).amin(dim=1) ** 2
        if self.include_batch and rows > 1:
            inner = torch.cdist(c, c, compute_mode=exact) ** 2
            inner.fill_diagonal_(math.inf)
            d2 = torch.minimum(d2, inner.amin(dim=1))
        log_w = -d2 / sigma_cond**2
        fade = torch.exp(log_w - math.log(PROMPT_FADE_TAU)).clamp(max=1.0)
        return torch.where(torch.isinf(d2), torch.ones_like(fade), fade)

    def update(
        self, latents: torch.Tensor, grad: torch.Tensor, fade: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The rescaled step ``z_a + f_a * scale * ||z_a|| / ||g_a|| * g_a`` (g_a = 0: no move).

        ``fade`` holds the f_a (`step_fade`; None: f = 1, the paper's step). Norms are taken
        over all entries of each sample, in float32 (float64 for float64 latents); the result
        has the latents' shape and dtype.

        Example:
            >>> import torch
            >>> from rkekernels import DiversityGuidance
            >>> g = DiversityGuidance(sigma=1.0, scale=0.5)
            >>> z = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
            >>> g.update(z, torch.tensor([[0.0, 9.0], [0.0, 0.0]]))  # ||z_0|| = 5: moves 2.5
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
            out = z + (self.scale * z.norm(dim=1, keepdim=True)) * direction
        return out.to(latents.dtype).reshape(latents.shape)

    def apply(
        self,
        latents: torch.Tensor,
        cond: Any = None,
        progress: float | None = None,
        *,
        step: int | None = None,
    ) -> torch.Tensor:
        """One guided update of the batch, if the schedule selects this call.

        Args:
            latents: (b, ...) current latents, any layout (features flatten them).
            cond: (b, m) or (m,) prompt embeddings; required iff ``sigma_cond`` is set.
            progress: the sampler's progress in [0, 1] (e.g. ``step_index / num_steps``);
                required when ``start``/``stop`` restrict the schedule.
            step: this call's index in the schedule; default: the internal count `calls`.
                The count continues from ``step + 1``.

        Returns:
            The updated latents (same shape, dtype, device), or ``latents`` itself when the
            step is not selected or ``scale == 0``.

        Raises:
            ValueError: see `grad`; progress outside [0, 1] or missing while windowed.

        Example:
            >>> import torch
            >>> from rkekernels import DiversityGuidance
            >>> g = DiversityGuidance(sigma=1.0, scale=0.1, every=2)
            >>> z = torch.randn(3, 4, 8, 8)
            >>> [g.apply(z) is z for _ in range(4)]   # calls 1 and 3 skipped
            [False, True, False, True]
        """
        latents = self._latents(latents)
        k = self.calls if step is None else step
        selected = self.active(k, progress)
        if self.conditional == (cond is None):  # missing cond, or a first / ignored one
            self._cond(cond, latents.shape[0], latents.device)  # raises the named error
        if not selected or (self.scale == 0.0 and self.novelty is None):
            self.calls = k + 1
            return latents
        out = latents
        if self.scale != 0.0:
            last = self.grad(latents, cond)
            out = self.update(latents, last.grad, self.step_fade(cond, latents.shape[0]))
            self.last = last
        if self.novelty is not None and self.novelty.scale != 0.0:
            out = self.novelty.update(out, self.novelty.grad(out).grad)
        self.calls = k + 1  # only a call that succeeded advances the schedule
        return out

    def commit(self, latents: torch.Tensor, cond: Any = None) -> None:
        """Add finished samples to the bank and restart the call count.

        Stores ``features(latents)`` (``features(feature_fn(latents))`` with a feature_fn)
        and, when conditional, their prompt embeddings.

        Args:
            latents: (b, ...) finished samples.
            cond: (b, m) or (m,) prompt embeddings; required iff ``sigma_cond`` is set.

        Raises:
            ValueError: cond missing/unexpected; NaN/Inf or a feature width other than the
                bank's (see `FeatureBank.add`).

        Example:
            >>> import torch
            >>> from rkekernels import DiversityGuidance
            >>> g = DiversityGuidance(sigma=1.0, sigma_cond=0.5, capacity=3)
            >>> g.commit(torch.randn(2, 4), cond=torch.randn(2, 8))
            >>> g.commit(torch.randn(2, 4), cond=torch.randn(8))    # one prompt for both
            >>> len(g.bank)                                         # capacity 3: oldest gone
            3
        """
        latents = self._latents(latents)
        cond = self._cond(cond, latents.shape[0], latents.device)
        with torch.no_grad():
            x = latents if self.feature_fn is None else self.feature_fn(latents)
            f = features(x, normalize=self.normalize)
        self.bank.add(f, cond)
        self.calls = 0

    def __repr__(self) -> str:
        cond = "" if self.sigma_cond is None else f", sigma_cond={self.sigma_cond}"
        if self.sigma_cond is None and self.conditional:
            cond = ", sigma_cond=auto"
        return (
            f"DiversityGuidance(sigma={self.sigma}{cond}, scale={self.scale}, "
            f"every={self.every}, start={self.start}, stop={self.stop}, bank={len(self.bank)})"
        )

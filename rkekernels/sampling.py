"""`DiversityGuidance`: SPARKE guidance for any sampler, as a schedule plus one update rule.

Each guided step moves every sample of the batch along g_a = -grad log S(z_a), the direction
that raises the conditional RKE diversity of the bank plus the new sample
(`rkekernels.guidance_grad`, SPEC section 2), by the paper's rescaled step; `commit` puts the
finished samples into the bank. The settings, the automatic bandwidths, the prompt fade and the
rescaled step are in `rkekernels.guidance_defaults`; the class docstring gives the schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ._input import BACKENDS, as_tensor, check_backend, check_sigma
from .guidance import FeatureBank, GuidanceResult, features, guidance_grad
from .guidance_defaults import (
    AUTO_MIN_ROWS,
    DEFAULT_SCALE,
    DEFAULT_START,
    DEFAULT_STOP,
    OBJECTIVES,
    STEP_RULES,
    auto_sigma,
    auto_sigma_cond,
    check_choice,
    check_count,
    check_latents,
    check_scale,
    check_sigma_cond,
    check_unit,
    known_prompts,
    objective_fade,
    prompt_fade,
    rescaled_step,
)
from .ops import guidance_kernels

__all__ = ["DiversityGuidance"]  # its settings and rules: rkekernels.guidance_defaults


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
            "prompt_fade" multiplies each sample's step by f_a = min(1, max_j w_aj / 0.05)
            (`rkekernels.guidance_defaults.prompt_fade`), so a sample whose prompt is unrelated
            to everything in S barely moves (all w <= 1e-3: at most 2% of a matching prompt's
            step). "paper": the published step. Unconditional: the same (w = 1).
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
        self.objective = check_choice(objective, OBJECTIVES, "objective")
        self.step_rule = check_choice(step_rule, STEP_RULES, "step_rule")
        self.sigma = None if sigma is None else check_sigma(sigma, "sigma")
        self.sigma_cond = check_sigma_cond(sigma_cond)
        self._cond_seen = False  # sigma_cond=None: becomes conditional at the first cond
        self._auto: dict[str, Any] = {}  # cached automatic bandwidths (see `bandwidths`)
        self.scale = check_scale(scale)
        self.every = check_count(every, "every")
        self.start = check_unit(start, "start")
        self.stop = check_unit(stop, "stop")
        if self.start > self.stop:
            raise ValueError(f"start must be <= stop, got start={start!r}, stop={stop!r}")
        capacity = check_count(capacity, "capacity")
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
        p = check_unit(progress, "progress")
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

        ``sigma=None``: `rkekernels.guidance_defaults.auto_sigma` (the median distance to the
        3rd nearest neighbour) over the bank's rows and the batch's own ``feats``, so guidance
        works from the first batch on. ``sigma_cond=None`` (once conditional):
        `rkekernels.guidance_defaults.auto_sigma_cond` (the smallest distance between distinct
        prompts / 3, so another prompt weighs at most 1.2e-4). None when unconditional or for
        ``sigma_cond=math.inf`` (prompt kernel 1). Computed afresh at every guided step while
        the bank holds fewer than `AUTO_MIN_ROWS` (64) rows; then cached, and refreshed when the
        bank has doubled, when it shrinks (cleared, or ``bank.load_state_dict``) or when a batch
        brings a new prompt. Explicit values are returned as given.

        Args:
            feats: (b, D) the batch's features (`rkekernels.features` of the latents, or of
                ``feature_fn(latents)``), a zero-argument callable that returns them (called
                only when the bandwidths are recomputed), or None (the bank's rows only).
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
        if auto_c and not fresh and cond is not None and not self._checked(cond):
            fresh = not known_prompts(torch.as_tensor(cond), cache["prompts"])
            cache["checked"] = (cond, getattr(cond, "_version", None))
        if fresh:
            cache = self._auto = self._compute_bandwidths(feats, cond, auto_s, auto_c)
        sigma = cache["sigma"] if auto_s else float(self.sigma)
        sigma_cond = cache["sigma_cond"] if auto_c else self.sigma_cond
        return sigma, (sigma_cond if self.conditional else None)

    def _checked(self, cond: Any) -> bool:
        """Whether this very cond tensor, unchanged, was already found among the cached prompts
        (the per-step check, a cdist and a host sync, runs once per new cond)."""
        seen = self._auto.get("checked")
        return seen is not None and seen[0] is cond and seen[1] == getattr(cond, "_version", None)

    def refresh(self) -> None:
        """Forget the cached automatic bandwidths (the next guided step recomputes them)."""
        self._auto = {}

    def _compute_bandwidths(self, feats: Any, cond: Any, auto_s: bool, auto_c: bool) -> dict:
        n = len(self.bank)
        out: dict[str, Any] = {"rows": n, "sigma": None, "sigma_cond": None}
        if auto_s:
            rows = [self.bank.features] if n else []
            if callable(feats):
                feats = feats()
            if feats is not None:
                f = torch.as_tensor(feats).detach()
                f = f.reshape(len(f), -1)
                if n and f.shape[1] != self.bank.features.shape[1]:
                    raise ValueError(
                        f"bank holds features of width {self.bank.features.shape[1]} but the "
                        f"latents' features have width {f.shape[1]}; both must come from the "
                        "same feature map"
                    )
                rows.append(f)
            out["sigma"] = auto_sigma(rows)
        if auto_c:
            rows = [self.bank.cond] if n and self.bank.cond is not None else []
            if cond is not None:
                c = torch.as_tensor(cond).detach()
                rows.append(c.reshape(-1, c.shape[-1]))
            out["sigma_cond"], out["prompts"] = auto_sigma_cond(rows)
        return out

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
        latents = check_latents(latents)
        cond = self._cond(cond, latents.shape[0], latents.device)
        sigma = sigma_cond = None  # with feature_fn: resolved below, on its output
        if self.feature_fn is None:  # the batch's features are built only on a refresh
            x = latents.detach()
            sigma, sigma_cond = self.bandwidths(lambda: features(x, normalize=self.normalize), cond)
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
            return objective_fade(
                self.objective, guidance_grad(latents.detach(), self.bank, **kwargs)
            )
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
            fd = f.detach()
            kwargs["sigma"], kwargs["sigma_cond"] = self.bandwidths(
                lambda: features(fd, normalize=self.normalize), cond
            )
            res = guidance_grad(f.detach(), self.bank, **kwargs)
            (gz,) = torch.autograd.grad(
                f, z, grad_outputs=res.grad.to(f.dtype).reshape(f.shape), allow_unused=True
            )
        if gz is None:
            gz = torch.zeros_like(latents)
        return objective_fade(self.objective, GuidanceResult(gz.detach(), res.log_s))

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
        bank_cond = self.bank.cond if len(self.bank) else None
        return prompt_fade(as_tensor(cond, "cond"), bank_cond, sigma_cond, self.include_batch, b)

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
        return rescaled_step(latents, grad, self.scale, fade)

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
        latents = check_latents(latents)
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
        latents = check_latents(latents)
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

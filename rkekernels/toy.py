"""An exact, closed-form, prompt-conditioned diffusion model: ground truth for guidance.

Nothing is trained or downloaded. The data distribution of each prompt is a mixture of isotropic
Gaussians, whose denoiser E[x0 | x_sigma] is known in closed form for the variance-exploding
forward process used by k-diffusion / EDM:

    x_sigma = x0 + sigma * eps,   x0 ~ sum_k w_k N(mu_k, std^2 I),   eps ~ N(0, I)

    p(k | x_sigma) = softmax_k( log w_k - ||x_sigma - mu_k||^2 / (2 (std^2 + sigma^2)) )
    E[x0 | x_sigma, k] = (std^2 x_sigma + sigma^2 mu_k) / (std^2 + sigma^2)
    E[x0 | x_sigma]    = sum_k p(k | x_sigma) E[x0 | x_sigma, k]

(the normalising constants of the components are equal, since all share one variance). With an
exact denoiser, the probability-flow ODE integrated by `sample_euler` on a `get_sigmas_karras`
schedule reproduces the mixture, so mode coverage and precision of a sampler can be measured
against the truth.

- `GaussianMixture`: the mixture, its exact denoiser, sampling, and the mode statistics
  (`nearest_mode`, `mode_counts`, `modes_covered`, `precision`). With ``basis`` (d, r) the
  mixture lives on an r-dimensional plane of a d-dimensional space (x0 = basis @ y0): the
  higher-dimensional variant, still exact.
- `get_sigmas_karras`, `sample_euler`: written the way k-diffusion writes them, with the
  denoiser convention ``model(x, sigma, **extra_args) -> denoised``.
- `PromptWorld`: prompts are points of an embedding space; each has its own mixture with one
  dominant mode and several rare ones; prompts with nearby embeddings share modes.
  ``world.denoise(x, sigma, cond=...)`` is the conditional denoiser.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["GaussianMixture", "PromptWorld", "get_sigmas_karras", "sample_euler"]


def _float_tensor(value: Any, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = torch.as_tensor(value)
    if t.is_complex() or not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name} must hold real numbers, got dtype {t.dtype}")
    if dtype is not None:
        t = t.to(dtype)
    elif not t.is_floating_point():
        t = t.to(torch.float32)
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return t


def _check_std(std: Any) -> float:
    if isinstance(std, bool) or not isinstance(std, int | float):
        raise TypeError(f"std must be a positive float, got {type(std).__name__}")
    s = float(std)
    if not math.isfinite(s) or s <= 0.0:
        raise ValueError(f"std must be finite and > 0, got {std!r}")
    return s


class GaussianMixture:
    """A mixture of isotropic Gaussians sum_k w_k N(mu_k, std^2 I), with its exact denoiser.

    Args:
        means: (K, d) component means (or (K, r) plane coordinates when ``basis`` is given).
        weights: (K,) positive mixture weights (normalised to sum to 1).
        std: the common standard deviation of every component, > 0.
        basis: optional (d, r) matrix with orthonormal columns. The mixture then lives on the
            plane it spans: x0 = basis @ y0 with y0 ~ sum_k w_k N(mu_k, std^2 I_r); `means`
            becomes the (K, d) embedded means, and the denoiser stays exact (the off-plane part
            of x_sigma is pure noise, independent of y0).

    Attributes:
        means: (K, d) means in the ambient space. weights: (K,). std: float. dim: d.
        basis: (d, r) or None.

    Raises:
        ValueError: shapes that do not match, NaN/Inf, weights <= 0, std <= 0, or a basis whose
            columns are not orthonormal.
        TypeError: complex or non-numeric data.

    Example:
        >>> import torch
        >>> from rkekernels.toy import GaussianMixture
        >>> gm = GaussianMixture([[0.0, 0.0], [4.0, 0.0]], [0.75, 0.25], std=0.5)
        >>> gm.denoise(torch.tensor([[4.0, 0.0]]), 1e-4)  # tiny noise: x is its own estimate
        tensor([[4., 0.]])
        >>> gm.denoise(torch.tensor([[4.0, 0.0]]), 1e6)  # huge noise: the mixture mean
        tensor([[1., 0.]])
        >>> x = gm.sample(1000, generator=torch.Generator().manual_seed(0))
        >>> gm.modes_covered(x), round(gm.precision(x), 2)
        (2, 0.99)
    """

    def __init__(self, means: Any, weights: Any, std: float, *, basis: Any = None) -> None:
        means = _float_tensor(means, "means")
        if means.dim() != 2 or means.shape[0] == 0 or means.shape[1] == 0:
            raise ValueError(f"means must be (K, d) with K, d >= 1; got shape {tuple(means.shape)}")
        weights = _float_tensor(weights, "weights", means.dtype)
        if weights.shape != (means.shape[0],):
            raise ValueError(
                f"weights must have shape (K,) = ({means.shape[0]},); got {tuple(weights.shape)}"
            )
        if bool((weights <= 0).any()):
            raise ValueError("weights must all be > 0")
        self.std = _check_std(std)
        self.weights = weights / weights.sum()
        self.log_weights = self.weights.log()
        self.plane_means = means
        self.basis: torch.Tensor | None = None
        if basis is not None:
            basis = _float_tensor(basis, "basis", means.dtype)
            if basis.dim() != 2 or basis.shape[1] != means.shape[1]:
                raise ValueError(
                    f"basis must be (d, r) with r = means.shape[1] = {means.shape[1]}; "
                    f"got shape {tuple(basis.shape)}"
                )
            gram = basis.double().t() @ basis.double()
            if not torch.allclose(gram, torch.eye(gram.shape[0], dtype=gram.dtype), atol=1e-5):
                raise ValueError("basis must have orthonormal columns (basis.T @ basis = I)")
            self.basis = basis
        self.means = means if basis is None else means @ basis.t()
        self.dim = self.means.shape[1]

    @property
    def n_components(self) -> int:
        """K, the number of components (modes)."""
        return self.means.shape[0]

    def _flat(self, x: Any, name: str = "x") -> tuple[torch.Tensor, torch.Size]:
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(x)
        if not x.is_floating_point():
            x = x.to(self.means.dtype)
        if x.dim() < 1 or x.shape[0] == 0:
            raise ValueError(f"{name} must be (b, ...) with b >= 1; got shape {tuple(x.shape)}")
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.dim:
            raise ValueError(
                f"{name} has {flat.shape[1]} features per sample but the mixture has d = {self.dim}"
            )
        return flat, x.shape

    def to_plane(self, x: Any) -> torch.Tensor:
        """Plane coordinates (b, r) of samples x (b, d): ``x @ basis`` (x itself without a basis).

        Example:
            >>> from rkekernels.toy import GaussianMixture
            >>> GaussianMixture([[1.0, 2.0]], [1.0], 0.1).to_plane([[1.0, 2.0]])
            tensor([[1., 2.]])
        """
        flat, _ = self._flat(x)
        return flat if self.basis is None else flat @ self.basis.to(flat)

    def denoise(self, x: torch.Tensor, sigma: Any) -> torch.Tensor:
        """The exact posterior mean E[x0 | x_sigma = x] (a k-diffusion style denoiser).

            r_k = softmax_k( log w_k - ||x - mu_k||^2 / (2 (std^2 + sigma^2)) )
            E[x0 | x] = sum_k r_k (std^2 x + sigma^2 mu_k) / (std^2 + sigma^2)

        Computed with a = std^2 / (std^2 + sigma^2) = 1 / (1 + (sigma/std)^2), so it stays finite
        and accurate for sigma -> 0 (returns x) and sigma -> infinity (returns the mixture mean).
        With a basis, the plane coordinates y = basis^T x are denoised and mapped back.

        Args:
            x: (b, ...) noisy samples, flattened per sample to d features.
            sigma: noise level >= 0: a float, a 0-dim tensor, or a (b,) tensor (one per sample,
                as k-diffusion passes it).

        Returns:
            A tensor of x's shape and dtype.

        Raises:
            ValueError: a wrong number of features, sigma of the wrong size, negative or
                non-finite.

        Example:
            >>> import torch
            >>> from rkekernels.toy import GaussianMixture
            >>> gm = GaussianMixture([[-1.0], [1.0]], [0.5, 0.5], std=1.0)
            >>> gm.denoise(torch.tensor([[0.0], [3.0]]), torch.tensor([0.0, 1.0])).shape
            torch.Size([2, 1])
        """
        flat, shape = self._flat(x)
        b = flat.shape[0]
        s = torch.as_tensor(sigma, dtype=flat.dtype, device=flat.device)
        if s.numel() == 1:
            s = s.reshape(1).expand(b)
        elif s.numel() == b:
            s = s.reshape(b)
        else:
            raise ValueError(
                f"sigma must be a number or hold one value per sample (b = {b}); "
                f"got shape {tuple(s.shape)}"
            )
        if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
            raise ValueError("sigma must be finite and >= 0")
        y = flat if self.basis is None else flat @ self.basis.to(flat)
        mu = self.plane_means.to(flat)
        ratio = (s / self.std) ** 2  # (sigma/std)^2, may overflow to inf: handled below
        a = 1.0 / (1.0 + ratio)  # std^2 / (std^2 + sigma^2)
        c = torch.where(ratio < 1.0, ratio * a, 1.0 - a)  # sigma^2 / (std^2 + sigma^2)
        d2 = ((y[:, None, :] - mu[None]) ** 2).sum(-1)  # (b, K), exact form: no cancellation
        logits = self.log_weights.to(flat) - d2 * (a / (2.0 * self.std**2))[:, None]
        resp = torch.softmax(logits, dim=-1)
        out = a[:, None] * y + c[:, None] * (resp @ mu)
        if self.basis is not None:
            out = out @ self.basis.to(flat).t()
        return out.reshape(shape)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw n samples (n, d): a component k ~ w, then mu_k + std * N(0, I).

        Example:
            >>> import torch
            >>> from rkekernels.toy import GaussianMixture
            >>> GaussianMixture([[0.0, 0.0]], [1.0], 0.1).sample(3).shape
            torch.Size([3, 2])
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(
            (n, self.plane_means.shape[1]), generator=generator, dtype=self.means.dtype
        )
        y = self.plane_means[comp] + self.std * noise
        return y if self.basis is None else y @ self.basis.t()

    def nearest_mode(self, x: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The nearest component of each sample and its distance in units of std.

        Args:
            x: (b, ...) samples (flattened to d features).

        Returns:
            (index (b,) long, distance (b,)): argmin_k ||x - mu_k|| and min_k ||x - mu_k|| / std
            (ambient distance: with a basis, the off-plane part counts).

        Example:
            >>> from rkekernels.toy import GaussianMixture
            >>> gm = GaussianMixture([[0.0], [10.0]], [0.5, 0.5], std=2.0)
            >>> gm.nearest_mode([[9.0], [-4.0]])
            (tensor([1, 0]), tensor([0.5000, 2.0000]))
        """
        flat, _ = self._flat(x)
        mu = self.means.to(flat)
        d2 = ((flat[:, None, :] - mu[None]) ** 2).sum(-1)
        best, idx = d2.min(dim=1)
        return idx, best.sqrt() / self.std

    def mode_counts(self, x: Any, within: float = 3.0) -> torch.Tensor:
        """(K,) number of samples whose nearest mode is k and lies within ``within`` std of it."""
        idx, dist = self.nearest_mode(x)
        hit = dist <= within
        return torch.bincount(idx[hit], minlength=self.n_components)

    def modes_covered(self, x: Any, within: float = 3.0) -> int:
        """Number of distinct components with at least one sample within ``within`` std.

        Example:
            >>> from rkekernels.toy import GaussianMixture
            >>> gm = GaussianMixture([[0.0], [10.0], [20.0]], [1.0, 1.0, 1.0], std=1.0)
            >>> gm.modes_covered([[0.5], [1.0], [19.0], [5.0]])
            2
        """
        return int((self.mode_counts(x, within) > 0).sum())

    def precision(self, x: Any, within: float = 3.0) -> float:
        """Fraction of samples within ``within`` std of some component (of this mixture).

        Example:
            >>> from rkekernels.toy import GaussianMixture
            >>> gm = GaussianMixture([[0.0], [10.0]], [0.5, 0.5], std=1.0)
            >>> gm.precision([[0.5], [9.0], [5.0], [12.0]])
            0.75
        """
        _, dist = self.nearest_mode(x)
        return float((dist <= within).double().mean())

    def __repr__(self) -> str:
        plane = "" if self.basis is None else f", plane of dim {self.basis.shape[1]}"
        return f"GaussianMixture(K={self.n_components}, d={self.dim}, std={self.std}{plane})"


def get_sigmas_karras(
    n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device: Any = "cpu"
) -> torch.Tensor:
    """The Karras et al. (2022, EDM) noise schedule, as k-diffusion builds it, ending in 0.

        sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
        i = 0..n-1, then sigma_n = 0.

    Args:
        n: number of sampling steps (>= 1; n = 1 gives [sigma_max, 0]).
        sigma_min, sigma_max: 0 < sigma_min <= sigma_max. rho: the schedule's curvature.

    Returns:
        (n + 1,) float32 tensor, decreasing, last entry 0.

    Example:
        >>> from rkekernels.toy import get_sigmas_karras
        >>> get_sigmas_karras(3, 0.1, 10.0)
        tensor([10.0000,  1.4507,  0.1000,  0.0000])
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not (0.0 < sigma_min <= sigma_max < math.inf):
        raise ValueError(
            f"need 0 < sigma_min <= sigma_max < inf, got sigma_min={sigma_min}, "
            f"sigma_max={sigma_max}"
        )
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1).double()
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32).to(device)


@torch.no_grad()
def sample_euler(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict | None = None,
    callback: Callable[[dict], Any] | None = None,
) -> torch.Tensor:
    """Euler steps of the probability-flow ODE, the way k-diffusion's ``sample_euler`` writes them.

        for i: denoised = model(x, sigma_i * ones(b), **extra_args)
               d = (x - denoised) / sigma_i
               x = x + d * (sigma_{i+1} - sigma_i)

    Args:
        model: a denoiser ``model(x, sigma, **extra_args) -> denoised`` (sigma is a (b,) tensor).
        x: (b, ...) initial noise, already scaled by sigmas[0].
        sigmas: (steps + 1,) decreasing noise levels (e.g. `get_sigmas_karras`).
        extra_args: keyword arguments for ``model`` (e.g. ``{"cond": ...}``).
        callback: called after each model evaluation with a dict
            ``{"x", "i", "sigma", "sigma_hat", "denoised"}``, as in k-diffusion.

    Returns:
        The final samples, x's shape.

    Example:
        >>> import torch
        >>> from rkekernels.toy import GaussianMixture, get_sigmas_karras, sample_euler
        >>> gm = GaussianMixture([[-3.0], [3.0]], [0.5, 0.5], std=0.1)
        >>> sigmas = get_sigmas_karras(20, 0.01, 40.0)
        >>> x = sigmas[0] * torch.randn(64, 1, generator=torch.Generator().manual_seed(0))
        >>> gm.precision(sample_euler(gm.denoise, x, sigmas))
        1.0
    """
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        denoised = model(x, sigma * s_in, **extra_args)
        d = (x - denoised) / sigma
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        x = x + d * (sigmas[i + 1] - sigma)
    return x


class PromptWorld:
    """Prompts as points of an embedding space, each with its own exact Gaussian mixture.

    Prompts come in groups of ``group_size`` semantically close prompts: their embeddings are a
    shared group direction plus a small offset (distance ~0.14 inside a group, ~1.4 across
    groups, in ``embed_dim`` dimensions). Each group owns a "flower" in the latent plane: a
    centre mode, the dominant mode (weight ``dominant``) of every prompt of the group, and petals
    on a circle around it, the rare modes (sharing the remaining weight equally). Prompt j of a
    group takes K - 1 consecutive petals starting at petal j * shift, shift = max(1, (K-1) // 2),
    so close prompts share their dominant mode and some rare ones, the situation where
    unguided samples of similar prompts look alike. Components have standard deviation ``std``;
    every two modes are at least ``10 std`` apart, flowers of different groups further.

    With ``dim > 2`` the plane is embedded in R^dim by a fixed random orthonormal basis
    (the higher-dimensional variant); every mixture uses the same plane.

    Args:
        n_prompts: number of prompts P (>= 1).
        modes_per_prompt: modes per prompt K (>= 2: one dominant, K - 1 rare).
        dominant: weight of the dominant mode, in (0, 1).
        std: component standard deviation.
        dim: latent dimension (>= 2).
        embed_dim: prompt embedding dimension m.
        group_size: prompts per group of close prompts.
        seed: seed of the embeddings and the basis (the layout itself is deterministic).

    Attributes:
        embeddings: (P, m) float32 prompt embeddings.
        means: (M, dim) all modes of the world. prompt_modes: list of (K,) index tensors into
            ``means`` (dominant first). groups: (P,) group id of each prompt. basis: (dim, 2) or
            None.

    Example:
        >>> import torch
        >>> from rkekernels.toy import PromptWorld, get_sigmas_karras, sample_euler
        >>> world = PromptWorld(n_prompts=2, modes_per_prompt=3)
        >>> world.embeddings.shape, world.n_modes(0), world.shared_modes(0, 1)
        (torch.Size([2, 8]), 3, 2)
        >>> cond = torch.tensor([0] * 100 + [1] * 100)
        >>> x = 80.0 * torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
        >>> out = sample_euler(world.denoise, x, get_sigmas_karras(30, 0.002, 80.0), {"cond": cond})
        >>> world.precision(out[:100], 0) > 0.95, world.precision(out[100:], 1) > 0.95
        (True, True)
        >>> world.mixture(0).mode_counts(out[:100]).argmax().item()  # the dominant mode
        0
    """

    def __init__(
        self,
        n_prompts: int = 4,
        modes_per_prompt: int = 5,
        *,
        dominant: float = 0.8,
        std: float = 0.1,
        dim: int = 2,
        embed_dim: int = 8,
        group_size: int = 2,
        seed: int = 0,
    ) -> None:
        for name, v, lo in (
            ("n_prompts", n_prompts, 1),
            ("modes_per_prompt", modes_per_prompt, 2),
            ("dim", dim, 2),
            ("embed_dim", embed_dim, 1),
            ("group_size", group_size, 1),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if not 0.0 < dominant < 1.0:
            raise ValueError(f"dominant must be in (0, 1), got {dominant!r}")
        self.std = _check_std(std)
        self.dim = dim
        self.dominant = float(dominant)
        gen = torch.Generator().manual_seed(seed)
        k = modes_per_prompt
        n_groups = -(-n_prompts // group_size)
        self.groups = torch.arange(n_prompts) // group_size
        sizes = [min(group_size, n_prompts - g * group_size) for g in range(n_groups)]
        # a flower per group: the shared dominant mode in the centre, petals around it; prompt j
        # of a group takes petals j*shift .. j*shift + k - 2, so close prompts share the centre
        # and some petals. Adjacent modes are >= 10 std apart, groups further still.
        shift = max(1, (k - 1) // 2)
        petals = [k - 1 + (sz - 1) * shift for sz in sizes]
        gap = 10.0 * self.std
        r = max(gap, max(gap / (2.0 * math.sin(math.pi / max(n, 2))) for n in petals))
        if n_groups == 1:
            centres = torch.zeros(1, 2, dtype=torch.float64)
        else:
            rg = (2.0 * r + gap) / (2.0 * math.sin(math.pi / n_groups))
            a = 2.0 * math.pi * torch.arange(n_groups, dtype=torch.float64) / n_groups
            centres = rg * torch.stack([a.cos(), a.sin()], dim=1)
        plane, self.prompt_modes = [], []
        for g in range(n_groups):
            a = 2.0 * math.pi * torch.arange(petals[g], dtype=torch.float64) / petals[g]
            a = a + math.pi / 2
            ring = centres[g] + r * torch.stack([a.cos(), a.sin()], dim=1)
            base = sum(len(m) for m in plane)
            plane.append(torch.cat([centres[g][None], ring]))
            for j in range(sizes[g]):
                own = [base + 1 + j * shift + i for i in range(k - 1)]
                self.prompt_modes.append(torch.tensor([base, *own]))
        self.plane_means = torch.cat(plane).to(torch.float32)
        self.petal_radius = r
        self.radius = float(self.plane_means.norm(dim=1).max())
        if n_groups > embed_dim:  # orthonormal group directions need embed_dim >= groups
            raise ValueError(
                f"embed_dim must be >= the number of prompt groups ({n_groups} for "
                f"n_prompts={n_prompts}, group_size={group_size}), got {embed_dim}"
            )
        directions = torch.linalg.qr(torch.randn(embed_dim, embed_dim, generator=gen))[0]
        offsets = torch.randn(n_prompts, embed_dim, generator=gen, dtype=torch.float64)
        offsets = 0.1 * offsets / offsets.norm(dim=1, keepdim=True)
        emb = []
        for g in range(n_groups):
            for j in range(sizes[g]):
                direction = directions[:, g].double()
                emb.append(direction + offsets[g * group_size + j])
        self.embeddings = torch.stack(emb).to(torch.float32)
        self.basis: torch.Tensor | None = None
        if dim > 2:
            q, _ = torch.linalg.qr(torch.randn(dim, 2, generator=gen, dtype=torch.float64))
            self.basis = q.to(torch.float32)
        self.means = self.plane_means if self.basis is None else self.plane_means @ self.basis.t()
        rare = (1.0 - self.dominant) / (k - 1)
        weights = torch.tensor([self.dominant] + [rare] * (k - 1))
        self._mixtures = [
            GaussianMixture(self.plane_means[idx], weights, self.std, basis=self.basis)
            for idx in self.prompt_modes
        ]

    @property
    def n_prompts(self) -> int:
        """P, the number of prompts."""
        return self.embeddings.shape[0]

    def n_modes(self, prompt: int) -> int:
        """The number of true modes of one prompt."""
        return self.mixture(prompt).n_components

    def shared_modes(self, p: int, q: int) -> int:
        """How many modes prompts p and q have in common."""
        a, b = set(self.prompt_modes[p].tolist()), set(self.prompt_modes[q].tolist())
        return len(a & b)

    def mixture(self, prompt: int) -> GaussianMixture:
        """The exact data distribution of one prompt (dominant mode first)."""
        if isinstance(prompt, torch.Tensor):
            prompt = int(prompt)
        if not 0 <= prompt < self.n_prompts:
            raise IndexError(f"prompt must be in [0, {self.n_prompts}), got {prompt}")
        return self._mixtures[prompt]

    def prompt_index(self, cond: Any, b: int | None = None) -> torch.Tensor:
        """Prompt indices (b,) from ``cond``: an int, (b,) integer indices, or (b, m) embeddings.

        Embeddings are matched to the nearest prompt embedding of the world.
        """
        c = torch.as_tensor(cond)
        if not c.is_floating_point():
            idx = c.reshape(-1).long()
            if b is not None and idx.numel() == 1:
                idx = idx.expand(b)
        else:
            if c.dim() == 1:
                c = c[None]
            if c.dim() != 2 or c.shape[1] != self.embeddings.shape[1]:
                raise ValueError(
                    f"cond embeddings must be (b, {self.embeddings.shape[1]}); "
                    f"got shape {tuple(c.shape)}"
                )
            d2 = ((c[:, None, :].float() - self.embeddings.to(c.device)[None]) ** 2).sum(-1)
            idx = d2.argmin(dim=1).cpu()
            if b is not None and idx.numel() == 1:
                idx = idx.expand(b)
        if b is not None and idx.numel() != b:
            raise ValueError(f"cond must give one prompt per sample (b = {b}); got {idx.numel()}")
        if bool((idx < 0).any()) or bool((idx >= self.n_prompts).any()):
            raise ValueError(f"prompt indices must be in [0, {self.n_prompts})")
        return idx.cpu()

    def denoise(self, x: torch.Tensor, sigma: Any, cond: Any = None) -> torch.Tensor:
        """The conditional denoiser E[x0 | x_sigma = x, prompt]: each row with its prompt's mixture.

        Args:
            x: (b, ...) noisy samples with dim features each.
            sigma: float or (b,) noise levels.
            cond: an int prompt, (b,) int prompt indices, or (b, m) prompt embeddings.

        Returns:
            (b, ...) denoised samples.
        """
        if cond is None:
            raise TypeError("PromptWorld.denoise needs cond: prompt indices or embeddings")
        b = x.shape[0]
        idx = self.prompt_index(cond, b)
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
        s = s.expand(b) if s.numel() == 1 else s
        out = torch.empty_like(x)
        for p in idx.unique().tolist():
            rows = (idx == p).nonzero().squeeze(1).to(x.device)
            out[rows] = self._mixtures[p].denoise(x[rows], s[rows])
        return out

    def sample(self, prompt: int, n: int, generator: torch.Generator | None = None):
        """n exact samples (n, dim) of one prompt's distribution."""
        return self.mixture(prompt).sample(n, generator)

    def precision(self, x: Any, prompt: int, within: float = 3.0) -> float:
        """Fraction of samples within ``within`` std of a true mode of their own prompt."""
        return self.mixture(prompt).precision(x, within)

    def modes_covered(self, x: Any, prompt: int, within: float = 3.0) -> int:
        """Distinct true modes of the prompt with a sample within ``within`` std."""
        return self.mixture(prompt).modes_covered(x, within)

    def to_plane(self, x: Any) -> torch.Tensor:
        """(b, 2) plane coordinates of latents (for plots)."""
        flat = torch.as_tensor(x).reshape(len(x), -1)
        return flat if self.basis is None else flat @ self.basis.to(flat)

    def __repr__(self) -> str:
        return (
            f"PromptWorld(prompts={self.n_prompts}, modes_per_prompt={self.n_modes(0)}, "
            f"dominant={self.dominant}, std={self.std}, dim={self.dim})"
        )

"""Novelty guidance (SPARKE, second version): push samples away from a fixed reference bank.

With reference features r_1..r_m (e.g. the training images, through the same feature map as the
samples), the novelty objective of a new sample z is

    S_ref(z) = sum_j k_s(phi(z), r_j)^2,      g_ref(z) = -grad_z log S_ref(z)

the diversity objective of `rkekernels.guidance_grad` with the reference as the bank and without
the batch (the other current samples are not a reference). Minimising S_ref lowers the
similarity of the sample to everything in the reference; the step is rescaled as the diversity
step, with its own weight::

    z <- z + scale_ref * ||z|| / ||g_ref|| * g_ref

`novelty_guidance` builds that term as a `DiversityGuidance` whose bank holds the reference;
pass it as ``DiversityGuidance(..., novelty=term)`` to add it to the diversity guidance on the
same scheduled steps, or call its ``apply`` in your own loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .sampling import DiversityGuidance

__all__ = ["novelty_guidance"]


def novelty_guidance(
    reference: Any,
    sigma: float,
    *,
    scale: float = 0.05,
    normalize: bool = True,
    feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | str | None = None,
    backend: str = "auto",
    batch_size: int = 256,
) -> DiversityGuidance:
    """The novelty term: guidance away from a fixed reference set, with its own weight.

    Args:
        reference: (m, ...) reference samples in the samples' own space (latents, or images
            when ``feature_fn`` maps images to features); committed to the term's bank through
            the same map as the samples (``features(feature_fn(reference), normalize)``).
        sigma: kernel bandwidth on features (> 0), as in `DiversityGuidance`.
        scale: the weight of the novelty step relative to ||z|| (0 disables it).
        normalize, feature_fn, device, backend: as in `DiversityGuidance`.
        batch_size: reference rows mapped per ``feature_fn`` call.

    Returns:
        A `DiversityGuidance` with ``include_batch=False`` and the reference as its bank;
        ``term.apply(z)`` moves z away from the reference, ``term.grad(z)`` is -grad log S_ref.

    Raises:
        ValueError / TypeError: an empty reference, or the checks of `DiversityGuidance`.

    Example:
        >>> import torch
        >>> from rkekernels.guidance_novelty import novelty_guidance
        >>> term = novelty_guidance(torch.tensor([[1.0, 0.0]]), sigma=1.0, scale=0.1)
        >>> term.apply(torch.tensor([[1.0, 0.1]]))            # pushed away from [1, 0]
        tensor([[0.9900, 0.2000]])
    """
    if not isinstance(reference, torch.Tensor):
        reference = torch.as_tensor(reference)
    if reference.dim() < 1 or reference.shape[0] == 0:
        raise ValueError(
            f"reference must be (m, ...) with m >= 1 samples; got shape {tuple(reference.shape)}"
        )
    term = DiversityGuidance(
        sigma,
        scale=scale,
        capacity=int(reference.shape[0]),
        normalize=normalize,
        include_batch=False,
        feature_fn=feature_fn,
        device=device,
        backend=backend,
    )
    for i in range(0, reference.shape[0], int(batch_size)):
        term.commit(reference[i : i + int(batch_size)])
    return term

"""Checks shared by the sampler adapters (diffusers, k-diffusion)."""

from __future__ import annotations

from typing import Any

from ..sampling import DiversityGuidance

__all__ = ["check_adapter_guidance"]


def check_adapter_guidance(guidance: Any, cond: Any) -> None:
    """The sampler adapters' shared checks: a `DiversityGuidance`, and prompt embeddings only
    for a conditional one (raises TypeError / ValueError naming the argument)."""
    if not isinstance(guidance, DiversityGuidance):
        raise TypeError(
            f"guidance must be a rkekernels.DiversityGuidance, got {type(guidance).__name__}"
        )
    if cond is not None and not guidance.conditional:
        raise ValueError(
            "cond was given but guidance.sigma_cond is None: build the DiversityGuidance "
            "with sigma_cond for prompt-aware guidance, or leave cond out"
        )

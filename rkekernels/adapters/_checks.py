"""Checks shared by the sampler adapters (diffusers, k-diffusion)."""

from __future__ import annotations

import math
from typing import Any

from ..sampling import DiversityGuidance

__all__ = ["check_adapter_guidance"]


def check_adapter_guidance(guidance: Any, cond: Any) -> None:
    """The sampler adapters' shared checks: a `DiversityGuidance`, and prompt embeddings only
    where its bank can take them (raises TypeError / ValueError naming the argument).

    Any guidance accepts a cond since ``sigma_cond=None`` is automatic: it turns prompt-aware at
    the first cond, and ``sigma_cond=math.inf`` ignores it."""
    if not isinstance(guidance, DiversityGuidance):
        raise TypeError(
            f"guidance must be a rkekernels.DiversityGuidance, got {type(guidance).__name__}"
        )
    ignored = guidance.sigma_cond == math.inf
    if cond is not None and not ignored and guidance.bank.cond is None and len(guidance.bank):
        raise ValueError(
            "cond was given but guidance.bank already holds samples committed without cond: "
            "pass cond from the first batch on, or use sigma_cond=math.inf to ignore prompts"
        )

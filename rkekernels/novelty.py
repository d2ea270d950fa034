"""Deprecated: the guidance-side novelty term moved to `rkekernels.guidance_novelty`.

``import rkekernels.novelty`` still works for one release and re-exports `novelty_guidance`; it
emits a DeprecationWarning naming the new path. (Novelty *scores* of a finished set, KEN, are
`rkekernels.evaluation.ken_novelty`.)
"""

import warnings

from .guidance_novelty import novelty_guidance

__all__ = ["novelty_guidance"]

warnings.warn(
    "rkekernels.novelty is deprecated and will be removed in the next release; import "
    "novelty_guidance from rkekernels.guidance_novelty instead",
    DeprecationWarning,
    stacklevel=2,
)

"""rkekernels: exact, streamed RKE diversity scores and SPARKE diversity guidance.

    RKE(X) = n^2 / sum_ij exp(-||x_i - x_j||^2 / sigma^2)      (the "mode count", 1 <= RKE <= n)

Metrics: `rke_score`, `cond_rke_score`, `rke_entropies`, `default_bandwidth`, `median_bandwidth`.
Comparing sets: `rke_scores` (one shared bandwidth), `rke_sweep` (RKE against sigma), `plot_sweep`.
Order q (Vendi family): `vendi_score`, `cond_vendi_score`, `vendi_entropies`, `vendi_modes`.
Guidance: `features`, `guidance_grad`, `FeatureBank`, `DiversityGuidance`.
Adapters: `rkekernels.adapters.diffusers`, `rkekernels.adapters.kdiffusion`.
Scale-out: `rkekernels.distributed`, `rkekernels.metrics.RKEMetric`.
Ground truth: `rkekernels.reference` (dense float64).
"""

from ._input import BackendUnavailableError
from .compare import BandwidthSweep, SharedScores, plot_sweep, rke_scores, rke_sweep
from .guidance import FeatureBank, GuidanceResult, features, guidance_grad
from .sampling import DiversityGuidance
from .scores import (
    RKEEntropies,
    cond_rke_score,
    default_bandwidth,
    median_bandwidth,
    rke_entropies,
    rke_score,
)
from .vendi import Mode, VendiEntropies, cond_vendi_score, vendi_entropies, vendi_modes, vendi_score

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "BandwidthSweep",
    "DiversityGuidance",
    "FeatureBank",
    "GuidanceResult",
    "Mode",
    "RKEEntropies",
    "SharedScores",
    "VendiEntropies",
    "__version__",
    "cond_rke_score",
    "cond_vendi_score",
    "default_bandwidth",
    "features",
    "guidance_grad",
    "median_bandwidth",
    "plot_sweep",
    "rke_entropies",
    "rke_score",
    "rke_scores",
    "rke_sweep",
    "vendi_entropies",
    "vendi_modes",
    "vendi_score",
]

"""Evaluation beyond one number: the statistics and the workbench behind ``rkekernels evaluate``.

- `rkekernels.evaluation.statistics`: per-sample sums (`sample_sums`), jackknife intervals
  (`rke_interval`, `cond_rke_interval`) and `relative_rke`.
- `rkekernels.evaluation.novelty`: KEN novelty against a reference (`ken_novelty`, `Novelty`),
  with its null (reference subsets against the rest) and a p-value.
- `rkekernels.evaluation.workbench`: `evaluate`, a folder of images (or an embedding file) to
  the scores of ``rkekernels evaluate``, with the embeddings cached on disk
  (`rkekernels.evaluation.embeddings`, `default_cache_dir`) and the inputs read by
  `rkekernels.evaluation.inputs`.

Every name is importable from here: ``from rkekernels.evaluation import rke_interval, evaluate``.
"""

from .embeddings import default_cache_dir
from .inputs import IMAGE_EXTS
from .novelty import AUTO_EXACT_MAX, Novelty, ken_novelty
from .statistics import (
    Interval,
    SampleSums,
    cond_rke_interval,
    relative_rke,
    rke_interval,
    sample_sums,
)
from .workbench import evaluate

__all__ = [
    "AUTO_EXACT_MAX",
    "IMAGE_EXTS",
    "Interval",
    "Novelty",
    "SampleSums",
    "cond_rke_interval",
    "default_cache_dir",
    "evaluate",
    "ken_novelty",
    "relative_rke",
    "rke_interval",
    "sample_sums",
]

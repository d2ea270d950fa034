"""The novelty term: guidance away from a reference bank lowers the similarity to it."""

import importlib
import sys

import pytest
import torch

from rkekernels import DiversityGuidance, features, guidance_grad
from rkekernels import reference as ref
from rkekernels.guidance_novelty import novelty_guidance


def _similarity(z, bank, sigma):
    """log S_ref = log sum_j k(phi(z), r_j)^2 per sample (the float64 reference)."""
    return ref.guidance_log_s(z, bank, sigma=sigma, include_batch=False)


def test_novelty_lowers_similarity_to_the_reference():
    g = torch.Generator().manual_seed(0)
    reference = torch.randn(40, 8, generator=g) + 2.0  # a "training set" around one direction
    z0 = reference[:6] + 0.3 * torch.randn(6, 8, generator=g)  # samples that copy it
    term = novelty_guidance(reference, sigma=0.8, scale=0.05)
    bank = features(reference)
    # its gradient is guidance_grad against the reference without the batch
    want = guidance_grad(z0, bank, sigma=0.8, include_batch=False).grad
    torch.testing.assert_close(term.grad(z0).grad, want)
    z = z0.clone()
    for _ in range(10):
        z = term.apply(z)
    before, after = _similarity(z0, bank, 0.8), _similarity(z, bank, 0.8)
    print("log S_ref before/after (mean):", float(before.mean()), float(after.mean()))
    assert bool((after < before - 0.5).all()), (before, after)
    # inside DiversityGuidance: the same move on a selected step when the own bank is empty
    guide = DiversityGuidance(sigma=0.8, scale=0.0, novelty=term)
    torch.testing.assert_close(guide.apply(z0), term.apply(z0))
    both = DiversityGuidance(sigma=0.8, scale=0.05, novelty=term)
    both.commit(z0[:2])
    moved = both.apply(z0[2:])
    assert bool((_similarity(moved, bank, 0.8) < _similarity(z0[2:], bank, 0.8)).all())


def test_bad_input():
    with pytest.raises(ValueError, match="reference must be"):
        novelty_guidance(torch.zeros(0, 3), sigma=1.0)
    with pytest.raises(TypeError, match="novelty must be None"):
        DiversityGuidance(sigma=1.0, novelty="yes")


def test_old_module_path_warns_and_reexports(monkeypatch):
    """rkekernels.novelty (the old path) still imports for one release, with a warning."""
    monkeypatch.delitem(sys.modules, "rkekernels.novelty", raising=False)
    with pytest.warns(DeprecationWarning, match=r"rkekernels\.guidance_novelty"):
        old = importlib.import_module("rkekernels.novelty")
    assert old.novelty_guidance is novelty_guidance
    assert old.__all__ == ["novelty_guidance"]

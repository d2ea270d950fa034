"""The float64 reference follows its input's device.

Benchmarks and the GPU check compare kernel outputs on CUDA with `rkekernels.reference`; a
reference that returns CPU tensors makes every such comparison raise "tensors on different
devices" (issue 17). torch's "meta" device refuses to mix with CPU tensors as CUDA does, so these
checks fail here on a CPU-only machine whenever a reference function creates a tensor on the
default device.
"""

import math

import torch

from rkekernels import reference as ref

META = torch.device("meta")


def _meta(*shape):
    return torch.empty(*shape, dtype=torch.float64, device=META)


def _all_on(tensors, device):
    return all(v.device == device for v in tensors if isinstance(v, torch.Tensor))


def test_scores_and_sums_follow_the_input_device():
    x, t = _meta(7, 3), _meta(7, 2)
    assert _all_on(ref.pair_sums(x, t, 1.0, 2.0), META)
    assert ref.rke_score(x, 1.0).device == META
    assert ref.cond_rke_score(x, t, 1.0, 2.0).device == META
    assert _all_on(ref.rke_entropies(x, t, 1.0, 2.0), META)
    assert ref.sq_dists(x, x[:0]).device == META
    assert ref.gaussian_kernel(x, x, 1.0).device == META


def test_grad_term_scale_follows_the_input_device():
    # the cotangents are plain numbers (or CPU scalars), as the GPU check passes them
    x, t = _meta(6, 4), _meta(6, 2)
    g = torch.ones(5, dtype=torch.float64)
    sx, st = ref.grad_term_scale(x, t, [0.5, 2.0], 1.5, g[:2], g[2], g[3:])
    assert sx.device == META and st.device == META
    assert sx.shape == (6,) and st.shape == (6,)


def test_guidance_reference_follows_the_input_device():
    z, bank = _meta(3, 2, 2), _meta(5, 4)
    cond, bank_cond = _meta(3, 2), _meta(5, 2)
    kw = {"cond": cond, "bank_cond": bank_cond, "sigma": 0.8, "sigma_cond": 1.2}
    assert ref.guidance_log_s(z, bank, **kw).device == META  # include_batch: the b x b mask
    assert ref.guidance_log_s(z[:1], None, sigma=1.0).device == META  # nothing to compare
    assert ref.features(z).device == META


def test_reference_values_unchanged_on_cpu():
    # the device fix must not change a number: RKE of three far apart points is 3
    x = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]])
    assert float(ref.rke_score(x, 1.0)) == 3.0
    e = ref.rke_entropies(x, torch.zeros(3, 1), 1.0, 1.0)
    assert abs(float(e.h_x) - math.log(3.0)) < 1e-12
    sx, _ = ref.grad_term_scale(x, torch.zeros(3, 1), [1.0], 1.0, [1.0], 1.0, [1.0])
    assert sx.dtype == torch.float64 and bool((sx >= 0).all())

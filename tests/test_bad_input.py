"""SPEC section 4 for the score functions: every bad input gets a clear, named error."""

import math

import numpy as np
import pytest
import torch

import rkekernels as rk
from rkekernels import _input

X = torch.randn(10, 3)
T = torch.randn(10, 2)

FUNCS = [
    lambda x, **k: rk.rke_score(x, 1.0, **k),
    lambda x, **k: rk.cond_rke_score(x, T, 1.0, 1.0, **k),
    lambda x, **k: rk.rke_entropies(x, T, 1.0, 1.0, **k),
]


@pytest.mark.parametrize("f", FUNCS)
def test_empty_set(f):
    with pytest.raises(ValueError, match=r"x is empty \(n = 0\)"):
        f(torch.zeros(0, 3))


@pytest.mark.parametrize("f", FUNCS)
def test_wrong_rank_says_how_to_reshape(f):
    with pytest.raises(ValueError, match=r"x must be 2-D \(n, d\).*reshape\(len\(x\), -1\)"):
        f(torch.zeros(10, 3, 4))
    with pytest.raises(ValueError, match=r"x must be 2-D.*reshape\(-1, 1\)"):
        f(torch.zeros(10))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf(bad):
    x = X.clone()
    x[3, 1] = bad
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        rk.rke_score(x, 1.0)
    t = T.clone()
    t[0, 0] = bad
    with pytest.raises(ValueError, match="t contains NaN or Inf"):
        rk.cond_rke_score(X, t, 1.0, 1.0)
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        rk.median_bandwidth(x.numpy())


@pytest.mark.parametrize("s", [0.0, -1.0, float("nan"), float("inf")])
def test_sigma_not_finite_or_not_positive(s):
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
        rk.rke_score(X, s)
    with pytest.raises(ValueError, match=r"sigma\[1\] must be finite and > 0"):
        rk.rke_score(X, [1.0, s])
    with pytest.raises(ValueError, match="sigma_t must be finite and > 0"):
        rk.cond_rke_score(X, T, 1.0, s)


def test_sigma_wrong_type_or_shape():
    with pytest.raises(TypeError, match="sigma must be a positive float"):
        rk.rke_score(X, "1.0")
    with pytest.raises(ValueError, match="sigma is an empty sequence"):
        rk.rke_score(X, [])
    with pytest.raises(ValueError, match="sigma_t must be a single bandwidth"):
        rk.cond_rke_score(X, T, 1.0, [1.0, 2.0])


def test_x_and_t_with_different_n():
    with pytest.raises(ValueError, match="x and t must have the same number of rows n"):
        rk.cond_rke_score(X, T[:7], 1.0, 1.0)
    with pytest.raises(ValueError, match="needs prompt embeddings t"):
        rk.rke_entropies(X, None, 1.0, 1.0)


def test_tensors_on_different_devices():
    meta = torch.empty(10, 2, device="meta")
    with pytest.raises(ValueError, match="t is on meta but x is on cpu"):
        rk.cond_rke_score(X, meta, 1.0, 1.0)


@pytest.mark.parametrize(
    "data,match",
    [
        (np.ones((4, 2), dtype=np.complex64), "x has complex dtype"),
        (torch.ones(4, 2, dtype=torch.complex64), "x has complex dtype"),
        (np.array([["a", "b"], ["c", "d"]]), "x has non-numeric dtype"),
        (np.array([[object(), 1]], dtype=object), "x has non-numeric dtype"),
        ("abc", "x is a string"),
        (None, "x must be an array or tensor, got None"),
    ],
)
def test_complex_string_object(data, match):
    with pytest.raises(TypeError, match=match):
        rk.rke_score(data, 1.0)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        rk.rke_score(X, 1.0, backend="cuda")


def test_triton_backend_without_triton(monkeypatch):
    monkeypatch.setattr(_input, "triton_available", lambda: False)
    with pytest.raises(ValueError, match="pip install triton"):
        rk.rke_score(X, 1.0, backend="triton")
    with pytest.raises(ImportError, match="pip install triton"):
        rk.rke_score(X, 1.0, backend="triton")
    # auto quietly takes the torch path
    assert math.isfinite(float(rk.rke_score(X, 1.0, backend="auto")))


def test_n_equal_one_is_valid():
    assert float(rk.rke_score(torch.randn(1, 5), 0.3)) == 1.0
    assert float(rk.cond_rke_score(torch.randn(1, 5), torch.randn(1, 2))) == 1.0
    assert rk.rke_score(np.ones((1, 1))) == 1.0


# --------------------------------------------------------------- issue 12: odd inputs, named


def test_sparse_and_other_odd_tensors_get_a_clear_error():
    sp = X.to_sparse()
    with pytest.raises(TypeError, match=r"x is a torch.sparse_coo tensor.*to_dense"):
        rk.rke_score(sp, 1.0)
    with pytest.raises(TypeError, match=r"t is a torch.sparse_csr tensor"):
        rk.cond_rke_score(X, T.to_sparse_csr(), 1.0, 1.0)
    with pytest.raises(TypeError, match=r"bank is a torch.sparse_coo tensor"):
        rk.guidance_grad(torch.randn(2, 3), torch.randn(4, 3).to_sparse(), sigma=1.0)
    with pytest.raises(TypeError, match=r"f is a torch.sparse_coo tensor"):
        rk.FeatureBank(4).add(torch.randn(2, 3).to_sparse())
    q = torch.quantize_per_tensor(X, 0.1, 0, torch.qint8)
    with pytest.raises(TypeError, match=r"x is a quantized tensor"):
        rk.rke_score(q, 1.0)


def test_zero_dim_numpy_reports_its_real_shape():
    with pytest.raises(ValueError, match=r"got shape \(\)"):
        rk.rke_score(np.array(3.0), 1.0)
    with pytest.raises(ValueError, match=r"got shape \(\)"):
        rk.rke_score(np.float64(3.0), 1.0)


def test_masked_arrays_are_refused_unless_nothing_is_masked():
    a = np.ma.masked_array(X.numpy(), mask=np.zeros(X.shape, bool))
    assert rk.rke_score(a, 1.0) == pytest.approx(float(rk.rke_score(X, 1.0)), rel=1e-6)
    a.mask[2, 1] = True
    with pytest.raises(TypeError, match=r"x is a numpy masked array.*filled"):
        rk.rke_score(a, 1.0)


def test_sigma_requiring_grad_is_refused_not_detached():
    s = torch.tensor(1.0, requires_grad=True)
    with pytest.raises(ValueError, match=r"sigma is a tensor that requires grad"):
        rk.rke_score(X, s)
    with pytest.raises(ValueError, match=r"sigma is a tensor that requires grad"):
        rk.rke_score(X, torch.tensor([1.0, 2.0], requires_grad=True))
    with pytest.raises(ValueError, match=r"sigma_t is a tensor that requires grad"):
        rk.cond_rke_score(X, T, 1.0, s)
    with pytest.raises(ValueError, match=r"sigma is a tensor that requires grad"):
        rk.guidance_grad(torch.randn(2, 3), torch.randn(4, 3), sigma=s)
    assert float(rk.rke_score(X, s.detach())) == pytest.approx(float(rk.rke_score(X, 1.0)))


def test_half_feature_bank_refuses_values_that_overflow():
    bank = rk.FeatureBank(4, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"beyond the range.*float16"):
        bank.add(torch.tensor([[1e5, 0.0]]))
    assert len(bank) == 0
    bank.add(torch.tensor([[1e4, 0.0]]))
    assert len(bank) == 1


def test_diversity_guidance_checks_at_construction():
    with pytest.raises(ValueError, match=r"backend must be one of"):
        rk.DiversityGuidance(1.0, backend="bogus")
    with pytest.raises(ValueError, match=r"scale must be finite and >= 0"):
        rk.DiversityGuidance(1.0, scale=-0.1)


def test_failed_apply_does_not_advance_the_schedule():
    g = rk.DiversityGuidance(1.0, sigma_cond=0.5, every=2)
    z = torch.randn(2, 4)
    with pytest.raises(ValueError, match="cond"):
        g.apply(z)
    assert g.calls == 0
    g.apply(z, cond=torch.randn(2, 3))
    assert g.calls == 1

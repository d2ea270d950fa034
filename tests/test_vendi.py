"""Order-q scores (Vendi family) against the float64 dense reference and vendi-score."""

import logging
import math

import numpy as np
import pytest
import torch

import rkekernels
from rkekernels import reference as ref
from rkekernels.vendi import pick_method
from tests.conftest import TOL, rel

ORDERS = [0.5, 1.0, 1.5, 2.0, 3.0, math.inf]


def _data(n=73, d=7, m=3, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    x[: n // 2] += 3.0  # two blobs: a spectrum that is neither flat nor a single mode
    t = torch.randn(n, m, generator=gen, dtype=torch.float64)
    return x.to(dtype), t.to(dtype)


def _clusters(sizes, d=4, sep=100.0, seed=0, noise=0.01):
    gen = torch.Generator().manual_seed(seed)
    parts = [
        sep * torch.eye(d, dtype=torch.float64)[i] + noise * torch.randn(k, d, generator=gen)
        for i, k in enumerate(sizes)
    ]
    return torch.cat(parts)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("q", ORDERS)
@pytest.mark.parametrize("kernel", ["gaussian", "cosine", "linear"])
def test_orders_match_reference(q, dtype, kernel):
    x, _ = _data(dtype=dtype)
    sigma = 2.5 if kernel == "gaussian" else None
    got = rkekernels.vendi_score(x, q, sigma, kernel=kernel, method="exact")
    want = ref.vendi_score(x.double(), q, sigma, kernel)
    assert got.dtype == dtype and got.shape == ()
    assert rel(got, want) <= TOL[dtype]


@pytest.mark.parametrize("kernel", ["gaussian", "cosine"])
def test_order1_matches_vendi_score_package(kernel):
    from vendi_score import vendi

    x, _ = _data(n=120, d=6)
    sigma = 1.7 if kernel == "gaussian" else None
    k = ref.kernel_matrix(x, kernel, sigma).numpy()
    want = vendi.score_K(k, q=1)
    got = rkekernels.vendi_score(x.numpy(), 1.0, sigma, kernel=kernel)
    assert isinstance(got, float)
    assert rel(got, want) <= 1e-8


def test_order2_gaussian_equals_rke():
    x, t = _data()
    sig = [0.7, 2.0, 5.0]
    assert torch.allclose(
        rkekernels.vendi_score(x, 2.0, sig), rkekernels.rke_score(x, sig), rtol=1e-12, atol=0
    )
    assert rel(rkekernels.vendi_score(x, 2, 2.0), rkekernels.rke_score(x, 2.0)) <= 1e-12
    # default bandwidth on both sides
    assert rel(rkekernels.vendi_score(x, 2.0), rkekernels.rke_score(x)) <= 1e-12
    assert (
        rel(
            rkekernels.cond_vendi_score(x, t, 2.0, 2.0, 1.5),
            rkekernels.cond_rke_score(x, t, 2.0, 1.5),
        )
        <= 1e-12
    )
    e2, e = (
        rkekernels.vendi_entropies(x, t, 2.0, sig, 1.5),
        rkekernels.rke_entropies(x, t, sig, 1.5),
    )
    for a, b in zip(e2, e):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("q", [1.0, 1.5, 2.0, math.inf])
@pytest.mark.parametrize("kernel", ["gaussian", "cosine", "linear"])
def test_conditional_matches_reference(q, kernel):
    x, t = _data(n=41, d=3, m=2)
    kw = {"sigma": 1.3, "sigma_t": 0.8} if kernel == "gaussian" else {}
    got = rkekernels.vendi_entropies(x, t, q, kernel=kernel, method="exact", **kw)
    want = ref.vendi_entropies(x, t, q, kw.get("sigma"), kw.get("sigma_t"), kernel)
    for name, a, b in zip(got._fields, got, want):
        assert abs(float(a) - float(b)) <= 1e-10 * max(1.0, abs(float(b))), name
    c = rkekernels.cond_vendi_score(x, t, q, kernel=kernel, method="exact", **kw)
    assert (
        rel(c, ref.cond_vendi_score(x, t, q, kw.get("sigma"), kw.get("sigma_t"), kernel)) <= 1e-10
    )


def test_conditional_limits():
    x = _clusters([5, 5, 5])
    same = torch.zeros(len(x), 2, dtype=torch.float64)
    far = 1000.0 * torch.arange(len(x), dtype=torch.float64)[:, None]
    v = rkekernels.vendi_score(x, 1.0, 1.0)
    assert rel(rkekernels.cond_vendi_score(x, same, 1.0, 1.0, 1.0), v) <= 1e-10
    assert rel(rkekernels.cond_vendi_score(x, far, 1.0, 1.0, 1.0), 1.0) <= 1e-10


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kernel", ["cosine", "linear"])
@pytest.mark.parametrize("q", [1.0, 2.0, math.inf])
def test_covariance_matches_dense(kernel, q, dtype):
    x, t = _data(n=120, d=5, m=2, dtype=dtype)
    cov = rkekernels.vendi_score(x, q, kernel=kernel, method="covariance")
    dense = rkekernels.vendi_score(x, q, kernel=kernel, method="exact")
    want = ref.vendi_score(x.double(), q, None, kernel)
    assert rel(cov, want) <= TOL[dtype] and rel(dense, want) <= TOL[dtype]
    got = rkekernels.vendi_entropies(x, t, q, kernel=kernel, method="covariance")
    wante = ref.vendi_entropies(x.double(), t.double(), q, kernel=kernel)
    for a, b in zip(got, wante):
        assert abs(float(a) - float(b)) <= 10 * TOL[dtype] * max(1.0, abs(float(b)))


@pytest.mark.parametrize("kernel", ["cosine", "linear"])
def test_rke_score_kernel_option(kernel):
    x, _ = _data(n=200, d=6)
    k = ref.kernel_matrix(x, kernel)
    want = torch.trace(k) ** 2 / (k * k).sum()  # order 2 normalised by tr K
    got = rkekernels.rke_score(x, kernel=kernel)
    assert rel(got, want) <= 1e-10
    assert rel(rkekernels.vendi_score(x, 2.0, kernel=kernel), want) <= 1e-10
    with pytest.raises(ValueError, match="sigma"):
        rkekernels.rke_score(x, 1.0, kernel=kernel)
    with pytest.raises(ValueError, match="kernel"):
        rkekernels.rke_score(x, kernel="rbf")


def test_nystrom_with_every_landmark_is_exact():
    x, t = _data(n=60, d=4)
    for q in (1.0, 3.0):
        got = rkekernels.vendi_score(x, q, 2.0, method="nystrom", dim=60)
        assert rel(got, ref.vendi_score(x, q, 2.0)) <= 1e-7
    got = rkekernels.cond_vendi_score(x, t, 1.0, 2.0, 1.0, method="nystrom", dim=60)
    assert rel(got, ref.cond_vendi_score(x, t, 1.0, 2.0, 1.0)) <= 1e-7


def test_lanczos_top_spectrum():
    x, _ = _data(n=100, d=4)
    want_inf = ref.vendi_score(x, math.inf, 1.5)
    got_inf = rkekernels.vendi_score(x, math.inf, 1.5, method="lanczos", top_k=5)
    assert rel(got_inf, want_inf) <= 1e-9  # the largest eigenvalue is all q = inf needs
    # a spread tail is the maximum-entropy completion: an upper bound that tightens with k
    want1 = float(ref.vendi_score(x, 1.0, 1.5))
    few = float(rkekernels.vendi_score(x, 1.0, 1.5, method="lanczos", top_k=10))
    most = float(rkekernels.vendi_score(x, 1.0, 1.5, method="lanczos", top_k=98))
    assert want1 * (1 - 1e-9) <= most <= few
    assert rel(most, want1) <= 1e-5


def test_rff_is_close_and_seeded():
    x = _clusters([30, 20, 10], d=3, sep=6.0)
    want = float(ref.vendi_score(x, 1.0, 1.0))
    a = rkekernels.vendi_score(x, 1.0, 1.0, method="rff", dim=1024, seed=3)
    b = rkekernels.vendi_score(x, 1.0, 1.0, method="rff", dim=1024, seed=3)
    c = rkekernels.vendi_score(x, 1.0, 1.0, method="rff", dim=1024, seed=4)
    assert float(a) == float(b) and float(a) != float(c)
    assert rel(a, want) <= 0.02
    # q = 2 through RFF: exp(H2) of the feature covariance is RKE with K replaced by Z Z^T
    assert (
        rel(rkekernels.vendi_score(x, 2.0, 1.0, method="rff", dim=1024), ref.rke_score(x, 1.0))
        <= 0.02
    )


def test_replication_and_bounds():
    x, _ = _data(n=30, d=3)
    v = float(rkekernels.vendi_score(x, 1.0, 1.0))
    assert 1.0 <= v <= 30.0
    assert rel(rkekernels.vendi_score(x.repeat(3, 1), 1.0, 1.0), v) <= 1e-9
    tight = _clusters([7, 7, 7], noise=1e-4)
    for q in (1.0, 2.0, math.inf):
        assert rel(rkekernels.vendi_score(tight, q, 1.0), 3.0) <= 1e-5


def test_outputs_and_autograd():
    x, t = _data(n=25, d=3)
    xs = x.clone().requires_grad_(True)
    got = rkekernels.vendi_score(xs, 1.0, 1.2)
    (g,) = torch.autograd.grad(got, xs)
    xr = x.clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(ref.vendi_score(xr, 1.0, 1.2), xr)
    assert torch.allclose(g, gr, rtol=1e-8, atol=1e-12)
    xs = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(
        rkekernels.vendi_score(xs, 1.5, kernel="cosine", method="covariance"), xs
    )
    xr = x.clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(ref.vendi_score(xr, 1.5, kernel="cosine"), xr)
    assert torch.allclose(g, gr, rtol=1e-8, atol=1e-12)
    many = rkekernels.vendi_score(x.numpy(), 1.0, [1.0, 2.0])
    assert isinstance(many, np.ndarray) and many.shape == (2,)
    assert isinstance(rkekernels.cond_vendi_score(x.numpy(), t.numpy(), 1.0), float)
    e = rkekernels.vendi_entropies(x, t, 1.0, [1.0, 2.0])
    assert e.h_x.shape == (2,) and torch.equal(e.h_t[0], e.h_t[1])


@pytest.mark.parametrize("method", ["exact", "rff", "nystrom", "lanczos"])
def test_modes_recover_clusters(method):
    x = _clusters([20, 12, 8])
    kw = {"dim": 512} if method == "rff" else {"dim": 40} if method == "nystrom" else {}
    modes = rkekernels.vendi_modes(x, 3, 1.0, method=method, **kw)
    assert [round(m.weight, 2) for m in modes] == [0.5, 0.3, 0.2]
    assert [sorted(m.members.tolist()) for m in modes] == [
        list(range(20)),
        list(range(20, 32)),
        list(range(32, 40)),
    ]
    # each unit eigenvector sits on its cluster (RFF's kernel has O(1/sqrt(D)) cross terms)
    assert all(m.loadings.sum() > (0.95 if method == "rff" else 0.999) for m in modes)


def test_modes_linear_kernel():
    x = _clusters([9, 3])
    modes = rkekernels.vendi_modes(x, 2, kernel="cosine", method="covariance")
    assert [round(m.weight, 3) for m in modes] == [0.75, 0.25]
    assert sorted(modes[1].members.tolist()) == list(range(9, 12))


def test_auto_picks_and_logs(caplog):
    x, _ = _data(n=50, d=4)
    with caplog.at_level(logging.INFO, logger="rkekernels.vendi"):
        rkekernels.vendi_score(x, 1.0, kernel="cosine")
    assert "'covariance'" in caplog.text
    assert pick_method("auto", kernel="gaussian", n=50, width=4, q=1.0) == "exact"
    assert pick_method("auto", kernel="gaussian", n=10**6, width=4, q=2.0) == "exact"
    assert pick_method("auto", kernel="gaussian", n=10**6, width=4, q=1.0) == "rff"
    assert pick_method("auto", kernel="linear", n=10, width=40, q=1.0) == "exact"


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        ({"q": 0.0}, ValueError, "q"),
        ({"q": -1.0}, ValueError, "q"),
        ({"q": float("nan")}, ValueError, "q"),
        ({"q": "inf"}, TypeError, "q"),
        ({"kernel": "rbf"}, ValueError, "kernel"),
        ({"method": "svd"}, ValueError, "method"),
        ({"method": "covariance"}, ValueError, "method"),
        ({"kernel": "cosine", "method": "rff"}, ValueError, "method"),
        ({"kernel": "linear", "method": "lanczos"}, ValueError, "method"),
        ({"kernel": "cosine", "sigma": 1.0}, ValueError, "sigma"),
        ({"method": "exact", "dim": 64}, ValueError, "dim"),
        ({"method": "rff", "dim": 63}, ValueError, "dim"),
        ({"method": "lanczos", "top_k": 100}, ValueError, "top_k"),
        ({"method": "exact", "top_k": 3}, ValueError, "top_k"),
        ({"sigma": -1.0}, ValueError, "sigma"),
    ],
)
def test_bad_input(kwargs, exc, word):
    x, _ = _data(n=20, d=3)
    kw = {"q": 1.0, **kwargs}
    with pytest.raises(exc, match=word):
        rkekernels.vendi_score(x, **kw)


def test_order_zero_message_reads_cleanly():
    """Issue 23 C.4: "q must be > 0 (1 for the von Neumann entropy, math.inf), got 0"."""
    x, _ = _data(n=20, d=3)
    with pytest.raises(ValueError) as info:
        rkekernels.vendi_score(x, 0)
    assert str(info.value) == (
        "q must be > 0 or math.inf (q = 1 is the von Neumann entropy, the usual Vendi score; "
        "q = 0 would only count the nonzero eigenvalues); got q=0"
    )


def test_bad_input_data():
    x, t = _data(n=20, d=3)
    z = x.clone()
    z[3] = 0.0
    with pytest.raises(ValueError, match="x has 1 all-zero rows"):
        rkekernels.vendi_score(z, kernel="cosine")
    with pytest.raises(ValueError, match="t is None"):
        rkekernels.cond_vendi_score(x, None)
    with pytest.raises(ValueError, match="sigma_t"):
        rkekernels.cond_vendi_score(x, t, kernel="linear", sigma_t=1.0)
    with pytest.raises(ValueError, match="same number of rows"):
        rkekernels.vendi_entropies(x, t[:5])
    with pytest.raises(ValueError, match="NaN"):
        rkekernels.vendi_score(torch.full((4, 2), float("nan")))

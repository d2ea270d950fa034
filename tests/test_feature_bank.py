"""FeatureBank: ring buffer semantics, cached norms, prompt embeddings, state round trip, errors."""

import io

import numpy as np
import pytest
import torch

from rkekernels import FeatureBank, guidance_grad


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rows(start, count, dim=5):
    return torch.arange(start, start + count, dtype=torch.float32)[:, None] + torch.zeros(dim)


@pytest.mark.parametrize("sizes", [[1, 1, 1, 1, 1], [2, 3, 4, 1], [7], [3, 9, 2], [4, 4]])
def test_ring_keeps_exactly_the_newest(sizes):
    cap = 4
    bank = FeatureBank(cap)
    added, cond_added = [], []
    start = 0
    for k in sizes:
        f = rows(start, k)
        c = -rows(start, k, dim=2)
        bank.add(f, c)
        added.append(f)
        cond_added.append(c)
        start += k
        want = torch.cat(added)[-cap:]
        assert len(bank) == min(cap, start)
        assert torch.equal(bank.features, want)  # oldest first
        assert torch.equal(bank.cond, torch.cat(cond_added)[-cap:])
        # cached squared norms match the stored rows (whatever the slot order)
        f_slots, sq, c_slots, csq = bank._slots()
        assert torch.equal(sq, f_slots.double().pow(2).sum(1))
        assert torch.equal(csq, c_slots.double().pow(2).sum(1))
        assert sorted(f_slots[:, 0].tolist()) == sorted(want[:, 0].tolist())


def test_properties_and_clear():
    bank = FeatureBank(3, dtype=torch.float16)
    assert len(bank) == 0 and bank.dim is None and bank.cond is None
    assert bank.features.shape == (0, 0)
    bank.add(np.ones((2, 6)))  # numpy works, converted to the bank's dtype
    assert bank.dim == 6 and bank.capacity == 3 and bank.features.dtype == torch.float16
    assert bank.cond is None and bank.cond_dim is None
    assert "len=2" in repr(bank)
    bank.clear()
    assert len(bank) == 0 and bank.features.shape == (0, 6)
    bank.add(torch.ones(1, 6))
    assert len(bank) == 1


@pytest.mark.parametrize("with_cond", [False, True])
def test_state_round_trip(with_cond):
    torch.manual_seed(0)
    bank = FeatureBank(5)
    for _ in range(3):
        bank.add(torch.randn(3, 8), torch.randn(3, 2) if with_cond else None)
    buf = io.BytesIO()
    torch.save(bank.state_dict(), buf)
    buf.seek(0)
    other = FeatureBank(5)
    other.load_state_dict(torch.load(buf))
    assert len(other) == 5 and torch.equal(other.features, bank.features)
    if with_cond:
        assert torch.equal(other.cond, bank.cond)
    else:
        assert other.cond is None
    # the restored bank keeps working as a ring, and guides identically
    z = torch.randn(2, 8)
    kw = {"sigma": 1.0}
    if with_cond:
        kw.update(cond=torch.randn(2, 2), sigma_cond=1.0)
    a, b = guidance_grad(z, bank, **kw), guidance_grad(z, other, **kw)
    # same entries in another slot order: equal up to float32 summation order
    assert float((a.grad - b.grad).norm() / b.grad.norm()) <= 1e-5
    f_new = torch.randn(2, 8)
    c_new = torch.randn(2, 2) if with_cond else None
    bank.add(f_new, c_new)
    other.add(f_new, c_new)
    assert torch.equal(other.features, bank.features)
    # a smaller bank keeps the newest entries of the state
    small = FeatureBank(2)
    small.load_state_dict(bank.state_dict())
    assert torch.equal(small.features, bank.features[-2:])


def test_empty_state_round_trip():
    bank = FeatureBank(3)
    other = FeatureBank(3)
    other.load_state_dict(bank.state_dict())
    assert len(other) == 0 and other.dim is None
    bank.add(torch.ones(1, 4))
    bank.clear()
    other.load_state_dict(bank.state_dict())
    assert len(other) == 0 and other.dim == 4


def test_add_detaches_from_autograd():
    bank = FeatureBank(4)
    f = torch.randn(2, 3, requires_grad=True)
    bank.add(f * 2.0)
    assert not bank.features.requires_grad
    assert torch.equal(bank.features, (f * 2.0).detach())


def test_oversized_add_keeps_newest_with_cond():
    bank = FeatureBank(3)
    f, c = rows(0, 10), rows(100, 10, dim=2)
    bank.add(f, c)
    assert torch.equal(bank.features, f[-3:]) and torch.equal(bank.cond, c[-3:])


def test_bad_input():
    for cap in [0, -1, 1.5, True, "3", None]:
        with pytest.raises(ValueError, match="capacity"):
            FeatureBank(cap)
    with pytest.raises(TypeError, match="dtype"):
        FeatureBank(3, dtype=torch.int32)
    bank = FeatureBank(4)
    with pytest.raises(ValueError, match="2-D"):
        bank.add(torch.ones(2, 3, 3))
    with pytest.raises(ValueError, match="2-D"):
        bank.add(torch.ones(3))
    with pytest.raises(ValueError, match="empty"):
        bank.add(torch.ones(0, 3))
    with pytest.raises(ValueError, match="f contains NaN or Inf"):
        bank.add(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(TypeError, match="complex"):
        bank.add(torch.ones(2, 3, dtype=torch.complex64))
    bank.add(torch.ones(2, 3))
    with pytest.raises(ValueError, match="width 4 but this FeatureBank holds features of width 3"):
        bank.add(torch.ones(2, 4))
    with pytest.raises(ValueError, match="cond given"):
        bank.add(torch.ones(2, 3), torch.ones(2, 2))
    assert len(bank) == 2  # failed adds change nothing
    pbank = FeatureBank(4)
    pbank.add(torch.ones(2, 3), torch.ones(2, 2))
    with pytest.raises(ValueError, match="cond missing"):
        pbank.add(torch.ones(2, 3))
    with pytest.raises(ValueError, match="cond has width"):
        pbank.add(torch.ones(2, 3), torch.ones(2, 5))
    with pytest.raises(ValueError, match="cond must be 2-D"):
        pbank.add(torch.ones(2, 3), torch.ones(3, 2))
    with pytest.raises(ValueError, match="cond contains NaN or Inf"):
        pbank.add(torch.ones(1, 3), torch.tensor([[float("inf"), 0.0]]))
    with pytest.raises(ValueError, match="state"):
        pbank.load_state_dict({"capacity": 4})
    # guidance against a bank with prompts requires cond, and the reverse
    with pytest.raises(ValueError, match="cond is None"):
        guidance_grad(torch.ones(1, 3), pbank, sigma=1.0)
    with pytest.raises(ValueError, match="bank has no prompt"):
        guidance_grad(torch.ones(1, 3), bank, cond=torch.ones(1, 2), sigma=1.0, sigma_cond=1.0)

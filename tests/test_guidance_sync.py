"""guidance_grad's host syncs and host-to-device copies, and the capturable check_finite=False path.

On CUDA every `bool(t)`, `t.item()`, `t.tolist()` waits for the GPU, and `torch.tensor(...)`
with a device copies from the host; CUDA-graph capture refuses both. Here on a CPU the same
calls are counted when they come from rkekernels' own code (the Triton kernel runs in the
interpreter, whose own host copies are not counted): the default call makes at most one sync
and no `torch.tensor`, check_finite=False none at all. The capture itself is tested on CUDA.
"""

import math
import sys

import pytest
import torch

from rkekernels import FeatureBank, guidance_grad
from rkekernels import reference as ref
from rkekernels._input import triton_available

RTOL = 1e-5


def _interpreted() -> bool:
    if not triton_available():
        return False
    from rkekernels.ops import scores_triton

    return scores_triton.interpreted()


#: these tests pass CPU tensors to backend="triton": the interpreter only (on a GPU machine the
#: cuda-marked test below covers the kernel)
INTERP = pytest.mark.skipif(not _interpreted(), reason="CPU tensors need TRITON_INTERPRET=1")
SYNCS = ("__bool__", "item", "tolist", "__float__", "__int__", "numpy", "cpu")


def _ours() -> bool:
    frame = sys._getframe(2)
    return "/rkekernels/" in frame.f_code.co_filename.replace("\\", "/")


@pytest.fixture
def host_calls(monkeypatch):
    """Count syncs and torch.tensor calls made by rkekernels' own frames."""
    seen: list[str] = []
    for name in SYNCS:
        real = getattr(torch.Tensor, name)

        def wrapped(self, *a, _real=real, _name=name, **k):
            if _ours():
                f = sys._getframe(1)
                seen.append(f"{_name} at {f.f_code.co_filename.rsplit('/', 1)[-1]}:{f.f_lineno}")
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    real_tensor = torch.tensor

    def tensor(*a, **k):
        if _ours():
            f = sys._getframe(1)
            seen.append(f"torch.tensor at {f.f_code.co_filename.rsplit('/', 1)[-1]}:{f.f_lineno}")
        return real_tensor(*a, **k)

    monkeypatch.setattr(torch, "tensor", tensor)
    return seen


def _case(b=4, n=40, dim=24, prompts=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, dim, generator=g)
    bank = FeatureBank(64)
    f = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1)
    kw = {"sigma": 0.8}
    if prompts:
        c = torch.randn(n, 3, generator=g)
        bank.add(f, c)
        kw.update(cond=torch.randn(b, 3, generator=g), sigma_cond=1.1)
    else:
        bank.add(f)
    return z, bank, f, kw


backends = pytest.mark.parametrize(
    "backend",
    [
        "torch",
        pytest.param("triton", marks=INTERP),
    ],
)


@INTERP
@pytest.mark.parametrize("prompts", [False, True])
def test_triton_call_has_one_sync_and_no_host_copies(host_calls, prompts):
    z, bank, _, kw = _case(prompts=prompts)
    host_calls.clear()  # count the call only (FeatureBank.add checks its input)
    guidance_grad(z, bank, backend="triton", **kw)
    assert not [c for c in host_calls if c.startswith("torch.tensor")], host_calls
    assert len(host_calls) <= 1, host_calls


@INTERP
def test_triton_unchecked_call_has_no_sync(host_calls):
    z, bank, _, kw = _case()
    host_calls.clear()
    res = guidance_grad(z, bank, backend="triton", check_finite=False, **kw)
    assert host_calls == []
    want = guidance_grad(z, bank, backend="triton", **kw)
    assert torch.allclose(res.grad, want.grad, rtol=RTOL, atol=0)
    assert torch.allclose(res.log_s, want.log_s, rtol=RTOL, atol=0)


@backends
@pytest.mark.parametrize("where", ["z", "bank", "cond", "bank_cond"])
def test_unchecked_non_finite_input_gives_nan(backend, where):
    g = torch.Generator().manual_seed(3)
    z, bank, cond, bank_cond = (
        torch.randn(3, 16, generator=g),
        torch.randn(30, 16, generator=g),
        torch.randn(3, 2, generator=g),
        torch.randn(30, 2, generator=g),
    )
    {"z": z, "bank": bank, "cond": cond, "bank_cond": bank_cond}[where][1, 1] = math.inf
    kw = {"cond": cond, "bank_cond": bank_cond, "sigma": 1.0, "sigma_cond": 1.0}
    with pytest.raises(ValueError, match=where):
        guidance_grad(z, bank, backend=backend, **kw)
    res = guidance_grad(z, bank, backend=backend, check_finite=False, **kw)
    assert bool(torch.isnan(res.log_s).all()) and bool(torch.isnan(res.grad).all())


@backends
def test_unchecked_finite_input_equals_the_checked_call(backend):
    z, bank, f, kw = _case(b=5, prompts=True, seed=4)
    res = guidance_grad(z, bank, backend=backend, check_finite=False, **kw)
    kw_ref = dict(kw, bank_cond=bank.cond)
    g_ref, ls_ref = ref.guidance_grad(z, f, **kw_ref)
    assert float((res.grad.double() - g_ref).norm() / g_ref.norm()) <= RTOL
    assert float((res.log_s.double() - ls_ref).abs().max() / ls_ref.abs().max()) <= RTOL


@pytest.mark.cuda
def test_cuda_graph_capture_and_replay():
    z, bank, f, kw = _case(b=4, n=3000, dim=768, prompts=True, seed=5)
    dev = torch.device("cuda")
    gbank = FeatureBank(4096, device=dev)
    gbank.add(f.to(dev), bank.cond.to(dev))
    zs = z.to(dev).clone()
    kw = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in kw.items()}
    want = guidance_grad(zs, gbank, **kw)  # warm-up: compiles the kernel
    torch.cuda.synchronize()
    with torch.cuda.device(dev):
        torch.cuda.set_sync_debug_mode("error")  # any sync in the call raises
        try:
            guidance_grad(zs, gbank, check_finite=False, **kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        guidance_grad(zs, gbank, check_finite=False, **kw)  # warm up on the side stream
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        out = guidance_grad(zs, gbank, **kw)  # check_finite=None: off under capture
    zs.copy_(z.to(dev) * 1.5)  # new latents, same buffers
    graph.replay()
    torch.cuda.synchronize()
    again = guidance_grad(zs, gbank, **kw)
    assert torch.allclose(out.grad, again.grad, rtol=1e-5, atol=0)
    assert torch.allclose(out.log_s, again.log_s, rtol=1e-5, atol=0)
    assert not torch.allclose(out.log_s, want.log_s)
    zs[0, 0] = math.nan  # non-finite input under replay: NaN, not an error
    graph.replay()
    torch.cuda.synchronize()
    assert bool(torch.isnan(out.log_s).all())

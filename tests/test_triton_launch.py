"""Launch-level properties of the Triton kernels that the interpreter can check on a CPU.

- int64 offsets in the guidance kernel: a bank of n rows of width D addresses n D elements,
  past 2^31 for large banks (131,072 rows at D = 16,384); int32 products would wrap on a GPU.
  The interpreter's pointer arithmetic is recorded and every block offset must be int64.
- Every launch runs under ``torch.cuda.device`` of its tensors (`rkekernels.ops.launch`):
  tensors on cuda:1 must not launch on the current device 0. Checked by replacing the context
  with a recorder and every kernel with a proxy that asserts it is launched inside it.
"""

import contextlib

import pytest
import torch

from rkekernels import cond_rke_score, guidance_grad, rke_score
from rkekernels._input import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton is not installed")


def _interpreter_builder():
    from rkekernels.ops import scores_triton

    if not scores_triton.interpreted():
        pytest.skip("records the interpreter's pointer arithmetic (TRITON_INTERPRET=1)")
    from triton.runtime import interpreter

    return interpreter.interpreter_builder


def test_guidance_kernel_offsets_are_int64(monkeypatch):
    import triton.language as tl

    builder = _interpreter_builder()
    seen = []
    original = builder.create_addptr

    def record(ptr, offset):
        if offset.data.size > 1:  # block offsets (not the scalar `scal_ptr + 1`)
            seen.append(offset.dtype)
        return original(ptr, offset)

    monkeypatch.setattr(builder, "create_addptr", record)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 20, generator=g)
    bank = torch.randn(40, 20, generator=g)
    kw = {"cond": torch.randn(3, 4, generator=g), "bank_cond": torch.randn(40, 4, generator=g)}
    guidance_grad(z, bank, sigma=0.9, sigma_cond=1.0, backend="triton", **kw)
    assert seen, "no pointer arithmetic recorded"
    assert {str(d) for d in seen} == {str(tl.int64)}, sorted({str(d) for d in seen})


@pytest.fixture
def launch_recorder(monkeypatch):
    """Replace the device context by a recorder and wrap every kernel in a checking proxy."""
    from rkekernels.ops import guidance_triton, launch, scores_triton

    active: list[torch.device] = []
    launches: list[str] = []

    @contextlib.contextmanager
    def recorder(t):
        active.append(t.device)
        try:
            yield
        finally:
            active.pop()

    class Proxy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            run = self.kernel[grid]

            def launch_(*args, **kwargs):
                devices = {a.device for a in args if isinstance(a, torch.Tensor)}
                assert active, f"{self.name} launched outside on_device"
                assert devices == {active[-1]}, (devices, active[-1])
                launches.append(self.name)
                return run(*args, **kwargs)

            return launch_

    monkeypatch.setattr(launch, "on_device", recorder)
    mode = scores_triton.interpreted()  # read from the kernel's type, before it is wrapped
    monkeypatch.setattr(scores_triton, "interpreted", lambda: mode)
    for mod, name in (
        (scores_triton, "_fwd_kernel"),
        (scores_triton, "_bwd_kernel"),
        (guidance_triton, "_guidance_state_kernel"),
    ):
        monkeypatch.setattr(mod, name, Proxy(name, getattr(mod, name)))
    return launches


def _interpreted() -> bool:
    from rkekernels.ops import scores_triton

    return scores_triton.interpreted()


@pytest.mark.skipif(
    torch.cuda.is_available() and not _interpreted(), reason="CPU tensors: the interpreter only"
)
def test_every_launch_is_inside_the_device_context(launch_recorder):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 5, generator=g, requires_grad=True)
    t = torch.randn(30, 3, generator=g)
    (gx,) = torch.autograd.grad(rke_score(x, 1.5, backend="triton"), x)
    cond_rke_score(x.detach(), t, 1.5, 1.0, backend="triton")
    guidance_grad(torch.randn(2, 5, generator=g), x.detach(), sigma=1.0, backend="triton")
    assert set(launch_recorder) == {"_fwd_kernel", "_bwd_kernel", "_guidance_state_kernel"}
    assert torch.isfinite(gx).all()


def test_on_device_is_a_no_op_for_cpu_tensors():
    from rkekernels.ops.launch import on_device

    before = torch.cuda.current_device() if torch.cuda.is_available() else None
    with on_device(torch.zeros(1)):
        now = torch.cuda.current_device() if torch.cuda.is_available() else None
    assert now == before


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensors_on_the_second_gpu_launch_there():
    x = torch.randn(300, 7, device="cuda:1")
    with torch.cuda.device(0):
        got = rke_score(x, 2.0, backend="triton")
    assert got.device == x.device
    from rkekernels import reference as ref

    assert abs(float(got) / float(ref.rke_score(x, 2.0)) - 1) <= 1e-5

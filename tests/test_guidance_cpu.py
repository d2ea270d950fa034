"""The fused CPU guidance kernel (`rkekernels.ops.guidance_cpu`, numba) against the float64 state.

Each case computes the softmax state (m, l, acc) of `guidance_torch.softmax_state` with the fused
kernel and compares the normalised results, log-sum-exp m + log l and the weighted mean acc / l,
with the same state computed in float64 by the chunked-GEMM path (itself tested against the
reference in test_guidance.py). Float64 inputs: 1e-12; float32: 1e-5 (as test_guidance.py).

The sizes put b around the kernel's blocks of 4 samples (1, 3, 4, 5, 9) and n around its blocks of
rows (pairs for the logits, quads for the values, BLOCK_ROWS per block), with both logits
variants (one row or two rows per pass) and the split over threads.
"""

import math
import signal
import sys
import time

import numpy as np
import pytest
import torch

import rkekernels as rk
from rkekernels import reference as ref
from rkekernels.ops import guidance_cpu, guidance_torch
from rkekernels.ops.guidance_common import BankSide, merge_states


@pytest.fixture(autouse=True)
def _fused(monkeypatch):
    assert guidance_cpu.available(), "the test extra installs numba"
    monkeypatch.setattr(guidance_cpu, "ENABLED", True)


def case(b, n, dim, *, prompts, dtype, seed, m_dim=6):
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(b, dim, generator=g, dtype=torch.float64)
    phi = phi / phi.norm(dim=1, keepdim=True)
    bank = torch.randn(n, dim, generator=g, dtype=torch.float64)
    bank = bank / bank.norm(dim=1, keepdim=True)
    y = c = None
    if prompts:
        y = torch.randn(b, m_dim, generator=g, dtype=torch.float64)
        c = torch.randn(n, m_dim, generator=g, dtype=torch.float64)
    return phi.to(dtype), bank.to(dtype), y, c


def state(phi, bank, y, c, *, sigma, shift, cached_norms, fused, inv_c2=0.4):
    inv_s2 = 1.0 / sigma**2
    cdt = phi.dtype
    yy = y.to(cdt) if y is not None else None
    cc = c.to(bank.dtype) if c is not None else None
    bank_sq = (bank.double() ** 2).sum(1) if cached_norms else None
    cond_sq = (c.double() ** 2).sum(1) if (cached_norms and c is not None) else None
    sh = None
    if shift:
        sh = (phi * phi).sum(1) * inv_s2
        if yy is not None:
            sh = sh + (yy * yy).sum(1) * inv_c2
    impl = guidance_cpu if fused else guidance_torch  # the kernel, or the chunked GEMMs
    side = BankSide(bank, bank_sq, cc, cond_sq, inv_s2, inv_c2 if y is not None else 0.0)
    return impl.softmax_state(phi, yy, side, shift=sh)


def assert_same(got, want, rtol):
    m, l, acc = got
    mw, lw, accw = (t.double() for t in want)
    lse, lse_w = m.double() + l.double().log(), mw + lw.log()
    assert float((lse - lse_w).abs().max()) <= rtol * max(1.0, float(lse_w.abs().max()))
    mean, mean_w = acc.double() / l.double()[:, None], accw / lw[:, None]
    assert float((mean - mean_w).norm() / mean_w.norm()) <= rtol


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 8, 9, 17])
@pytest.mark.parametrize("b", [1, 3, 4, 5, 9])
@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("pair", [True, False])
def test_blocks_match_float64(monkeypatch, n, b, shift, pair):
    monkeypatch.setattr(guidance_cpu, "BLOCK_ROWS", 8)
    monkeypatch.setattr(guidance_cpu, "PAIR_MIN_DIM", 1 if pair else 10**9)
    phi, bank, y, c = case(b, n, 37, prompts=n % 2 == 1, dtype=torch.float32, seed=n + 100 * b)
    kw = {"sigma": 0.8, "shift": shift, "cached_norms": n % 3 != 0}
    want = state(phi.double(), bank.double(), y, c, fused=False, **kw)
    got = state(phi, bank, y, c, fused=True, **kw)
    assert got[0].dtype == torch.float32  # m in the compute dtype, l and acc in float64
    assert got[1].dtype == got[2].dtype == torch.float64
    assert_same(got, want, 1e-5)
    got64 = state(phi.double(), bank.double(), y, c, fused=True, **kw)
    assert_same(got64, want, 1e-12)


@pytest.mark.parametrize("dim", [768, 4096])
def test_default_blocks_and_wide_rows(dim):
    # default block size (BLOCK_BYTES) with several blocks, at a width of each logits variant
    rows = guidance_cpu.block_rows(dim, 4)
    phi, bank, y, c = case(4, 2 * rows + 3, dim, prompts=True, dtype=torch.float32, seed=dim)
    for shift in (True, False):
        kw = {"sigma": 1.0, "shift": shift, "cached_norms": True}
        want = state(phi.double(), bank.double(), y, c, fused=False, **kw)
        assert_same(state(phi, bank, y, c, fused=True, **kw), want, 1e-5)


@pytest.mark.parametrize("shift", [True, False])
def test_running_max_rescales_as_the_max_grows(monkeypatch, shift):
    # rows sorted by increasing similarity: the running max grows in every block, and the
    # states before the growth must be rescaled (a missed rescale is off by exp(gap))
    monkeypatch.setattr(guidance_cpu, "BLOCK_ROWS", 4)
    phi, bank, _, _ = case(3, 40, 16, prompts=False, dtype=torch.float64, seed=1)
    order = (bank @ phi[0]).argsort()
    bank = bank[order].contiguous()
    kw = {"sigma": 0.05, "shift": shift, "cached_norms": False}
    want = state(phi, bank, None, None, fused=False, **kw)
    assert_same(state(phi, bank, None, None, fused=True, **kw), want, 1e-12)


@pytest.fixture
def split_small(monkeypatch):
    """Banks of any size split over threads (2 MiB chunks and 16 MiB per thread set to 1 byte);
    torch's thread count is put back afterwards."""
    monkeypatch.setattr(guidance_cpu, "MIN_ROWS_PER_THREAD_BYTES", 1)
    monkeypatch.setattr(guidance_cpu, "CHUNK_BYTES", 1)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("prompts", [False, True])
def test_split_over_threads_matches_one_thread(monkeypatch, split_small, shift, prompts):
    # with 2 torch threads and a low threshold the bank is cut into chunks (2 threads x
    # CHUNKS_PER_THREAD = 16, for 203 rows) whose states merge
    phi, bank, y, c = case(5, 203, 24, prompts=prompts, dtype=torch.float64, seed=3)
    kw = {"sigma": 0.3, "shift": shift, "cached_norms": True}
    calls = []
    real = guidance_cpu.merge_states
    monkeypatch.setattr(
        guidance_cpu, "merge_states", lambda m, *a: calls.append(len(m)) or real(m, *a)
    )
    torch.set_num_threads(2)
    split = state(phi, bank, y, c, fused=True, **kw)
    torch.set_num_threads(1)
    one = state(phi, bank, y, c, fused=True, **kw)
    assert calls == [2 * guidance_cpu.CHUNKS_PER_THREAD]
    assert_same(split, one, 1e-12)


def test_split_result_does_not_depend_on_which_thread_took_a_chunk(monkeypatch, split_small):
    # the chunks' states merge in chunk order: the caller taking every chunk itself (a pool
    # whose tasks only start once it is done) gives bitwise the result of the threads sharing
    from concurrent.futures import Future

    phi, bank, y, c = case(4, 301, 16, prompts=True, dtype=torch.float32, seed=5)
    kw = {"sigma": 0.4, "shift": False, "cached_norms": True}

    class Late:
        """submit() defers the task to result(): the calling thread takes every chunk first."""

        def submit(self, fn):
            fut = Future()
            fut.result = lambda: fn()  # the chunks are all taken by then: fn returns at once
            return fut

    torch.set_num_threads(2)
    shared = state(phi, bank, y, c, fused=True, **kw)
    monkeypatch.setattr(guidance_cpu, "_executor", Late)
    alone = state(phi, bank, y, c, fused=True, **kw)
    for a, b in zip(shared, alone):
        assert torch.equal(a, b)


def test_merge_ignores_parts_that_saw_nothing():
    # a part whose every logit was -inf (m = -inf, l = 0) must not turn the merge into NaN
    inf = math.inf
    m = torch.tensor([[1.0, -inf], [-inf, -inf]])
    l = torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    acc = torch.tensor([[[2.0], [0.0]], [[0.0], [0.0]]], dtype=torch.float64)
    m, l, acc = merge_states(m, l, acc, running=True)
    assert m.tolist() == [1.0, -inf] and l.tolist() == [2.0, 0.0] and acc.tolist() == [[2.0], [0.0]]


@pytest.mark.parametrize("b", [2, 4, 5, 9])
@pytest.mark.parametrize("prompts", [False, True])
@pytest.mark.parametrize("split", [False, True])
def test_guidance_grad_through_the_kernels(monkeypatch, b, prompts, split):
    # guidance_grad's compiled path end to end (prep, the batch pass with each sample excluded
    # from its own sum, the bank pass, the gradient) against the float64 reference, with b
    # around the blocks of 4 samples, and with the bank split over 2 threads
    monkeypatch.setattr(guidance_cpu, "BLOCK_ROWS", 8)
    if split:
        monkeypatch.setattr(guidance_cpu, "MIN_ROWS_PER_THREAD_BYTES", 1)
        monkeypatch.setattr(guidance_cpu, "CHUNK_BYTES", 1)
    g = torch.Generator().manual_seed(b)
    z = torch.randn(b, 3, 5, 5, generator=g)
    f = torch.randn(37, 75, generator=g)
    f = f / f.norm(dim=1, keepdim=True)
    kw = {"sigma": 0.6}
    if prompts:
        kw.update(cond=torch.randn(b, 4, generator=g), sigma_cond=1.2)
        kw["bank_cond"] = torch.randn(37, 4, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2 if split else 1)
        res = rk.guidance_grad(z, f, **kw)
    finally:
        torch.set_num_threads(threads)
    g_ref, ls_ref = ref.guidance_grad(z, f, **kw)
    assert float((res.grad.double() - g_ref).norm() / g_ref.norm()) <= 1e-5
    assert float((res.log_s.double() - ls_ref).abs().max() / ls_ref.abs().max()) <= 1e-5


KINDS = ["bfloat16", "bfloat16_strided", "float16", "float32_for_float64", "strided"]


@pytest.mark.parametrize("kind", KINDS)
def test_half_and_converted_banks(monkeypatch, kind):
    # contiguous bfloat16 rows are decoded in the kernel, a block at a time; other banks the
    # kernel cannot read in place are converted a chunk at a time (2 rows here)
    monkeypatch.setattr(guidance_cpu, "CONVERT_ELEMENTS", 2 * 40)
    monkeypatch.setattr(guidance_cpu, "BLOCK_ROWS", 3)
    phi, bank, y, c = case(4, 13, 33, prompts=True, dtype=torch.float64, seed=5)
    if kind.startswith("bfloat16") or kind == "float16":
        half = torch.float16 if kind == "float16" else torch.bfloat16
        phi, bank = phi.float(), bank.to(half)
        if kind.endswith("strided"):
            bank = torch.cat([bank, bank], dim=1)[:, ::2]
    elif kind == "float32_for_float64":
        bank = bank.float()
    else:
        bank = torch.cat([bank, bank], dim=1)[:, ::2]  # not contiguous
        assert not bank.is_contiguous()
    c = c.to(bank.dtype).double()  # the kernel gets the prompts in the bank's dtype
    kw = {"sigma": 0.7, "shift": False, "cached_norms": False}
    want = state(phi.double(), bank.double(), y, c, fused=False, **kw)
    tol = 1e-5 if phi.dtype == torch.float32 else 1e-12
    assert_same(state(phi, bank, y, c, fused=True, **kw), want, tol)


@pytest.mark.parametrize("where", ["bank", "bank_cond"])
def test_nan_propagates_through_the_kernel(where):
    # the kernel keeps IEEE NaN semantics (no fastmath "nnan"): a NaN row reaches the result's
    # check, and guidance_grad names the input
    z = torch.randn(4, 32)
    bank, cond, bank_cond = torch.randn(20, 32), torch.randn(4, 3), torch.randn(20, 3)
    {"bank": bank, "bank_cond": bank_cond}[where][7, 1] = math.nan
    with pytest.raises(ValueError, match=where):
        rk.guidance_grad(z, bank, sigma=1.0, cond=cond, bank_cond=bank_cond, sigma_cond=1.0)


def test_without_numba_the_gemm_path_runs(monkeypatch):
    # numba missing: available() is False and guidance_grad runs the chunked GEMMs
    monkeypatch.setitem(sys.modules, "numba", None)
    monkeypatch.setattr(guidance_cpu, "_available", None)  # try the import again
    with pytest.warns(RuntimeWarning, match="numba could not be imported") as said:
        assert not guidance_cpu.available()
        assert not guidance_cpu.available()  # said once per process, not per call
    assert len(said) == 1
    called = []
    monkeypatch.setattr(guidance_cpu, "guide", lambda *a: called.append(1))
    z, bank = torch.randn(3, 16, dtype=torch.float64), torch.randn(11, 16, dtype=torch.float64)
    res = rk.guidance_grad(z, bank, sigma=1.0)
    assert not called
    g_ref, ls_ref = ref.guidance_grad(z, bank, sigma=1.0)
    assert torch.allclose(res.grad, g_ref, rtol=1e-10, atol=0)
    assert torch.allclose(res.log_s, ls_ref, rtol=1e-10, atol=0)


@pytest.mark.slow
def test_kernels_compile_without_a_disk_cache(monkeypatch):
    # where numba finds no writable cache location it raises at decoration: guidance_numba's
    # decorator then compiles without a cache (checked on a small kernel: recompiling the real
    # ones uncached costs tens of seconds, and they are the same code through the same _jit)
    import numba

    from rkekernels.ops import guidance_numba

    real = numba.njit
    calls = []

    def njit(*args, cache=False, **kw):
        calls.append(cache)
        if cache:
            raise RuntimeError("cannot cache function 'f': no locator available for file 'x'")
        return real(*args, **kw)

    def axpy(a, x, y):
        return a * x + y

    monkeypatch.setattr(numba, "njit", njit)
    fn = guidance_numba._jit(axpy)
    assert calls == [True, False]  # tried with the cache, then compiled without
    assert not fn._cache.__class__.__name__.endswith("FunctionCache")
    x = np.arange(5.0)
    assert np.array_equal(fn(2.0, x, x), 3 * x)
    # and with a cache location the kernels are cached (loaded from disk in later processes)
    assert guidance_numba.stream._cache.__class__.__name__.endswith("FunctionCache")


@pytest.mark.slow
def test_environment_variable_turns_the_kernel_off(monkeypatch):
    # RKEKERNELS_FUSED_CPU=0 selects the chunked-GEMM path for the whole process: the module reads
    # it when imported. Its top level runs again here, in a copy not put in sys.modules, under each
    # value (as a fresh interpreter would, without paying the ~2 s of one)
    import importlib.util

    for value, want in (("0", False), ("1", True)):
        monkeypatch.setenv("RKEKERNELS_FUSED_CPU", value)
        spec = importlib.util.find_spec("rkekernels.ops.guidance_cpu")
        fresh = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(fresh)
        assert fresh.ENABLED is want and fresh.enabled() is (want and fresh.available())
    assert sys.modules["rkekernels.ops.guidance_cpu"] is guidance_cpu


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork (POSIX)")
def test_split_works_in_a_forked_child(monkeypatch, split_small):
    # the thread pool of the parent has no threads in a forked child (a DataLoader worker, say):
    # the child must start its own pool instead of waiting on threads that do not exist
    import os

    phi, bank, _, _ = case(4, 64, 16, prompts=False, dtype=torch.float64, seed=4)
    kw = {"sigma": 0.5, "shift": False, "cached_norms": True}
    torch.set_num_threads(2)
    want = state(phi, bank, None, None, fused=True, **kw)  # creates the pool here
    assert guidance_cpu._pool is not None
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: same computation, report, exit without pytest's teardown
        try:
            got = state(phi, bank, None, None, fused=True, **kw)
            ok = all(torch.allclose(a, b, rtol=1e-12, atol=0) for a, b in zip(got, want))
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write)
    deadline = time.monotonic() + 60  # a child waiting on a dead pool would hang forever
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung in the split over threads")
    assert os.read(read, 1) == b"1" and done[1] == 0


@pytest.mark.parametrize("dim", [4, 64])
@pytest.mark.parametrize("fused", [True, False])
def test_float32_within_1e5_for_20000_alike_entries(monkeypatch, fused, dim):
    # SPEC section 5: float32 within 1e-5 up to n = 20,000. The hardest case for the sums: a
    # bank of 19,999 copies of one entry (a collapsed generator), all with the same weight.
    # Sums are float32 within a block (fused) or chunk (GEMM) and float64 across them; one
    # float32 sum over the bank measured 5.5e-5 here.
    monkeypatch.setattr(guidance_cpu, "ENABLED", fused)
    n = 20_000
    z = torch.zeros(1, dim)
    z[0, 0] = 1.0
    bank = torch.zeros(n, dim)
    bank[:, 1] = 1.0
    bank[0] = z[0]
    res = rk.guidance_grad(z, bank, sigma=1.0)
    g_ref, ls_ref = ref.guidance_grad(z, bank, sigma=1.0)
    assert float((res.grad.double() - g_ref).norm() / g_ref.norm()) <= 1e-5
    assert abs(float(res.log_s[0]) - float(ls_ref[0])) <= 1e-5 * abs(float(ls_ref[0]))


def test_kernels_never_read_the_row_padding(monkeypatch):
    # the small (b, D) arrays get padded rows (cache sets, see guidance_cpu._padded): fill the
    # padding with NaN, which would reach the result if any kernel read it
    real = guidance_cpu._padded

    def nan_padded(a):
        out = real(a)
        out[:, a.shape[1] :] = math.nan
        return out

    monkeypatch.setattr(guidance_cpu, "_padded", nan_padded)
    monkeypatch.setattr(guidance_cpu, "BLOCK_ROWS", 3)
    g = torch.Generator().manual_seed(6)
    z, f = torch.randn(5, 20, generator=g), torch.randn(17, 20, generator=g)
    kw = {"sigma": 2.0, "cond": torch.randn(5, 3, generator=g), "sigma_cond": 1.5}
    kw["bank_cond"] = torch.randn(17, 3, generator=g)
    res = rk.guidance_grad(z, f, **kw)
    g_ref, ls_ref = ref.guidance_grad(z, f, **kw)
    assert float((res.grad.double() - g_ref).norm() / g_ref.norm()) <= 1e-5
    assert torch.allclose(res.log_s.double(), ls_ref, rtol=1e-5, atol=0)

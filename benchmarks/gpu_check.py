"""GPU check of the fused Triton kernels: correctness on CUDA, then the benchmarks, in two commands.

Needs only torch, Triton and numpy (and the repository: run from its root, or anywhere: it puts
the root on sys.path). Written for an H100/H200 with torch 2.11 and Triton 3.6; Triton >= 3.2.

    python -m benchmarks.gpu_check                # 1st command, "quick": at most 3 minutes
    python -m benchmarks.gpu_check extended       # 2nd command: the large and optional sections
    python -m benchmarks.gpu_check --small        # tiny sizes: a smoke test (also `extended`)
    TRITON_INTERPRET=1 python -m benchmarks.gpu_check --small   # the same on a CPU-only machine

The first command (sections check, guidance, matmul, backward) covers the correctness of every
kernel, precision mode and dtype, the guidance kernel, the main benchmark (n = 65,536, d = 768
vs ``x @ x.T``) and backward vs forward; on an H200 it is sized to finish in 3 minutes including
compilation. It counts the compiled variants its launches need (distinct Triton specialisation
keys, `benchmarks.compile_count`) and prints the count: integer counts (n, b, shard) are not
specialised, and the check sizes are the few that cover every specialisation (feature widths
that are and are not multiples of 16, one and several tiles), so the check compiles what the
benchmarks use and little more. The second command runs stream, large (n = 1,000,000),
evaluate (``rkekernels.evaluation.evaluate`` at that n), modes (precision modes' speed) and,
with ``--pykeops``, KeOps. Each command writes its rows as they come to
``<out>/gpu_check_<command>.csv`` and ``.md`` (``--out``, default $OUT), so a timeout keeps
what was done.

Sections (``--sections``, comma separated, in this order, overrides the command's list):

- ``check``: `forward_sums` and `backward_grads` against ``rkekernels.reference`` (dense float64, on
  the same device) for n = 1, 37, 130, 257, 1000 and d = 3, 20 (not multiples of 16), 64, 768
  (multiples; ``--small``: n = 1, 37, 70 and d = 3, 20, 32, the same width classes and
  tilings), float32 in every precision mode and float64 in "ieee"; pair sums within 1e-5
  (float32) / 1e-10 (float64) or the mode's `error_bound`, gradient rows within the same
  factor times sum_j |W|_ij (||x_i|| + ||x_j||).
  Also: backend="auto" picks Triton for CUDA tensors and agrees with the reference.
- ``guidance`` (issue 4): `guidance_grad` with backend="triton" against
  ``rkekernels.reference.guidance_grad`` on CUDA (float32 within 1e-5: b = 4 and 17, prompts,
  normalize, a bfloat16 bank), then b = 4, n = 10,000, D = 16,384 and 768 (float32 FeatureBank)
  vs one ``bank @ z.T`` with TF32 off (target: ratio <= 1.5 for the default call at D = 16,384
  and, at D = 768 where the fixed cost dominates, for the replay of a captured CUDA graph of the
  ``check_finite=False`` call), next to backend="torch" on CUDA.
- ``matmul``: fused ``rke_score`` (exact float32, the default) vs torch ``x @ x.T`` with TF32 off at
  n = 65,536, d = 768 (target: ratio <= 0.6), plus the score's error vs the torch float64 path.
- ``stream``: the same fused score vs the torch streaming backend (backend="torch", TF32 off).
- ``large``: n = 1,000,000, d = 768 completes; time, result, extra memory as a multiple of the
  input's n d 4 bytes (O(n d)), and the time relative to the n^2 extrapolation from ``matmul``.
- ``evaluate``: ``rkekernels.evaluation.evaluate`` on an (n_large, d) embedding file (n =
  1,000,000, d = 768, 50 clusters) on the device: every JSON output against one fused exact
  ``rke_score`` at the same sigma (the budget is 2.5x), the paths chosen (``methods``), peak memory
  and RKE's error; then a folder of PNGs through the pixels encoder on the device, end to end.
- ``backward``: `backward_grads` vs `forward_sums` at n = 32,768 (expected ~4: the backward visits
  the full square with two dots per tile, the forward the triangle with one), and autograd
  through ``rke_score`` vs the forward alone.
- ``modes``: "tf32" vs ``x @ x.T`` with TF32 on, "bf16" vs a bfloat16 ``x @ x.T``, "tf32x3" vs
  float32 ``x @ x.T``; each with its error vs the float64 path and its stated bound.
- ``pykeops`` (only with ``--pykeops``): a KeOps LazyTensor sum of the same kernel, if it compiles.
- ``compile`` (only with ``--compile-only``, no GPU needed, TRITON_INTERPRET unset): compiles every
  kernel variant for sm_90 with the installed Triton and reports registers and spill bytes.

Timings on CUDA use ``triton.testing.do_bench`` (quantiles 0.5, 0.2, 0.8, milliseconds); on a CPU
(``--small`` under the interpreter) the same quantiles of 5 runs. Every row is written as soon as
it exists, to ``<out>/gpu_check.csv`` and ``<out>/gpu_check.md`` (rows carry the GPU, versions and
date), so a run cut short still leaves its results. ``--budget-s`` skips the sections that would
start after that many seconds.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import Report, bench, fmt  # noqa: E402

SECTIONS = (
    "compile",
    "check",
    "guidance",
    "matmul",
    "backward",
    "stream",
    "large",
    "evaluate",
    "modes",
    "pykeops",
)
#: the two commands: the first is the one to run in the first GPU minutes
COMMANDS = {
    "quick": ("check", "guidance", "matmul", "backward"),
    "extended": ("stream", "large", "evaluate", "modes"),
}
#: seconds after which no further section starts, per command
BUDGET_S = {"quick": 150.0, "extended": 480.0}
COLUMNS = [
    "section",
    "case",
    "precision",
    "n",
    "d",
    "ms_p50",
    "ms_p20",
    "ms_p80",
    "baseline",
    "baseline_ms_p50",
    "ratio",
    "target",
    "error",
    "bound",
    "status",
    "detail",
]
TARGET_MATMUL = 0.6
TARGET_GUIDANCE = 1.5
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


# --------------------------------------------------------------------------- plumbing


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def rel(a, b) -> float:
    return abs(float(a) / float(b) - 1.0)


def _bench(fn, cuda: bool) -> tuple[float, float, float]:
    """`benchmarks.common.bench`; in the interpreter (a smoke test: its times mean nothing, and
    nothing compiles) one run and no warm-up instead of five after one."""
    if os.environ.get("TRITON_INTERPRET") == "1" and not cuda:
        return bench(fn, cuda, repeat=1, warmup=0)
    return bench(fn, cuda)


# --------------------------------------------------------------------------- check


def _grad_scale(x, t, sigmas, sigma_t, g_fx, g_ft, g_fxt):
    """sum_j |W|_ij (||x_i|| + ||x_j||) per row, for x and t: `reference.grad_term_scale`."""
    from rkekernels import reference

    return reference.grad_term_scale(x, t, sigmas, sigma_t, g_fx, g_ft, g_fxt)


def _max_r2(v) -> float:
    vc = v.double() - v.double().mean(0)
    return float((vc * vc).sum(1).max())


def section_check(rep: Report, dev: torch.device, small: bool) -> None:
    import rkekernels
    from rkekernels import reference as ref
    from rkekernels._input import check_backend
    from rkekernels.ops import scores_triton as st

    # widths not multiples of 16 (masks) and multiples (the benchmarks' specialisation); one tile
    # and several; n = 1. Every size of a width class reuses that class's compiled kernels.
    sizes = [(1, 3, 2), (37, 20, 5)]
    sizes += [(70, 32, 16)] if small else [(130, 64, 16), (257, 64, 16), (1000, 768, 16)]
    gen = torch.Generator().manual_seed(0)
    for n, d, m in sizes:
        for dtype, modes in ((torch.float32, st.PRECISIONS), (torch.float64, ("ieee",))):
            x = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dev, dtype)
            t = torch.randn(n, m, generator=gen, dtype=torch.float64).to(dev, dtype)
            med = rkekernels.median_bandwidth(x) if n > 1 else 1.0
            sigmas = [0.7 * med, 1.9 * med]
            sigma_t = rkekernels.median_bandwidth(t) if n > 1 else 1.0
            inv = [1.0 / s**2 for s in sigmas]
            ref_sums = [ref.pair_sums(x, t, s, sigma_t) for s in sigmas]
            g = torch.randn(5, generator=gen, dtype=torch.float64)
            g_fx, g_ft, g_fxt = g[:2], g[2], g[3:]
            xr = x.detach().double().requires_grad_(True)
            tr = t.detach().double().requires_grad_(True)
            loss = g_ft.to(dev) * ref.pair_sums(xr, tr, sigmas[0], sigma_t)[1]
            for k, s in enumerate(sigmas):
                fx_r, _, fxt_r = ref.pair_sums(xr, tr, s, sigma_t)
                loss = loss + g_fx[k].to(dev) * fx_r + g_fxt[k].to(dev) * fxt_r
            rgx, rgt = torch.autograd.grad(loss, (xr, tr))
            sx, stt = _grad_scale(x, t, sigmas, sigma_t, g_fx, g_ft, g_fxt)
            s_t = _max_r2(t) / sigma_t**2
            xc, tc = x - x.mean(0), t - t.mean(0)
            for mode in modes:
                case = f"pair sums + VJP, {str(dtype)[6:]}, m={m}, 2 sigmas"
                try:
                    fx, ft, fxt = st.forward_sums(xc, tc, inv, 1 / sigma_t**2, precision=mode)
                    ratio_f = [rel(ft, ref_sums[0][1])]
                    bounds = [st.error_bound(mode, s_t)]
                    for k, s in enumerate(sigmas):
                        s_x = _max_r2(x) / s**2
                        ratio_f += [rel(fx[k], ref_sums[k][0]), rel(fxt[k], ref_sums[k][2])]
                        bounds += [st.error_bound(mode, s_x), st.error_bound(mode, s_x + s_t)]
                    if mode == "ieee":
                        bounds = [TOL[dtype]] * len(bounds)
                    ok_f = all(e <= b for e, b in zip(ratio_f, bounds))
                    dg = [v.to(dev) for v in (g_fx, g_ft, g_fxt)]
                    gx, gt = st.backward_grads(xc, tc, inv, 1 / sigma_t**2, *dg, precision=mode)
                    s_joint = _max_r2(x) / min(sigmas) ** 2 + s_t
                    gb = TOL[dtype] if mode == "ieee" else st.error_bound(mode, s_joint, grad=True)
                    ex = float(((gx.double() - rgx).norm(dim=1) / sx.clamp_min(1e-300)).max())
                    et = float(((gt.double() - rgt).norm(dim=1) / stt.clamp_min(1e-300)).max())
                    ok_g = ex <= gb and et <= gb
                    rep.add(
                        section="check", case=case, precision=mode, n=n, d=d,
                        error=max(ratio_f), bound=min(bounds),
                        status="ok" if ok_f else "FAIL", detail="forward: max rel error of F",
                    )  # fmt: skip
                    rep.add(
                        section="check", case=case, precision=mode, n=n, d=d,
                        error=max(ex, et), bound=gb, status="ok" if ok_g else "FAIL",
                        detail="backward: max ||g - g_ref|| / sum_j |W|_ij (|x_i| + |x_j|)",
                    )  # fmt: skip
                except Exception as exc:
                    rep.add(section="check", case=case, precision=mode, n=n, d=d,
                            status="ERROR", detail=f"{type(exc).__name__}: {exc}")  # fmt: skip
                    traceback.print_exc()
    # the public path: backend="auto" on CUDA tensors is Triton, and it is right
    x = torch.randn(333, 17, generator=gen).to(dev)
    chosen = check_backend("auto", x.device)
    got = rkekernels.rke_score(x, 2.0)
    want = ref.rke_score(x, 2.0)
    e = rel(got, want)
    expect = "triton" if dev.type == "cuda" else "torch"
    rep.add(section="check", case="rke_score backend='auto'", precision="ieee", n=333, d=17,
            error=e, bound=1e-5, status="ok" if (e <= 1e-5 and chosen == expect) else "FAIL",
            detail=f"auto -> {chosen}")  # fmt: skip


# --------------------------------------------------------------------------- benchmarks


def section_guidance(rep: Report, dev: torch.device, cuda: bool, small: bool) -> None:
    import rkekernels as rk
    from rkekernels import reference as ref

    g = torch.Generator().manual_seed(7)
    cases = [(4, 1000, 768, False, torch.float32), (17, 2049, 50, True, torch.float32),
             (4, 1000, 768, True, torch.bfloat16)]  # fmt: skip
    if small:
        cases = [(4, 70, 24, False, torch.float32), (17, 130, 10, True, torch.bfloat16)]
    for b, n, dim, prompts, bank_dtype in cases:
        z = torch.randn(b, dim, generator=g, dtype=torch.float64)
        f = torch.randn(n, dim, generator=g, dtype=torch.float64)
        f = (f / f.norm(dim=1, keepdim=True)).to(bank_dtype).double()  # the stored values
        kw = {"sigma": 0.8}
        if prompts:
            kw.update(cond=torch.randn(b, 6, generator=g, dtype=torch.float64), sigma_cond=1.1)
            kw["bank_cond"] = torch.randn(n, 6, generator=g, dtype=torch.float64)
        g_ref, ls_ref = ref.guidance_grad(z, f, **kw)
        kw_dev = {k: v.to(dev, torch.float32) if torch.is_tensor(v) else v for k, v in kw.items()}
        res = rk.guidance_grad(z.to(dev, torch.float32), f.to(dev, bank_dtype), backend="triton",
                               **kw_dev)  # fmt: skip
        err = max(
            float((res.grad.cpu().double() - g_ref).norm() / g_ref.norm()),
            float((res.log_s.cpu().double() - ls_ref).abs().max() / ls_ref.abs().max()),
        )
        rep.add(section="guidance", case=f"guidance_grad vs reference, b={b}, prompts={prompts}, "
                f"{str(bank_dtype).split('.')[-1]} bank", precision="ieee", n=n, d=dim,
                error=err, bound=TOL[torch.float32],
                status="ok" if err <= TOL[torch.float32] else "FAIL")  # fmt: skip
    sizes = [(300, 24)] if small else [(10_000, 16384), (10_000, 768)]
    for n, dim in sizes:
        f = torch.randn(n, dim, generator=g)
        f = (f / f.norm(dim=1, keepdim=True)).to(dev)
        z = torch.randn(4, dim, generator=g).to(dev)
        bank = rk.FeatureBank(n, device=dev)
        bank.add(f)
        torch.backends.cuda.matmul.allow_tf32 = False
        base = _bench(lambda f=f, z=z: f @ z.T, cuda)
        ours = _bench(lambda z=z, bank=bank: rk.guidance_grad(z, bank, sigma=1.1, backend="triton"),
                     cuda)  # fmt: skip
        tpath = _bench(lambda z=z, bank=bank: rk.guidance_grad(z, bank, sigma=1.1, backend="torch"),
                      cuda)  # fmt: skip
        timed = [("guidance_grad, Triton", ours), ("guidance_grad, torch path", tpath)]
        if cuda and dim <= 4096:  # the fixed cost dominates narrow rows: replay a CUDA graph
            timed.append(("guidance_grad, Triton, CUDA graph replay (check_finite=False)",
                          _graph_replay(rk, z, bank)))  # fmt: skip
        for case, t in timed:
            ratio = t[0] / base[0]
            target = TARGET_GUIDANCE if "Triton" in case else ""
            status = "ok" if not target or ratio <= target else "MISSED"
            rep.add(section="guidance", case=f"{case}, b=4 (FeatureBank, float32)",
                    precision="ieee", n=n, d=dim, ms_p50=t[0], ms_p20=t[1], ms_p80=t[2],
                    baseline="bank @ z.T (TF32 off)", baseline_ms_p50=base[0], ratio=ratio,
                    target=target, status=status)  # fmt: skip


def _graph_replay(rk, z: torch.Tensor, bank) -> tuple[float, float, float]:
    """(p50, p20, p80) ms of replaying a captured guidance_grad call (no host sync inside)."""
    call = lambda: rk.guidance_grad(z, bank, sigma=1.1, backend="triton", check_finite=False)  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return _bench(graph.replay, True)


def _baseline_matmul(mode: str, x: torch.Tensor):
    """torch x @ x.T in the same input precision as the fused score's mode."""
    if mode == "bf16":
        xb = x.to(torch.bfloat16)
        return "torch x @ x.T, bfloat16", lambda: xb @ xb.T, "highest"
    if mode == "tf32":
        return "torch x @ x.T, TF32 on", lambda: x @ x.T, "high"
    return "torch x @ x.T, float32 (TF32 off)", lambda: x @ x.T, "highest"


def _fused_vs_matmul(rep, state, mode, n, d, cuda, dev):
    import rkekernels
    from rkekernels.ops import scores_triton as st

    x = state["x"]
    sigma = state["sigma"]
    with st.precision(mode):
        fused = lambda: rkekernels.rke_score(x, sigma, backend="triton")  # noqa: E731
        value = fused()  # compile and tune outside the timing
        sync(cuda)
        f50, f20, f80 = _bench(fused, cuda)
    state.setdefault("fused_ms", {})[mode] = f50
    name, base, matmul_precision = _baseline_matmul(mode, x)
    torch.set_float32_matmul_precision(matmul_precision)
    try:
        base()
        b50, _, _ = _bench(base, cuda)
    finally:
        torch.set_float32_matmul_precision("highest")
        if cuda:
            torch.cuda.empty_cache()
    exact = state["exact"]
    err = rel(value, exact)
    s_x = state["max_r2"] / sigma**2
    bound = 1e-5 if mode == "ieee" else st.error_bound(mode, s_x) / (1 - st.error_bound(mode, s_x))
    ratio = f50 / b50
    rep.add(
        section="matmul" if mode == "ieee" else "modes", case="fused rke_score", precision=mode,
        n=n, d=d, ms_p50=f50, ms_p20=f20, ms_p80=f80, baseline=name, baseline_ms_p50=b50,
        ratio=ratio, target=TARGET_MATMUL if mode == "ieee" else "",
        error=err, bound=bound,
        status=("ok" if err <= bound else "FAIL")
        + ("" if mode != "ieee" else (", meets target" if ratio <= TARGET_MATMUL
                                      else ", misses target")),
        detail="error vs the torch float64 path",
    )  # fmt: skip


def _bench_state(state, n, d, dev, cuda):
    """The benchmark input (n, d) float32 and its float64 score, made once."""
    import rkekernels

    if state.get("n") == n:
        return state
    state.clear()
    gen = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(n, d, device=dev, generator=gen)
    sigma = rkekernels.median_bandwidth(x)
    exact = float(rkekernels.rke_score(x.double(), sigma, backend="torch"))
    xc = x.double() - x.double().mean(0)
    max_r2 = float((xc * xc).sum(1).max())
    del xc
    if cuda:
        torch.cuda.empty_cache()
    state.update(n=n, x=x, sigma=sigma, exact=exact, max_r2=max_r2)
    return state


def section_matmul(rep, state, n, d, dev, cuda):
    _bench_state(state, n, d, dev, cuda)
    _fused_vs_matmul(rep, state, "ieee", n, d, cuda, dev)
    # the kernel alone (no validation, centring or norms around it)
    from rkekernels.ops import scores_triton as st

    x = state["x"]
    xc = x - x.mean(0)
    inv = (1.0 / state["sigma"] ** 2,)
    k50, k20, k80 = _bench(lambda: st.forward_sums(xc, None, inv, None), cuda)
    b50 = None
    for r in rep.rows:
        if r.get("section") == "matmul" and r.get("precision") == "ieee":
            b50 = r.get("baseline_ms_p50")
    rep.add(section="matmul", case="forward_sums kernel only", precision="ieee", n=n, d=d,
            ms_p50=k50, ms_p20=k20, ms_p80=k80, baseline="torch x @ x.T, float32 (TF32 off)",
            baseline_ms_p50=b50, ratio=k50 / b50 if b50 else "", target=TARGET_MATMUL,
            status="meets target" if b50 and k50 / b50 <= TARGET_MATMUL else "misses target",
            detail="centred input given")  # fmt: skip


def section_stream(rep, state, n, d, dev, cuda):
    import rkekernels

    _bench_state(state, n, d, dev, cuda)
    x, sigma = state["x"], state["sigma"]
    if "ieee" not in state.get("fused_ms", {}):
        fused = lambda: rkekernels.rke_score(x, sigma, backend="triton")  # noqa: E731
        fused()
        state.setdefault("fused_ms", {})["ieee"] = _bench(fused, cuda)[0]
    f50 = state["fused_ms"]["ieee"]
    torch.set_float32_matmul_precision("highest")
    stream = lambda: rkekernels.rke_score(x, sigma, backend="torch")  # noqa: E731
    stream()
    s50, s20, s80 = _bench(stream, cuda)
    err = rel(stream(), state["exact"])
    rep.add(section="stream", case="torch streaming rke_score (baseline)", precision="ieee",
            n=n, d=d, ms_p50=s50, ms_p20=s20, ms_p80=s80, error=err, bound=1e-5,
            status="ok" if err <= 1e-5 else "FAIL")  # fmt: skip
    rep.add(section="stream", case="fused rke_score vs torch streaming", precision="ieee",
            n=n, d=d, ms_p50=f50, baseline="torch streaming rke_score", baseline_ms_p50=s50,
            ratio=f50 / s50, status="faster" if f50 < s50 else "slower")  # fmt: skip


def section_large(rep, state, n_large, d, dev, cuda, n_bench):
    import rkekernels

    state.clear()
    if cuda:
        torch.cuda.empty_cache()
    gen = torch.Generator(device=dev).manual_seed(2)
    x = torch.randn(n_large, d, device=dev, generator=gen)
    sigma = rkekernels.median_bandwidth(x)
    in_bytes = x.numel() * x.element_size()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    value = float(rkekernels.rke_score(x, sigma, backend="triton"))
    sync(cuda)
    secs = time.perf_counter() - t0
    extra = (torch.cuda.max_memory_allocated() - base) / in_bytes if cuda else float("nan")
    ok = math.isfinite(value) and 1.0 <= value <= n_large
    ref_ms = None
    for r in rep.rows:
        if r.get("case") == "fused rke_score" and r.get("precision") == "ieee":
            ref_ms = r.get("ms_p50")
    quick = rep.out / "gpu_check_quick.csv"
    if ref_ms is None and quick.exists():  # the 2nd command: the n_bench time of the 1st
        with open(quick, newline="") as fh:
            for r in csv.DictReader(fh):
                if r["case"] == "fused rke_score" and r["precision"] == "ieee" and r["ms_p50"]:
                    if int(r["n"]) == n_bench:
                        ref_ms = float(r["ms_p50"])
    scaling = secs * 1e3 / (ref_ms * (n_large / n_bench) ** 2) if ref_ms else ""
    rep.add(section="large", case="fused rke_score completes", precision="ieee", n=n_large, d=d,
            ms_p50=secs * 1e3, ratio=scaling, status="ok" if ok else "FAIL",
            detail=f"RKE={value:.6g}; extra memory {fmt(extra)} x (n d 4 bytes); "
            f"ratio = time / (n^2 extrapolation of the n={n_bench} fused time)")  # fmt: skip
    del x


def _clustered(n: int, d: int, dev, seed: int) -> torch.Tensor:
    """n float32 rows around 50 random centres (modes for evaluate to find), on ``dev``."""
    gen = torch.Generator(device=dev).manual_seed(seed)
    centres = 4.0 * torch.randn(50, d, device=dev, generator=gen)
    labels = torch.randint(0, 50, (n,), device=dev, generator=gen)
    return centres[labels] + torch.randn(n, d, device=dev, generator=gen)


def section_evaluate(rep, state, n, d, dev, cuda, small):
    """`rkekernels.evaluation.evaluate` end to end on ``dev`` (``--device cuda``).

    1. An (n, d) float32 embedding file (n = 1,000,000, d = 768; 50 clusters): every output of
       the JSON without a reference, timed against ONE exact fused ``rke_score`` of the same
       embeddings at the same sigma in the same run (the issue's budget: <= 2.5x), with the
       paths that produced each number, the peak GPU memory above the input and RKE's error
       against the fused score.
    2. A folder of 64 PNGs through the pixels encoder on ``dev`` (the encoders need no weights):
       the images, the encoder and the scores on the GPU, end to end.
    """
    import tempfile

    import numpy as np

    import rkekernels
    from rkekernels.evaluation import evaluate

    state.clear()
    x = _clustered(n, d, dev, 5)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "emb.npy")
        np.save(path, x.cpu().numpy())  # what a user hands to `rkekernels evaluate`
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else 0
        t0 = time.perf_counter()
        res = evaluate(path, cache_dir=None, device=str(dev), null_draws=0)
        sync(cuda)
        secs = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated() - base) / (n * d * 4) if cuda else None
    t0 = time.perf_counter()
    one = float(rkekernels.rke_score(x, res["sigma"], backend="triton"))
    sync(cuda)
    one_s = time.perf_counter() - t0
    err = rel(res["rke"], one)
    methods = ",".join(f"{k}:{v}" for k, v in res["methods"].items())
    rep.add(section="evaluate", case="evaluate embeddings (every JSON output)", precision="ieee",
            n=n, d=d, ms_p50=secs * 1e3, baseline="one fused rke_score, same sigma",
            baseline_ms_p50=one_s * 1e3, ratio=secs / one_s, target=2.5, error=err, bound=1e-5,
            status="ok" if err <= 1e-5 and math.isfinite(res["vendi"]) else "FAIL",
            detail=f"methods {methods}; peak GPU memory "
            + (f"{fmt(peak)} x (n d 4 bytes) above the input" if peak is not None else "n/a")
            + f"; RKE {res['rke']:.6g} [{res['rke_interval']['low']:.6g}; "
            f"{res['rke_interval']['high']:.6g}], Vendi {res['vendi']:.6g}, "
            f"{len(res['modes'])} modes")  # fmt: skip
    del x
    _evaluate_images(rep, dev, cuda, small)


def _evaluate_images(rep, dev, cuda, small) -> None:
    import tempfile

    import numpy as np
    from PIL import Image

    from rkekernels.evaluation import evaluate

    count, size = (16, 8) if small else (64, 32)
    rng = np.random.default_rng(6)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(count):
            pix = rng.normal(60.0 + 120.0 * (i % 2), 20.0, size=(size, size, 3))
            Image.fromarray(pix.clip(0, 255).astype(np.uint8)).save(f"{tmp}/img_{i:03d}.png")
        t0 = time.perf_counter()
        res = evaluate(tmp, encoder="pixels", cache_dir=None, device=str(dev), null_draws=0)
        sync(cuda)
        secs = time.perf_counter() - t0
    ok = res["n"] == count and 1.0 <= res["rke"] <= count and res["cache"]["encoded"] == count
    rep.add(section="evaluate", case="evaluate a PNG folder, pixels encoder on the device",
            precision="ieee", n=count, d=res["d"], ms_p50=secs * 1e3,
            status="ok" if ok else "FAIL",
            detail=f"RKE {res['rke']:.4g} (two colour groups: about 2), Vendi {res['vendi']:.4g}, "
            f"device {dev}")  # fmt: skip


def section_backward(rep, n, d, dev, cuda):
    import rkekernels
    from rkekernels.ops import scores_triton as st

    gen = torch.Generator(device=dev).manual_seed(3)
    x = torch.randn(n, d, device=dev, generator=gen)
    sigma = rkekernels.median_bandwidth(x)
    xc = x - x.mean(0)
    inv = (1.0 / sigma**2,)
    g = torch.ones(1, dtype=torch.float64, device=dev)
    fwd = lambda: st.forward_sums(xc, None, inv, None)  # noqa: E731
    bwd = lambda: st.backward_grads(xc, None, inv, None, g, None, None)  # noqa: E731
    fwd()
    bwd()
    f50, _, _ = _bench(fwd, cuda)
    b50, b20, b80 = _bench(bwd, cuda)
    rep.add(section="backward", case="backward_grads vs forward_sums", precision="ieee", n=n,
            d=d, ms_p50=b50, ms_p20=b20, ms_p80=b80, baseline="forward_sums",
            baseline_ms_p50=f50, ratio=b50 / f50, target=4.0,
            status="ok" if b50 / f50 <= 6.0 else "slow",
            detail="full-square backward, 2 dots per tile; forward: triangle, 1 dot")  # fmt: skip
    xg = x.clone().requires_grad_(True)
    full = lambda: torch.autograd.grad(rkekernels.rke_score(xg, sigma, backend="triton"), xg)  # noqa: E731
    only = lambda: rkekernels.rke_score(x, sigma, backend="triton")  # noqa: E731
    full()
    only()
    a50, a20, a80 = _bench(full, cuda)
    o50, _, _ = _bench(only, cuda)
    rep.add(section="backward", case="autograd: rke_score forward + backward", precision="ieee",
            n=n, d=d, ms_p50=a50, ms_p20=a20, ms_p80=a80, baseline="rke_score forward",
            baseline_ms_p50=o50, ratio=a50 / o50, target=5.0)  # fmt: skip


def section_modes(rep, state, n, d, dev, cuda):
    _bench_state(state, n, d, dev, cuda)
    for mode in ("tf32", "bf16", "tf32x3"):
        try:
            _fused_vs_matmul(rep, state, mode, n, d, cuda, dev)
        except Exception as exc:
            rep.add(section="modes", case="fused rke_score", precision=mode, n=n, d=d,
                    status="ERROR", detail=f"{type(exc).__name__}: {exc}")  # fmt: skip
            traceback.print_exc()


def section_pykeops(rep, state, n, d, dev, cuda):
    _bench_state(state, n, d, dev, cuda)
    try:
        from pykeops.torch import LazyTensor
    except Exception as exc:
        rep.add(section="pykeops", case="KeOps sum", status="skipped",
                detail=f"pykeops not importable: {exc}")  # fmt: skip
        return
    x, sigma = state["x"], state["sigma"]
    c = 1.0 / sigma**2

    def keops():
        xc = x - x.mean(0)
        xi, xj = LazyTensor(xc[:, None, :]), LazyTensor(xc[None, :, :])
        return n * n / ((-c * ((xi - xj) ** 2).sum(-1)).exp().sum(dim=1).double().sum())

    try:
        value = keops()
        k50, _, _ = _bench(keops, cuda)
    except Exception as exc:
        rep.add(section="pykeops", case="KeOps sum", status="skipped",
                detail=f"KeOps failed: {type(exc).__name__}: {exc}")  # fmt: skip
        return
    f50 = state.get("fused_ms", {}).get("ieee")
    rep.add(section="pykeops", case="fused rke_score vs KeOps", precision="ieee", n=n, d=d,
            ms_p50=f50, baseline="pykeops LazyTensor", baseline_ms_p50=k50,
            ratio=f50 / k50 if f50 else "", error=rel(value, state["exact"]))  # fmt: skip


# --------------------------------------------------------------------------- compile only


def section_compile(rep: Report) -> None:
    """Compile the kernels for sm_90 without a GPU; registers / spills via cuobjdump if present."""
    import subprocess
    import tempfile

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from rkekernels.ops import scores_triton as st
    from rkekernels.ops import triton_tuning as tuning

    target = GPUTarget("cuda", 90, 32)
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"

    def compile_one(fn, sig, consts, cfg, case, prec):
        src_kw = {"signature": {**sig, **{k: "constexpr" for k in consts}}}
        try:
            src = ASTSource(fn=fn, constexprs=consts, **src_kw)
        except TypeError:  # older Triton: constants= and no constexpr entries in the signature
            src = ASTSource(fn=fn, signature=sig, constants=consts)
        opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
        t0 = time.perf_counter()
        try:
            kern = triton.compile(src, target=target, options=opts)
        except Exception as exc:
            rep.add(section="compile", case=case, precision=prec, status="ERROR",
                    detail=f"{type(exc).__name__}: {str(exc)[:300]}")  # fmt: skip
            return
        secs = time.perf_counter() - t0
        usage = ""
        if cuobjdump.exists() and "cubin" in kern.asm:
            with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as fh:
                fh.write(kern.asm["cubin"])
            out = subprocess.run([str(cuobjdump), "--dump-resource-usage", fh.name],
                                 capture_output=True, text=True)  # fmt: skip
            usage = " ".join(
                w for line in out.stdout.splitlines() if "REG" in line
                for w in line.split() if w.startswith(("REG:", "STACK:"))
            )  # fmt: skip
            os.unlink(fh.name)
        rep.add(section="compile", case=case, precision=prec, ms_p50=secs * 1e3, status="ok",
                detail=f"{cfg} {usage}".strip())  # fmt: skip

    def ptr(dtype):
        return {tl.float32: "*fp32", tl.float64: "*fp64", tl.bfloat16: "*bf16"}[dtype]

    variants = [  # (mode, storage dtype, accumulation dtype, forward configs, backward configs)
        ("ieee", tl.float32, tl.float32, tuning._FWD_GPU, tuning._BWD_GPU),
        ("tf32", tl.float32, tl.float32, tuning._FWD_GPU[:1], tuning._BWD_GPU[:1]),
        ("tf32x3", tl.float32, tl.float32, tuning._FWD_GPU[:1], tuning._BWD_GPU[:1]),
        ("bf16", tl.bfloat16, tl.float32, tuning._FWD_GPU[:1], tuning._BWD_GPU[:1]),
        ("ieee", tl.float64, tl.float64, tuning._FWD_GPU_F64[:1], tuning._BWD_GPU_F64[:1]),
    ]
    for mode, store, acc, fwd_cfgs, bwd_cfgs in variants:
        dot_prec = "tf32" if mode == "bf16" else mode
        w_round = {"tf32": 1, "bf16": 2}.get(mode, 0)
        for has_t, K in ((False, 1), (True, 2)):
            scal = ptr(acc)
            sig = dict(X=ptr(store), T=ptr(store), NX=scal, NT=scal, C=scal, CT=scal,
                       PART="*fp64", n="i32", d="i32", m="i32",
                       stride_x="i32", stride_t="i32", shard_rank="i32",
                       shard_world="i32")  # fmt: skip
            for cfg in fwd_cfgs:
                consts = dict(K=K, NSP=triton.next_power_of_2(2 * K + 1), HAS_T=has_t,
                              WANT_FX=True, DOT_PREC=dot_prec, ACC=acc, BLOCK=cfg["BLOCK"],
                              BLOCK_D=cfg["BLOCK_D"], GROUP=cfg["GROUP"])  # fmt: skip
                compile_one(st._fwd_kernel, sig, consts, cfg,
                            f"forward, {store}, HAS_T={has_t}, K={K}", mode)  # fmt: skip
            out = ptr(tl.float64 if acc == tl.float64 else tl.float32)
            sig = dict(X=ptr(store), T=ptr(store), NX=scal, NT=scal, C=scal, CT=scal, COEF=scal,
                       GX="*fp64", GT="*fp64", OUTX=out, OUTT=out, n="i32", d="i32", m="i32",
                       stride_x="i32", stride_t="i32", stride_gx="i32", stride_gt="i32",
                       stride_ox="i32", stride_ot="i32")  # fmt: skip
            for cfg in bwd_cfgs:
                consts = dict(K=K, HAS_T=has_t, NEED_X=True, NEED_T=has_t, DOT_PREC=dot_prec,
                              ACC=acc, W_ROUND=w_round, BF16_STORE=store == tl.bfloat16,
                              BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                              BLOCK_D=cfg["BLOCK_D"])  # fmt: skip
                compile_one(st._bwd_kernel, sig, consts, cfg,
                            f"backward, {store}, HAS_T={has_t}, K={K}", mode)  # fmt: skip


# --------------------------------------------------------------------------- main


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "command", nargs="?", default="quick", choices=sorted(COMMANDS),
        help="quick (1st command, <= 3 minutes) or extended (large and optional sections)",
    )  # fmt: skip
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results"))
    p.add_argument("--small", action="store_true", help="tiny sizes (smoke test, CPU or GPU)")
    p.add_argument("--sections", default=None, help="comma separated; default: the command's")
    p.add_argument("--pykeops", action="store_true", help="also try the KeOps comparison")
    p.add_argument(
        "--compile-only",
        action="store_true",
        help="only compile the kernels for sm_90 (no GPU needed; TRITON_INTERPRET unset)",
    )
    p.add_argument("--n-bench", type=int, default=None, help="n for matmul/stream/modes (65536)")
    p.add_argument("--d", type=int, default=None, help="feature dimension (768)")
    p.add_argument("--n-large", type=int, default=None, help="n for the large run (1,000,000)")
    p.add_argument("--n-backward", type=int, default=None, help="n for backward (32768)")
    p.add_argument("--budget-s", type=float, default=None, help="start no section after this")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    small = args.small
    n_bench = args.n_bench or (130 if small else 65536)
    d = args.d or (24 if small else 768)
    n_large = args.n_large or (600 if small else 1_000_000)
    n_bwd = args.n_backward or (70 if small else 32768)
    chosen = args.sections or ",".join(COMMANDS[args.command])
    sections = [s.strip() for s in chosen.split(",") if s.strip()]
    budget = args.budget_s if args.budget_s is not None else BUDGET_S[args.command]
    if args.pykeops and "pykeops" not in sections:
        sections.append("pykeops")
    if args.compile_only:
        sections = ["compile"]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        print(f"unknown sections {unknown}; choose from {SECTIONS}", file=sys.stderr)
        return 2

    from rkekernels.ops import scores_triton as st

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    if sections == ["compile"]:
        if st.interpreted():
            print("--compile-only needs TRITON_INTERPRET unset", file=sys.stderr)
            return 2
    elif not cuda and not st.interpreted():
        print("no CUDA GPU: run with TRITON_INTERPRET=1 (and --small) to smoke-test on CPU",
              file=sys.stderr)  # fmt: skip
        return 2
    torch.set_float32_matmul_precision("highest")
    notes = [
        "ratio = ms_p50 / baseline_ms_p50 (do_bench quantiles 0.5/0.2/0.8, ms); "
        f"target for the exact-float32 fused score vs a float32 x @ x.T: <= {TARGET_MATMUL}",
        "error: relative error of the score vs the torch float64 path (benchmarks) or of the "
        "pair sums / gradient rows vs rkekernels.reference (check); bound: the stated bound",
        f"sizes: n_bench={n_bench}, d={d}, n_large={n_large}, n_backward={n_bwd}"
        + (" (--small)" if small else ""),
    ]
    name = "gpu_check_compile" if sections == ["compile"] else f"gpu_check_{args.command}"
    title = "GPU check of the fused Triton kernels"
    rep = Report(Path(args.out), name, title, COLUMNS, notes, echo=True)
    start = time.perf_counter()
    state: dict = {}
    runners = {
        "compile": lambda: section_compile(rep),
        "check": lambda: section_check(rep, dev, small),
        "guidance": lambda: section_guidance(rep, dev, cuda, small),
        "matmul": lambda: section_matmul(rep, state, n_bench, d, dev, cuda),
        "stream": lambda: section_stream(rep, state, n_bench, d, dev, cuda),
        "large": lambda: section_large(rep, state, n_large, d, dev, cuda, n_bench),
        "evaluate": lambda: section_evaluate(rep, state, n_large, d, dev, cuda, small),
        "backward": lambda: section_backward(rep, n_bwd, d, dev, cuda),
        "modes": lambda: section_modes(rep, state, n_bench, d, dev, cuda),
        "pykeops": lambda: section_pykeops(rep, state, n_bench, d, dev, cuda),
    }
    failed = False
    from benchmarks.compile_count import VariantCounter, triton_cache_size

    with VariantCounter() as variants:
        for sec in [s for s in SECTIONS if s in sections]:
            elapsed = time.perf_counter() - start
            if elapsed > budget:
                rep.add(section=sec, status="skipped", detail=f"budget: {elapsed:.0f} s elapsed")
                continue
            print(f"[{elapsed:7.1f} s] {sec}", flush=True)
            n_before = variants.total
            try:
                runners[sec]()
            except Exception as exc:
                failed = True
                rep.add(section=sec, status="ERROR", detail=f"{type(exc).__name__}: {exc}")
                traceback.print_exc()
            finally:
                if cuda:
                    torch.cuda.empty_cache()
            print(f"  compiled variants so far: {variants.total} (+{variants.total - n_before})")
    cached = triton_cache_size() if cuda else None
    rep.add(
        section="variants", case="compiled kernel variants launched", status="ok",
        ms_p50=(time.perf_counter() - start) * 1e3, n=variants.total,
        detail=f"by kernel {variants.by_kernel()}, {variants.launches} launches"
        + (f"; Triton's caches hold {cached}" if cached is not None else "")
        + "; ms_p50 = wall time of the command so far",
    )  # fmt: skip
    print(f"compiled variants: {variants.total} {variants.by_kernel()}", flush=True)
    tuned = st.tuned_configs()
    rep.extra = ["Tile configurations chosen by the tuner (problem key -> config):", ""]
    rep.extra += [f"- `{k}` -> `{v}`" for k, v in tuned.items()] or ["- none (small problems)"]
    rep.extra += ["", f"Total wall time {time.perf_counter() - start:.0f} s."]
    rep.flush()
    bad = [r for r in rep.rows if str(r.get("status", "")).startswith(("FAIL", "ERROR"))]
    print(f"done in {time.perf_counter() - start:.0f} s; {len(rep.rows)} rows, {len(bad)} failed;"
          f" results in {rep.out}/{rep.name}.csv and .md", flush=True)  # fmt: skip
    return 1 if (bad or failed) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: `rkekernels.guidance_grad` against one GEMM over the bank and the original algorithm.

Run:  python -m benchmarks.bench_guidance [--quick] [--threads K]

1. b = 4 samples, n = 10,000 bank entries, D = 16,384 (a 4x64x64 latent) and D = 768 (an image
   embedding), float32:
   - vs one pass over the same bank by a single GEMM (the memory-bandwidth limit). Both
     layouts, ``bank @ z.T`` and ``z @ bank.T``, are timed; the baseline is the faster one.
     Target: guidance_grad <= 1.5x.
   - vs the ORIGINAL algorithm as published (SPARKE's diffusers fork, ``RKEGuidedSampling``,
     "rke" branch, Gaussian kernel; re-written below as `original_step`): for each sample, concat
     the new feature to the bank, rebuild the (n+1)x(n+1) kernel matrix by concatenation, then
     autograd of 1 / mean(similarity). Target: >= 100x faster.
2. Scaling in n (1k to 100k) at D = 768: time and peak memory (fresh process per size) of
   guidance_grad, next to the GEMM and, up to n = 10k, the original algorithm; the extra memory
   must stay flat (no n x n, no (n, D) temporaries).

All timings: median of repeated runs, the candidates interleaved run by run with their baseline
in the same process (the machine may be shared); a ratio is the median over rounds of the
candidate's time over the baseline's time in the same round. On CPU the benchmark pins torch to
``--threads`` threads (default 1): with several processes on few cores, OpenMP barriers make
multi-threaded timings of small ops erratic. Results: benchmarks/results/bench_guidance.{csv,md}.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

if __package__ in (None, ""):  # run by its path: python benchmarks/<name>.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rkekernels as rk
from benchmarks.common import RESULTS, parser, run_child, write_results
from rkekernels.ops import guidance_cpu

COLUMNS = ["case", "method", "n", "D", "seconds", "ratio", "baseline", "extra_mib", "note"]

SIGMA_C = 0.8  # the original's image bandwidth (un-squared kernel exp(-d^2 / (2 s_c^2)))
SIGMA = math.sqrt(2.0) * SIGMA_C  # the same kernel in rkekernels' convention (SPEC section 2)


# --------------------------------------------------------------------------- the baselines


def gemm_bank_zt(bank: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """One pass over the bank: ``bank @ z.T`` ((n, D) x (D, b))."""
    return bank @ z.T


def gemm_z_bankt(bank: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The same product in the other layout, ``z @ bank.T`` (MKL is faster here for small b)."""
    return z @ bank.T


def gemm_path(fn: Callable[[], object]) -> object:
    """Run ``fn`` with the fused CPU kernel switched off (the chunked-GEMM torch path)."""
    old = guidance_cpu.ENABLED
    guidance_cpu.ENABLED = False
    try:
        return fn()
    finally:
        guidance_cpu.ENABLED = old


def original_step(
    latent: torch.Tensor,
    F: torch.Tensor,
    M: torch.Tensor,
    sigma: float = SIGMA_C,
    max_bank_size: int = 10_000,
) -> torch.Tensor:
    """ORIGINAL algorithm (SPARKE diffusers fork, RKEGuidedSampling.cond_fn, algorithm="rke",
    kernel="gaussian", latents as features), one sample: d RKE / d latent.

    Follows the published code step by step: normalise the flattened latent; ``get_F_M``
    concatenates it to the feature bank F and rebuilds the (n+1)x(n+1) kernel matrix M by two
    concatenations (then caps it at max_bank_size); ``get_rank`` scales M by 1/(n+1), checks it
    for NaN/Inf, recomputes the similarities of the new feature to every row of the new bank and
    returns 1 / mean(similarity); autograd gives the gradient w.r.t. the latent.
    """
    latents = latent.detach().requires_grad_()
    with torch.enable_grad():
        features_ = latents.view(1, -1)
        features_ = features_ / features_.norm(2, dim=1, keepdim=True)
        # get_F_M(M, F, f, kernel="gaussian")
        f = features_
        F_ = torch.cat((F, f))
        squared_diffs = (F_ - f) ** 2
        dist_sq = torch.sum(squared_diffs, dim=1, keepdim=True)
        m = torch.exp(-dist_sq / (2 * sigma**2))
        M_ = torch.cat((M, m[:-1].T))
        M_ = torch.cat((M_, m), dim=1)
        if M_.size(0) > max_bank_size:
            M_ = M_[-max_bank_size:, -max_bank_size:]
            F_ = F_[-max_bank_size:]
        # get_rank(M=M_ / M_.shape[0], feature_m=F_), branch M.shape[0] > 20
        M_scaled = M_ / M_.shape[0]
        if torch.isnan(M_scaled).any() or torch.isinf(M_scaled).any():
            raise FloatingPointError("M contains NaN or Inf")
        squared_diffs = (F_ - F_[-1]) ** 2
        dist_sq = torch.sum(squared_diffs, dim=1)
        similarities = torch.exp(-dist_sq / (2 * sigma**2))
        rank = 1 / similarities.mean()
        (grads,) = torch.autograd.grad(rank, latents)
    return grads


def original(z: torch.Tensor, F: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """The original algorithm on a batch: one `original_step` per sample (it takes b = 1)."""
    return torch.cat([original_step(z[a : a + 1], F, M) for a in range(z.shape[0])])


# --------------------------------------------------------------------------------- helpers


def interleaved(
    fns: dict[str, Callable[[], object]],
    repeat: dict[str, int],
    warmup: bool = True,
    rounds: dict[str, list[float]] | None = None,
) -> dict[str, float]:
    """Median seconds of each function, run round-robin (one warm-up each) so drift hits all
    (``rounds``, if given, receives each function's seconds round by round).

    Before every timed run the CPU caches are flushed (64 MiB written, untimed): each call starts
    cold, as it does between two denoising steps, and no candidate inherits the bank that the
    previous one left in the last-level cache.
    """
    for fn in fns.values() if warmup else ():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(max(repeat.values())):
        for k, fn in fns.items():
            if r < repeat[k]:
                _flush_caches()
                _sync()
                t0 = time.perf_counter()
                fn()
                _sync()  # on CUDA: time the kernels, not their launch
                times[k].append(time.perf_counter() - t0)
    if rounds is not None:
        rounds.update(times)
    return {k: statistics.median(v) for k, v in times.items()}


def paired_ratio(rounds: dict[str, list[float]], k: str, base: str) -> float:
    """Median over rounds of (k's seconds / base's seconds in the same round): a load that
    changes between rounds (a shared machine) cancels in each pair."""
    return statistics.median(a / b for a, b in zip(rounds[k], rounds[base]))


_FLUSH = torch.empty(16 * 2**20)  # 64 MiB, twice this machine's last-level cache


def path_name() -> str:
    """Which path guidance_grad takes for CPU tensors in this environment."""
    if torch.cuda.is_available():
        return "Triton kernel"
    fused = guidance_cpu.enabled()
    return "fused CPU kernel (numba)" if fused else "chunked GEMMs (numba not installed)"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _flush_caches() -> None:
    if not torch.cuda.is_available():
        _FLUSH.fill_(1.0)


def unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, d).normal_(generator=g)
    return x.div_(x.norm(dim=1, keepdim=True))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float(a @ b / (a.norm() * b.norm()))


# ------------------------------------------------------------------------------- section 1


def head_to_head(dim: int, n: int, b: int, repeat: int, rows: list) -> None:
    shape = (b, 4, 64, 64) if dim == 16384 else (b, dim)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(shape, generator=g)
    zf = z.reshape(b, -1).contiguous()
    F = unit_rows(n, dim, seed=2)
    bank = rk.FeatureBank(n)
    bank.add(F)
    bank_bf16 = rk.FeatureBank(n, dtype=torch.bfloat16)
    bank_bf16.add(F)
    # unit-norm prompt embeddings (as SPARKE normalises CLIP text features), s_c = sqrt(2) 0.35
    cond, pbank_cond = unit_rows(b, 768, seed=4), unit_rows(n, 768, seed=5)
    pbank = rk.FeatureBank(n)
    pbank.add(F, pbank_cond)
    case = f"b={b}, n={n:,}, D={dim:,}, float32"
    fns = {
        "bank @ z.T": lambda: gemm_bank_zt(F, zf),
        "z @ bank.T": lambda: gemm_z_bankt(F, zf),
        "guidance_grad, FeatureBank": lambda: rk.guidance_grad(z, bank, sigma=SIGMA),
        "guidance_grad, (n, D) tensor": lambda: rk.guidance_grad(z, F, sigma=SIGMA),
        "guidance_grad, bfloat16 FeatureBank": lambda: rk.guidance_grad(z, bank_bf16, sigma=SIGMA),
        "guidance_grad, with prompts (m = 768)": lambda: rk.guidance_grad(
            z, pbank, cond=cond, sigma=SIGMA, sigma_cond=math.sqrt(2.0) * 0.35
        ),
        "guidance_grad, FeatureBank, include_batch=False": lambda: rk.guidance_grad(
            z, bank, sigma=SIGMA, include_batch=False
        ),
    }
    if not torch.cuda.is_available() and guidance_cpu.available():
        # the CPU torch path without the fused numba kernel: two GEMMs per cached chunk
        fns["guidance_grad, FeatureBank, chunked GEMMs (no numba)"] = lambda: gemm_path(
            lambda: rk.guidance_grad(z, bank, sigma=SIGMA)
        )
    rounds: dict[str, list[float]] = {}
    t = interleaved(fns, {k: repeat for k in fns}, rounds=rounds)
    base_name = min(("bank @ z.T", "z @ bank.T"), key=t.__getitem__)
    for k, secs in t.items():
        note = "baseline (faster GEMM layout)" if k == base_name else ""
        if k == "guidance_grad, FeatureBank":
            note = f"target <= 1.5x; {path_name()}"
        ratio = paired_ratio(rounds, k, base_name)
        rows.append(
            dict(case=case, method=k, n=n, D=dim, seconds=secs, ratio=ratio,
                 baseline=base_name, note=note)
        )  # fmt: skip
        print(f"  {case} | {k}: {secs * 1e3:.1f} ms ({ratio:.2f}x)", flush=True)
    bank_bf16 = pbank = pbank_cond = fns = None  # free before the original's temporaries

    # the original algorithm: M is the bank's (n, n) kernel matrix, its state between calls.
    # Its values do not enter the n > 20 branch of get_rank (only its shape and a NaN check
    # that reads it), so it is filled with a stand-in instead of an O(n^2 D) kernel evaluation.
    M = torch.full((n, n), 0.5)
    rep_orig = 2 if dim > 4096 else 3
    # timed on its own (its multi-GiB temporaries would disturb the candidates' timings);
    # compared with guidance_grad(include_batch=False), which sees the same n entries
    t_orig = interleaved(  # no warm-up: each call allocates and rebuilds everything anyway
        {"original": lambda: original(z, F, M)}, {"original": rep_orig}, warmup=False
    )
    t_orig = t_orig["original"]
    t_ours = t["guidance_grad, FeatureBank, include_batch=False"]
    speedup = t_orig / t_ours
    rows.append(
        dict(case=case, method="ORIGINAL algorithm (b calls; rebuild (n+1)^2 M; autograd)", n=n,
             D=dim, seconds=t_orig, ratio=t_orig / t[base_name], baseline=base_name,
             note=f"median of {rep_orig} runs; guidance_grad (include_batch=False) is "
             f"{speedup:.0f}x faster (target >= 100x)")
    )  # fmt: skip
    print(f"  {case} | original {t_orig:.2f} s, ours {t_ours * 1e3:.1f} ms: {speedup:.0f}x",
          flush=True)  # fmt: skip


# ------------------------------------------------------------------------------- section 2

_CHILD = """
import json, time, statistics, sys, torch
torch.set_num_threads({threads})
import rkekernels as rk
from benchmarks.bench_guidance import SIGMA, original, unit_rows
n, dim, b, which = {n}, {dim}, {b}, {which!r}
def status(key):  # MiB, from /proc/self/status (VmRSS: now, VmHWM: peak since reset)
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
z = torch.randn(b, dim)
F = unit_rows(n, dim, seed=2)
if which == "ours":
    bank = rk.FeatureBank(n)
    bank.add(F)
    del F
    fn = lambda: rk.guidance_grad(z, bank, sigma=SIGMA)
    warm = rk.FeatureBank(10)
    warm.add(torch.randn(10, dim))
    rk.guidance_grad(torch.randn(b, dim), warm, sigma=1.0)  # load the kernels of this call
else:
    M = torch.full((n, n), 0.5)
    fn = lambda: original(z, F, M)
    original(z[:1], F[:10], M[:10, :10])
with open("/proc/self/clear_refs", "w") as fh:  # reset the peak (VmHWM) to the current RSS
    fh.write("5")
before = status("VmRSS")
fn()
extra = status("VmHWM") - before
sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
ts = []
for _ in range({repeat}):
    sync(); t0 = time.perf_counter(); fn(); sync(); ts.append(time.perf_counter() - t0)
print(json.dumps(dict(seconds=statistics.median(ts), input_mib=n * dim * 4 / 2**20,
                      extra_mib=max(0.0, extra))))
"""


def child(n: int, dim: int, b: int, which: str, threads: int, repeat: int) -> dict:
    code = _CHILD.format(threads=threads, n=n, dim=dim, b=b, which=which, repeat=repeat)
    return run_child(code)


def scaling(sizes: list[int], dim: int, b: int, threads: int, rows: list) -> None:
    for n in sizes:
        F = unit_rows(n, dim, seed=2)
        zf = torch.randn(b, dim)
        bank = rk.FeatureBank(n)
        bank.add(F)
        rounds: dict[str, list[float]] = {}
        t = interleaved(
            {
                "bank @ z.T": lambda F=F, zf=zf: gemm_bank_zt(F, zf),
                "z @ bank.T": lambda F=F, zf=zf: gemm_z_bankt(F, zf),
                "ours": lambda zf=zf, bank=bank: rk.guidance_grad(zf, bank, sigma=SIGMA),
            },
            {"bank @ z.T": 7, "z @ bank.T": 7, "ours": 7},
            rounds=rounds,
        )
        base_name = min(("bank @ z.T", "z @ bank.T"), key=t.__getitem__)
        t["gemm"] = t[base_name]
        mem = child(n, dim, b, "ours", threads, repeat=3)
        case = f"scaling, b={b}, D={dim}"
        rows.append(
            dict(case=case, method=base_name, n=n, D=dim, seconds=t["gemm"], ratio=1.0,
                 baseline=base_name, note="faster GEMM layout")
        )  # fmt: skip
        rows.append(
            dict(case=case, method="guidance_grad, FeatureBank", n=n, D=dim, seconds=t["ours"],
                 ratio=paired_ratio(rounds, "ours", base_name), baseline=base_name,
                 extra_mib=mem.get("extra_mib", mem.get("error")),
                 note=f"bank {n * dim * 4 / 2**20:.0f} MiB; "
                 f"{t['ours'] / n * 1e9:.0f} ns per bank row; "
                 f"fresh process: {mem.get('seconds', float('nan')) * 1e3:.1f} ms")
        )  # fmt: skip
        msg = f"  n={n:,}: gemm {t['gemm'] * 1e3:.2f} ms, ours {t['ours'] * 1e3:.2f} ms"
        msg += f", extra peak {mem.get('extra_mib', mem.get('error'))} MiB"
        if n <= 10_000:
            mo = child(n, dim, b, "original", threads, repeat=2)
            note = f"bank {n * dim * 4 / 2**20:.0f} MiB"
            if "seconds" in mo:
                note += f"; guidance_grad {mo['seconds'] / t['ours']:.0f}x faster"
            rows.append(
                dict(case=case, method="ORIGINAL algorithm", n=n, D=dim,
                     seconds=mo.get("seconds", ""), ratio=mo.get("seconds", math.nan) / t["gemm"],
                     baseline=base_name, extra_mib=mo.get("extra_mib", mo.get("error")),
                     note=note)
            )  # fmt: skip
            msg += f"; original {mo.get('seconds', math.nan):.3f} s, "
            msg += f"extra peak {mo.get('extra_mib', mo.get('error'))} MiB"
        print(msg, flush=True)


def direction_check(rows: list) -> None:
    """The original's d RKE/dz and ours are the same direction (s = sqrt(2) s_c)."""
    n, dim = 1000, 16384
    F = unit_rows(n, dim, seed=3)
    z = torch.randn(1, 4, 64, 64)
    g_orig = original(z, F, torch.full((n, n), 0.5))
    g_ours = rk.guidance_grad(z, F, sigma=SIGMA, include_batch=False).grad
    c = cosine(g_orig, g_ours)
    rows.append(
        dict(case="check", method="cos(original grad, guidance_grad)", n=n, D=dim, seconds="",
             ratio=c, baseline="", note="same direction: expect 1 to float32 rounding")
    )  # fmt: skip
    print(f"  direction check: cosine {c:.8f}", flush=True)


def threads_section(threads: int, rows: list) -> None:
    """The head-to-head ratio with several torch threads (GEMM and guidance_grad alike)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n, dim in ((10_000, 768), (100_000, 768), (10_000, 16384)):
            F = unit_rows(n, dim, seed=2)
            zf = torch.randn(4, dim)
            bank = rk.FeatureBank(n)
            bank.add(F)
            fns = {
                "bank @ z.T": lambda F=F, zf=zf: gemm_bank_zt(F, zf),
                "guidance_grad, FeatureBank": lambda zf=zf, bank=bank: rk.guidance_grad(
                    zf, bank, sigma=SIGMA
                ),
            }
            reps = 7 if n * dim > 10**8 else 21
            rounds: dict[str, list[float]] = {}
            t = interleaved(fns, {k: reps for k in fns}, rounds=rounds)
            base = t["bank @ z.T"]
            case = f"{threads} threads, b=4, n={n:,}, D={dim:,}, float32"
            for k, secs in t.items():
                rows.append(
                    dict(case=case, method=k, n=n, D=dim, seconds=secs,
                         ratio=paired_ratio(rounds, k, "bank @ z.T"), baseline="bank @ z.T",
                         note=path_name() if k != "bank @ z.T" else "")
                )  # fmt: skip
            ours = t["guidance_grad, FeatureBank"]
            ratio = paired_ratio(rounds, "guidance_grad, FeatureBank", "bank @ z.T")
            msg = f"  {case}: gemm {base * 1e3:.2f} ms, ours {ours * 1e3:.2f} ms"
            print(f"{msg} ({ratio:.2f}x)", flush=True)
    finally:
        torch.set_num_threads(old)


NOTES = """Notes.
- Every timed run starts with cold CPU caches (64 MiB written before it, untimed); torch runs on
  {threads} thread(s); the machine may be shared, so compare ratios, not seconds.
- "ORIGINAL algorithm" is SPARKE's published per-sample computation re-written in this script
  (`original_step`): b calls, each concatenating the bank and rebuilding the (n+1)x(n+1)
  kernel matrix, then autograd of 1/mean(similarity). Its state matrix M holds stand-in
  values (only its shape and a NaN check enter that branch). guidance_grad gives the same
  direction (cosine row "check", with s = sqrt(2) s_c).
- Two ways to compute the same softmax state on CPU. The fused kernel (numba; the default where
  it is installed) reads each bank row once and uses it, from cache, for both its logits and its
  share of the values, register-blocked (4 samples per pass, 1 or 2 rows for the logits, 4 rows
  for the values): its arithmetic hides behind the memory stream, so it costs about one read of
  the bank. The chunked-GEMM path (numba not installed) runs two GEMMs with b = 4 rows over each
  cached chunk; with D = 768 on this CPU a b = 4 GEMM runs about as fast from memory as from
  cache (MKL's small-b kernel, about 30 GFLOP/s, is the limit, not DRAM), so the second GEMM
  costs nearly as much as the first and that path stays near 2x.
- With the fused kernel the rest of a call (normalising z, the other samples of the batch as
  entries, the gradient) also runs in compiled code: with cold caches a torch op on a (4, 768)
  tensor costs about 40 us, and a call's fixed cost is about 0.3 ms (it dominates at n = 1,000).
- "with prompts (m = 768)" streams the bank's prompt embeddings as well: twice the bytes of the
  GEMM baseline, which reads the features only.
- The rows "N threads" rerun the head-to-head with every core (GEMM and guidance_grad alike).
  The fused kernel splits a bank over threads only from 16 MiB per thread on, into 2 MiB
  chunks (at most 8 per thread) that the threads take in turn. Right after a multi-threaded
  torch op (here: the cache flush) libgomp's workers spin for milliseconds on the other cores,
  and a thread of ours that shares a core with one runs at half speed: taking chunks in turn
  lets the other thread do more (n = 100,000: 1.28x against 1.47x with one equal part per
  thread, 41 paired rounds). At n = 10,000 (29 MiB) a split measured slower than the whole bank
  on one thread (2.45x against 1.91x): the spinning workers hold the second core for about the
  whole call. With OMP_WAIT_POLICY=PASSIVE (no spinning) a split there gives ~1.7x.
- "extra_mib": peak resident memory of one call above the resident memory before it, in a
  fresh process (the bank itself excluded); flat in n for guidance_grad.
"""


def main() -> None:
    ap = parser(__doc__, quick="smaller sizes, fewer repeats")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows: list[dict] = []
    b = 4
    print("1. head to head (n = 10,000)", flush=True)
    n = 2_000 if args.quick else 10_000
    for dim in (16384, 768):
        repeat = 5 if args.quick else (11 if dim > 4096 else 41)
        head_to_head(dim, n, b, repeat=repeat, rows=rows)
    direction_check(rows)
    print("2. scaling in n at D = 768", flush=True)
    sizes = [1_000, 10_000] if args.quick else [1_000, 3_000, 10_000, 30_000, 100_000]
    scaling(sizes, 768, b, args.threads, rows)
    if not torch.cuda.is_available() and not args.quick and (os.cpu_count() or 1) > 1:
        print(f"3. with {os.cpu_count()} torch threads", flush=True)
        threads_section(os.cpu_count() or 2, rows)
    name = "bench_guidance_quick" if args.quick else "bench_guidance"
    md = write_results(
        name, rows, COLUMNS,
        "guidance_grad vs one GEMM over the bank and vs the original algorithm "
        "(median wall time; ratio = median over rounds of seconds / baseline seconds in the "
        "same round)",
    )  # fmt: skip
    notes = NOTES.format(threads=args.threads)
    with open(RESULTS / f"{name}.md", "a") as fh:
        fh.write("\n" + notes)
    print(md + "\n" + notes)
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()

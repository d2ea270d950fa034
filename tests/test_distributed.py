"""rkekernels.distributed (and RKEMetric under torch.distributed) on real process groups.

Ranks are started with torch.multiprocessing, forked from a forkserver that imported this
module once (gloo on CPU, file:// init). One run per world size does every check (a process group
costs about a second); each rank writes its results to a file and the parent compares them with
the one-process API on the concatenated shards (float64: relative error <= 1e-10 on every rank).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

import rkekernels
from benchmarks.common import spawn_ranks
from rkekernels import _bandwidth, reference
from rkekernels import _collectives as C
from rkekernels import distributed as D
from rkekernels._input import triton_available
from rkekernels.metrics import RKEMetric, VendiMetric
from rkekernels.ops import scores_torch
from tests.conftest import close

if triton_available():
    from rkekernels.ops import scores_triton, triton_tuning

#: the fused kernel on gloo's CPU tensors: the interpreter (TRITON_INTERPRET=1, no GPU) only
TRITON_CPU = triton_available() and scores_triton.interpreted()

pytestmark = pytest.mark.slow  # spawned process groups: seconds per world size

F64 = 1e-10
F32 = 1e-5
SHARDS = {2: [7, 30], 3: [11, 0, 26]}  # unequal, and one empty shard for P = 3
N, DIM, M = 37, 6, 3
SIG, SIGS, SIG_T = 1.3, [0.7, 1.3, 4.0], 0.8


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """The global set: far from the origin (centring matters), prompts in 3 clusters."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(N, DIM, generator=g, dtype=torch.float64) + 50.0
    labels = torch.randint(0, 3, (N,), generator=g)
    t = 2.0 * torch.nn.functional.one_hot(labels, 3).double() + 0.1 * torch.randn(
        N, M, generator=g, dtype=torch.float64
    )
    return x, t


def _shard(a: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    lo = sum(sizes[:rank])
    return a[lo : lo + sizes[rank]]


def _catch(fn) -> tuple[str, str] | None:
    try:
        fn()
    except (TypeError, ValueError) as exc:
        return type(exc).__name__, str(exc)
    return None


# --------------------------------------------------------------------------- spawned ranks


def _checks(rank: int, world: int) -> dict:
    sizes = SHARDS[world]
    x, t = _data()
    xl, tl = _shard(x, sizes, rank), _shard(t, sizes, rank)
    res: dict = {}
    res["rke"] = D.rke_score(xl, SIG)
    res["comm"] = dict(C.last_comm)
    res["rke_many"] = D.rke_score(xl, SIGS)
    res["rke_median"] = D.rke_score(xl, None)
    res["rke_numpy"] = D.rke_score(xl.numpy(), SIG)
    res["rke_f32"] = D.rke_score(xl.float(), SIG)
    res["cond"] = D.cond_rke_score(xl, tl, SIG, SIG_T)
    res["cond_many"] = D.cond_rke_score(xl, tl, SIGS, SIG_T)
    res["ent"] = D.rke_entropies(xl, tl, SIGS, SIG_T)
    res["grad"] = D.rke_score(xl.clone().requires_grad_(True), SIG).requires_grad
    if TRITON_CPU:  # the fused kernel's shards (interpreter on CPU): the same sums
        res["rke_triton"] = D.rke_score(xl.float(), SIGS, backend="triton")
        res["ent_triton"] = D.rke_entropies(xl.float(), tl.float(), SIGS, SIG_T, backend="triton")
        xc = (x - x.mean(0)).float()
        part = scores_triton.forward_sums(xc, None, (1 / SIG**2,), None, shard=(rank, world))[0]
        res["triton_part"] = float(part[0])

    # bad input on one rank: that rank raises its own error, every other rank names it
    last = world - 1
    bad = xl.clone()
    if rank == last:
        bad[0, 0] = float("nan")
    res["err_nan"] = _catch(lambda: D.rke_score(bad, SIG))
    res["err_empty"] = _catch(lambda: D.rke_score(torch.zeros(0, DIM), SIG))
    wide = torch.ones(2, DIM + (rank == 0))
    res["err_width"] = _catch(lambda: D.rke_score(wide, SIG))
    res["err_sigma_differs"] = _catch(lambda: D.rke_score(xl, SIG + (rank == 0)))
    # the same bandwidths in another order would add sums of different kernels
    res["err_sigma_order"] = _catch(lambda: D.rke_score(xl, SIGS[::-1] if rank == 0 else SIGS))
    res["own_tiles"] = len(list(scores_torch.tiles(N, shard=(rank, world))))
    rows = tl[:-1] if rank == last else tl
    res["err_rows"] = _catch(lambda: D.cond_rke_score(xl, rows, SIG, SIG_T))
    res["err_sigma"] = _catch(lambda: D.rke_score(xl, -1.0 if rank == 0 else SIG))
    res["after_errors"] = D.rke_score(xl, SIG)  # the group still works

    # streaming metric: local batches of 4 (4 does not divide the shards), compute syncs
    metric = RKEMetric(SIGS, SIG_T)
    for i in range(0, xl.shape[0], 4):
        metric.update(xl[i : i + 4], tl[i : i + 4])
    res["metric"] = metric.compute()
    res["metric_local"] = RKEMetric(SIG, sync_on_compute=False)
    if xl.shape[0]:
        res["metric_local"].update(xl)
        res["metric_local"] = res["metric_local"].compute().rke
    else:
        res["metric_local"] = None
    if world == 2:  # torchmetrics takes seconds to import: its sync is checked with P = 2
        from rkekernels.metrics import TorchMetricsRKE

        tm = TorchMetricsRKE(SIG, SIG_T)
        for i in range(0, xl.shape[0], 5):
            tm.update(xl[i : i + 5], tl[i : i + 5])
        res["torchmetrics"] = tm.compute()
        res["torchmetrics_local_n"] = int(tm.n)  # unsynced again after compute
    res["metric_empty"] = _catch(lambda: RKEMetric(SIG).compute())
    # Vendi by random features: covariance states added across ranks (one all-reduce)
    vm = VendiMetric(SIG, SIG_T, dim=64, seed=1)
    for i in range(0, xl.shape[0], 4):
        vm.update(xl[i : i + 4], tl[i : i + 4])
    res["vendi_metric"] = vm.compute()
    if world == 2:
        from rkekernels.metrics import TorchMetricsVendi

        tv = TorchMetricsVendi(SIG, SIG_T, dim=64, seed=1)
        for i in range(0, xl.shape[0], 5):
            tv.update(xl[i : i + 5], tl[i : i + 5])
        res["torchmetrics_vendi"] = tv.compute()

    # a shared bank: each rank commits its own rows (the empty shard commits nothing)
    bank = D.SharedFeatureBank(100, dtype=torch.float64)
    bank.add(xl, tl)
    bank.add(xl[:2] + 1.0, tl[:2])
    res["bank_features"] = bank.features.clone()
    res["bank_cond"] = bank.cond.clone()
    plain = rkekernels.FeatureBank(100, dtype=torch.float64)
    res["commit_count"] = D.all_gather_commit(plain, xl)
    res["plain_features"] = plain.features.clone()
    res["bank_err"] = _catch(lambda: bank.add(xl[:1, :2] if rank == 0 else xl[:1], tl[:1]))
    guide = rkekernels.DiversityGuidance(sigma=0.5, capacity=50)
    mine = torch.eye(4)[rank].reshape(1, 2, 2)  # normalised features: the unit vector e_rank
    guide.commit(mine)  # local, before sharing
    D.share_bank(guide)
    guide.commit(mine.repeat(rank + 1, 1, 1))
    res["guide_bank"] = guide.bank.features.clone()

    res["torchmetrics_imported"] = "torchmetrics" in sys.modules
    if world == 3:  # a subgroup: ranks 0 and 2 only
        sub = dist.new_group([0, 2])
        if rank in (0, 2):
            res["sub"] = D.rke_score(xl, SIG, group=sub)
    return res


def _entry(rank: int, world: int) -> dict:
    # tiny tiles: N = 37 rows make 5 x 5 blocks, so every rank reduces tiles of its own (with
    # the default 1024-row tiles rank 0 would hold the only tile and the others add zeros)
    scores_torch.BLOCK_ROWS = scores_torch.BLOCK_COLS = 8
    if TRITON_CPU:  # 16-row tiles: 3 x 3 blocks, 6 programs over the ranks
        triton_tuning.FWD_INTERP = dict(triton_tuning.FWD_INTERP, BLOCK=16)
    return _checks(rank, world)


@pytest.fixture(scope="module", params=[2, 3], ids=["P2", "P3"])
def ranks(request):
    world = request.param
    return world, spawn_ranks(_entry, world)


# --------------------------------------------------------------------------- assertions


def test_scores_equal_one_process(ranks):
    _, results = ranks
    x, t = _data()
    ref_many = torch.stack([reference.rke_score(x, s) for s in SIGS])
    for res in results:
        close(res["rke"], rkekernels.rke_score(x, SIG))
        close(res["rke"], reference.rke_score(x, SIG))
        close(res["rke_many"], ref_many)
        close(res["rke_median"], rkekernels.rke_score(x, None))
        assert isinstance(res["rke_numpy"], float)
        close(res["rke_numpy"], reference.rke_score(x, SIG))
        assert res["rke_f32"].dtype == torch.float32
        close(res["rke_f32"], reference.rke_score(x.float(), SIG), F32)
        close(res["cond"], reference.cond_rke_score(x, t, SIG, SIG_T))
        close(res["cond_many"], rkekernels.cond_rke_score(x, t, SIGS, SIG_T))
        want = rkekernels.rke_entropies(x, t, SIGS, SIG_T)
        for got_v, want_v in zip(res["ent"], want):
            close(got_v, want_v.detach())
        assert res["grad"] is False  # documented: detached
        close(res["after_errors"], res["rke"], 0.0)
    # bitwise the same value on every rank
    for res in results[1:]:
        assert torch.equal(res["rke"], results[0]["rke"])


@pytest.mark.skipif(not TRITON_CPU, reason="gloo's CPU tensors need the Triton interpreter")
def test_triton_shards_equal_one_process(ranks):
    # the fused kernel on each rank's programs (CUDA uses it by default; the interpreter here)
    _, results = ranks
    x, t = _data()
    x32, t32 = x.float(), t.float()
    want = rkekernels.rke_entropies(x32, t32, SIGS, SIG_T)
    for res in results:
        close(res["rke_triton"], torch.stack([reference.rke_score(x32, s) for s in SIGS]), F32)
        for got_v, want_v in zip(res["ent_triton"], want):
            close(got_v, want_v.detach(), F32)
    # the shards partition the tiles: every rank adds a part, the parts add up to the whole
    parts = [res["triton_part"] for res in results]
    whole = float(reference.pair_sums(x32, sigma=SIG)[0])
    assert all(p > 0 for p in parts) and abs(sum(parts) / whole - 1) <= F32


def test_communication_volume(ranks):
    world, results = ranks
    nmax = max(SHARDS[world])
    for res in results:
        meta = world * (7 + 3) * 8  # the layout (7 numbers), then (many, sigma, sigma_t)
        assert res["comm"]["gathered_bytes"] == meta + world * nmax * DIM * 8
        assert res["comm"]["reduced_bytes"] == 8  # one float64 sum


def test_bad_input_raises_on_every_rank(ranks):
    world, results = ranks
    last = world - 1
    for rank, res in enumerate(results):
        kind, msg = res["err_nan"]
        assert kind == "ValueError"
        if rank == last:
            assert "x_local contains NaN" in msg
        else:
            assert f"invalid on rank(s) [{last}]" in msg
        assert res["err_empty"][0] == "ValueError"
        assert "global n = 0" in res["err_empty"][1]
        assert "different number of features" in res["err_width"][1]
        assert "same on every rank" in res["err_sigma_differs"][1]
        assert "same on every rank, in the same order" in res["err_sigma_order"][1]
        assert res["own_tiles"] >= 3  # this rank's share of the 15 upper-triangle tiles
        # the rank at fault raises its own message, every other rank names it
        if rank == last:
            assert "same number of rows" in res["err_rows"][1]
        else:
            assert f"invalid on rank(s) [{last}]" in res["err_rows"][1]
        if rank == 0:
            assert "sigma must be finite and > 0" in res["err_sigma"][1]
        else:
            assert "invalid on rank(s) [0]" in res["err_sigma"][1]
        assert "before any update" in res["metric_empty"][1]


def test_metric_syncs_across_ranks(ranks):
    world, results = ranks
    x, t = _data()
    sizes = SHARDS[world]
    want = rkekernels.rke_entropies(x, t, SIGS, SIG_T)
    for rank, res in enumerate(results):
        m = res["metric"]
        close(m.rke, torch.stack([reference.rke_score(x, s) for s in SIGS]))
        close(m.cond_rke, rkekernels.cond_rke_score(x, t, SIGS, SIG_T))
        for got_v, want_v in zip(m.entropies, want):
            close(got_v, want_v.detach())
        if world == 2:
            tm = res["torchmetrics"]
            close(tm.rke, reference.rke_score(x, SIG))
            close(tm.cond_rke, reference.cond_rke_score(x, t, SIG, SIG_T))
            assert res["torchmetrics_local_n"] == sizes[rank]
        local = _shard(x, sizes, rank)
        if sizes[rank]:
            close(res["metric_local"], reference.rke_score(local, SIG))


def test_vendi_metric_syncs_across_ranks(ranks):
    world, results = ranks
    x, t = _data()
    want = rkekernels.vendi_score(x, 1.0, SIG, method="rff", dim=64, seed=1)
    want_c = rkekernels.cond_vendi_score(x, t, 1.0, SIG, SIG_T, method="rff", dim=64, seed=1)
    for res in results:
        close(res["vendi_metric"].vendi, want)
        close(res["vendi_metric"].cond_vendi, want_c)
        if world == 2:
            close(res["torchmetrics_vendi"].vendi, want)
            close(res["torchmetrics_vendi"].cond_vendi, want_c)


def test_bank_shared(ranks):
    world, results = ranks
    x, t = _data()
    sizes = SHARDS[world]
    extra_x = torch.cat([_shard(x, sizes, r)[:2] + 1.0 for r in range(world)])
    extra_t = torch.cat([_shard(t, sizes, r)[:2] for r in range(world)])
    for rank, res in enumerate(results):
        assert torch.equal(res["bank_features"], torch.cat([x, extra_x]))
        assert torch.equal(res["bank_cond"], torch.cat([t, extra_t]))
        assert res["commit_count"] == N
        assert torch.equal(res["plain_features"], x)
        kind, msg = res["bank_err"]
        assert kind == "ValueError"
        assert ("width" in msg) if rank == 0 else ("rank(s) [0]" in msg)
        # guidance bank: own local commit first, then every rank's shared commit in rank order
        guide = res["guide_bank"]
        order = [rank] + [r for r in range(world) for _ in range(r + 1)]
        assert torch.equal(guide, torch.eye(4)[order])


def test_subgroup(ranks):
    world, results = ranks
    if world != 3:  # the subgroup case runs with 3 ranks only
        assert all("sub" not in res for res in results)
        return
    # P = 3 never touched TorchMetricsRKE: importing rkekernels(.metrics) did not need torchmetrics
    assert not any(res["torchmetrics_imported"] for res in results)
    x, _ = _data()
    sizes = SHARDS[3]
    union = torch.cat([_shard(x, sizes, 0), _shard(x, sizes, 2)])
    for r in (0, 2):
        close(results[r]["sub"], reference.rke_score(union, SIG))
    assert "sub" not in results[1]


# --------------------------------------------------------------------------- one process


def test_fallback_without_process_group():
    assert not D.is_distributed()
    x, t = _data()
    xr = x.clone().requires_grad_(True)
    got = D.rke_score(xr, SIG)
    close(got.detach(), reference.rke_score(x, SIG))
    assert got.requires_grad  # the one-process path keeps autograd
    close(D.cond_rke_score(x, t, SIGS, SIG_T), rkekernels.cond_rke_score(x, t, SIGS, SIG_T))
    for a, b in zip(D.rke_entropies(x, t, SIG, SIG_T), rkekernels.rke_entropies(x, t, SIG, SIG_T)):
        close(a, b)
    assert isinstance(D.rke_score(x.numpy(), SIG), float)


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: D.rke_score(torch.zeros(0, 3), 1.0), ValueError, "empty"),
        (lambda: D.rke_score(torch.ones(4), 1.0), ValueError, "2-D"),
        (lambda: D.rke_score(torch.ones(4, 2), 0.0), ValueError, "sigma"),
        (lambda: D.rke_score(torch.tensor([[float("inf")]]), 1.0), ValueError, "NaN or Inf"),
        (lambda: D.rke_score(np.array([["a"]]), 1.0), TypeError, "string"),
        (lambda: D.rke_score(np.ones((2, 2), complex), 1.0), TypeError, "complex"),
        (lambda: D.cond_rke_score(torch.ones(3, 2), None, 1.0, 1.0), ValueError, "t_local"),
        (lambda: D.rke_entropies(torch.ones(3, 2), None, 1.0, 1.0), ValueError, "t_local"),
        (lambda: D.cond_rke_score(torch.ones(3, 2), torch.ones(2, 2), 1.0, 1.0), ValueError, "n"),
        (lambda: D.all_gather_commit(rkekernels.FeatureBank(3), torch.ones(3)), ValueError, "2-D"),
    ],
)
def test_bad_input_one_process(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_bad_input_distributed_path_validation():
    """The local validation of the distributed path (it runs before any collective)."""
    cases = [
        (lambda: _bandwidth._shard(torch.ones(4), None, 1.0, None, False), "2-D"),
        (lambda: _bandwidth._shard(torch.ones(2, 2, 2), None, 1.0, None, False), "reshape"),
        (lambda: _bandwidth._shard(torch.ones(3, 0), None, 1.0, None, False), "d = 0"),
        (lambda: _bandwidth._shard(torch.ones(3, 2), None, float("nan"), None, False), "sigma"),
        (lambda: _bandwidth._shard(torch.ones(3, 2), None, 1.0, None, True), "t_local is None"),
        (
            lambda: _bandwidth._shard(torch.ones(3, 2), torch.ones(3, 1), 1.0, [1, 2], True),
            "single",
        ),
        (lambda: _bandwidth._shard(torch.ones(3, 2), torch.ones(2, 1), 1.0, 1.0, True), "rows"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
    xt, tt, sig, many, st = _bandwidth._shard(torch.zeros(0, 5), torch.zeros(0, 2), 1.0, 2.0, True)
    assert xt.shape == (0, 5) and tt.shape == (0, 2) and sig == [1.0] and st == 2.0
    assert not many


def test_commit_one_process():
    bank = D.SharedFeatureBank(5)
    assert D.all_gather_commit(bank, torch.zeros(0, 3)) == 0  # nothing to add: no-op
    bank.add(torch.eye(3), torch.ones(3, 2))
    with pytest.raises(ValueError, match="width"):
        bank.add(torch.ones(1, 4), torch.ones(1, 2))
    with pytest.raises(ValueError, match="cond missing"):
        bank.add(torch.ones(1, 3))
    with pytest.raises(ValueError, match="NaN or Inf"):
        bank.add(torch.full((1, 3), float("nan")), torch.ones(1, 2))
    sd = bank.state_dict()
    other = D.SharedFeatureBank(5)
    other.load_state_dict(sd)  # local, no collective
    assert torch.equal(other.features, bank.features)

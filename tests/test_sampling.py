"""DiversityGuidance: the update rule against the float64 reference, the schedule, the bank,
feature_fn (one VJP), and bad input."""

import math

import pytest
import torch

from rkekernels import DiversityGuidance, features
from rkekernels import reference as ref
from rkekernels.guidance_defaults import STEP_RULES
from tests.conftest import TOL, gen, rel


def _ref_update(z, bank, scale, fade=None, **kw):
    """z_a + f_a scale ||z_a|| / ||g_a|| g_a with g from the float64 reference (autograd)."""
    g, _ = ref.guidance_grad(z, bank, **kw)
    z64 = z.double().reshape(len(z), -1)
    g = g.reshape(len(z), -1)
    gn = g.norm(dim=1, keepdim=True)
    step = torch.where(gn > 0, g / gn, torch.zeros_like(g)) * z64.norm(dim=1, keepdim=True)
    if fade is not None:
        step = step * fade.reshape(-1, 1)
    return (z64 + scale * step).reshape(z.shape)


def _ref_fade(c, bank_c, sigma_cond, include_batch=True):
    """f_a = min(1, max_j w_aj / 0.05), w_aj = exp(-||c_a - c_j||^2 / s^2), float64, by loops."""
    out = []
    for a in range(len(c)):
        others = [bank_c[j] for j in range(len(bank_c))]
        if include_batch:
            others += [c[j] for j in range(len(c)) if j != a]
        w = max(
            math.exp(-float(((c[a].double() - o.double()) ** 2).sum()) / sigma_cond**2)
            for o in others
        )
        out.append(min(1.0, w / 0.05))
    return torch.tensor(out, dtype=torch.float64)


# ----------------------------------------------------------------------------- the update


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("include_batch", [True, False])
def test_apply_matches_reference(dtype, normalize, include_batch):
    bank_z = torch.randn(7, 3, 5, 3, generator=gen(1), dtype=dtype)
    z = torch.randn(3, 3, 5, 3, generator=gen(2), dtype=dtype)
    guide = DiversityGuidance(
        2.5,
        scale=0.2,
        normalize=normalize,
        include_batch=include_batch,
        capacity=50,
        bank_dtype=dtype,
    )
    guide.commit(bank_z)
    assert len(guide.bank) == 7
    out = guide.apply(z)
    assert out.shape == z.shape and out.dtype == dtype
    expect = _ref_update(
        z,
        ref.features(bank_z, normalize),
        0.2,
        sigma=2.5,
        normalize=normalize,
        include_batch=include_batch,
    )
    assert rel(out, expect) <= TOL[dtype]
    # each sample moved by exactly scale * ||z_a||
    moved = (out.double() - z.double()).reshape(3, -1).norm(dim=1)
    target = 0.2 * z.double().reshape(3, -1).norm(dim=1)
    assert torch.allclose(moved, target, rtol=TOL[dtype] * 10)
    # the log S of the step is kept for logging
    assert guide.last is not None and guide.last.log_s.shape == (3,)


@pytest.mark.parametrize("step_rule", ["paper", "prompt_fade"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_conditional_apply_matches_reference(dtype, step_rule):
    bank_z = torch.randn(6, 10, generator=gen(3), dtype=dtype)
    bank_c = torch.randn(6, 4, generator=gen(4), dtype=dtype)
    z = torch.randn(2, 10, generator=gen(5), dtype=dtype)
    c = 1.5 * torch.randn(2, 4, generator=gen(6), dtype=dtype)
    guide = DiversityGuidance(
        1.3, sigma_cond=0.9, scale=0.07, bank_dtype=dtype, step_rule=step_rule
    )
    guide.commit(bank_z, bank_c)
    assert torch.allclose(guide.bank.cond.double(), bank_c.double())
    out = guide.apply(z, c)
    fade = _ref_fade(c, bank_c, 0.9) if step_rule == "prompt_fade" else None
    if fade is not None:
        assert ((fade < 1) & (fade > 1e-3)).any()  # a partial fade
    expect = _ref_update(
        z,
        ref.features(bank_z),
        0.07,
        fade=fade,
        cond=c,
        bank_cond=bank_c,
        sigma=1.3,
        sigma_cond=0.9,
    )
    assert rel(out, expect) <= TOL[dtype]
    # a single prompt embedding (m,) stands for every sample
    one = DiversityGuidance(1.3, sigma_cond=0.9, scale=0.07, bank_dtype=dtype, step_rule=step_rule)
    one.commit(bank_z, bank_c)
    out1 = one.apply(z, c[0])
    out2 = guide.apply(z, c[0].expand(2, -1))
    assert torch.equal(out1, out2)


def test_prompt_fade_bounds():
    """All prompt weights <= 1e-3: at most 5% of a matching prompt's step; a weight >= tau:
    exactly the paper's step; unconditional guidance is never faded."""
    d = 768
    bank_z = torch.randn(5, d, generator=gen(7))
    z = torch.randn(2, d, generator=gen(8))
    bank_c = torch.zeros(5, 3)
    bank_c[:, 0] = 1.0
    s_c = 0.45
    far = math.sqrt(-math.log(1e-3)) * s_c  # ||y - c|| giving w = 1e-3 exactly
    c = torch.tensor([[1.0, 0.0, 0.0], [1.0, far, 0.0]])  # matching, unrelated (w = 1e-3)
    moves = {}
    for rule in ("paper", "prompt_fade"):
        g = DiversityGuidance(1.0, sigma_cond=s_c, scale=0.1, include_batch=False, step_rule=rule)
        g.commit(bank_z, bank_c)
        moves[rule] = (g.apply(z, c) - z).norm(dim=1) / z.norm(dim=1)
    assert torch.allclose(moves["paper"], torch.tensor([0.1, 0.1]), rtol=1e-5)
    assert torch.allclose(moves["prompt_fade"][0], torch.tensor(0.1), rtol=1e-5)  # w = 1
    ratio = float(moves["prompt_fade"][1] / moves["prompt_fade"][0])
    assert ratio <= 0.05 and ratio == pytest.approx(1e-3 / 0.05, rel=1e-3)
    # w just above tau: the paper's step exactly
    g = DiversityGuidance(1.0, sigma_cond=s_c, include_batch=False)
    g.commit(bank_z, bank_c)
    near = math.sqrt(-math.log(0.051)) * s_c
    assert torch.equal(g.step_fade(torch.tensor([[1.0, near, 0.0]])), torch.ones(1))
    # with include_batch a batch mate with the same prompt counts: no fade
    g = DiversityGuidance(1.0, sigma_cond=s_c)
    g.commit(bank_z, bank_c)
    same = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    assert torch.equal(g.step_fade(same), torch.ones(2))
    assert DiversityGuidance(1.0).step_fade(None) is None
    assert DiversityGuidance(1.0, sigma_cond=s_c, step_rule="paper").step_fade(c) is None
    with pytest.raises(ValueError, match="step_rule must be one of"):
        DiversityGuidance(1.0, step_rule="fade")


def test_zero_gradient_does_not_move_and_stays_finite():
    guide = DiversityGuidance(1.0, scale=0.3)
    z = torch.randn(1, 4, 4, generator=gen(7))
    out = guide.apply(z)  # empty bank, b = 1: g = 0
    assert torch.equal(out, z)
    assert guide.last.log_s.item() == -math.inf
    # several samples but nothing to compare against
    alone = DiversityGuidance(1.0, scale=0.3, include_batch=False)
    z3 = torch.randn(3, 4, generator=gen(8))
    assert torch.equal(alone.apply(z3), z3)
    # a sample sitting exactly on a bank entry of a one-entry bank: g = 0, no NaN
    on = DiversityGuidance(1.0, scale=0.3, include_batch=False)
    on.commit(z3[:1])
    out = on.apply(z3[:1])
    assert torch.isfinite(out).all() and torch.allclose(out, z3[:1])


def test_scale_zero_returns_the_input_itself():
    guide = DiversityGuidance(1.0, scale=0.0)
    guide.commit(torch.randn(4, 6, generator=gen(9)))
    z = torch.randn(2, 6, generator=gen(10))
    assert guide.apply(z) is z
    assert guide.last is None


def test_extreme_inputs_stay_finite():
    z = 1e6 * torch.randn(3, 8, generator=gen(11))
    for sigma in (1e-4, 1e4):
        guide = DiversityGuidance(sigma, scale=0.1, normalize=False)
        guide.commit(1e6 * torch.randn(5, 8, generator=gen(12)))
        out = guide.apply(z)
        assert torch.isfinite(out).all()


def test_half_precision_latents():
    guide = DiversityGuidance(1.0, scale=0.1)
    guide.commit(torch.randn(4, 2, 4, 4, generator=gen(13)).half())
    z = torch.randn(2, 2, 4, 4, generator=gen(14)).half()
    out = guide.apply(z)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    expect = _ref_update(z, guide.bank.features, 0.1, sigma=1.0)
    assert rel(out, expect) <= 2e-3  # float16 output rounding


def test_works_under_no_grad_and_does_not_track_gradients():
    guide = DiversityGuidance(1.0, scale=0.1, feature_fn=lambda z: torch.tanh(z) * 2)
    guide.commit(torch.randn(3, 5, generator=gen(15)))
    z = torch.randn(2, 5, generator=gen(16))
    with torch.no_grad():
        out = guide.apply(z)
    assert not out.requires_grad
    assert not torch.equal(out, z)
    with torch.no_grad():
        guide.commit(out)
    assert len(guide.bank) == 5


# ----------------------------------------------------------------------------- feature_fn


@pytest.mark.parametrize("include_batch", [True, False])
def test_feature_fn_gradient_is_one_vjp_of_the_reference(include_batch):
    w = torch.randn(12, 7, generator=gen(17), dtype=torch.float64)

    def feature_fn(z):  # (b, 3, 4) -> (b, 7), nonlinear
        return torch.tanh(z.reshape(len(z), -1) @ w.to(z.dtype))

    bank_z = torch.randn(5, 3, 4, generator=gen(18), dtype=torch.float64)
    z = torch.randn(3, 3, 4, generator=gen(19), dtype=torch.float64)
    guide = DiversityGuidance(
        0.8, feature_fn=feature_fn, include_batch=include_batch, bank_dtype=torch.float64
    )
    guide.commit(bank_z)
    # the bank stores features(feature_fn(latents))
    assert torch.allclose(guide.bank.features.double(), ref.features(feature_fn(bank_z)))
    res = guide.grad(z)
    assert res.grad.shape == z.shape
    zz = z.clone().requires_grad_(True)
    log_s = ref.guidance_log_s(
        feature_fn(zz),
        ref.features(feature_fn(bank_z)),
        sigma=0.8,
        include_batch=include_batch,
    )
    (expect,) = torch.autograd.grad(log_s.sum(), zz)
    assert rel(res.grad, -expect) <= 1e-10
    assert torch.allclose(res.log_s.double(), log_s.detach(), rtol=1e-10)


def test_feature_fn_errors():
    guide = DiversityGuidance(1.0, feature_fn=lambda z: z.detach() * 2)
    guide.commit(torch.randn(2, 3, generator=gen(20)))
    with pytest.raises(ValueError, match="feature_fn output does not depend"):
        guide.apply(torch.randn(2, 3, generator=gen(21)))
    bad = DiversityGuidance(1.0, feature_fn=lambda z: z[:1])
    bad.commit(torch.randn(1, 3, generator=gen(22)))
    with pytest.raises(ValueError, match="feature_fn must return"):
        bad.apply(torch.randn(2, 3, generator=gen(23)))
    with pytest.raises(TypeError, match="feature_fn"):
        DiversityGuidance(1.0, feature_fn=3)


# ----------------------------------------------------------------------------- schedule


@pytest.mark.parametrize(
    "every, start, stop",
    [(1, 0.0, 1.0), (3, 0.0, 1.0), (2, 0.25, 0.75), (4, 0.5, 1.0), (1, 0.3, 0.3), (5, 0.0, 0.1)],
)
def test_schedule_selects_exactly_the_intended_steps(every, start, stop):
    steps = 20
    guide = DiversityGuidance(1.0, scale=0.1, every=every, start=start, stop=stop)
    guide.commit(torch.randn(3, 4, generator=gen(24)))
    z = torch.randn(2, 4, generator=gen(25))
    for _ in range(2):  # two batches: commit restarts the count
        guided = [k for k in range(steps) if guide.apply(z, progress=k / steps) is not z]
        expect = [k for k in range(steps) if k % every == 0 and start <= k / steps <= stop]
        assert guided == expect
        assert guided == [k for k in range(steps) if guide.active(k, k / steps)]
        assert guide.calls == steps
        guide.commit(z)
        assert guide.calls == 0


def test_schedule_explicit_step_and_reset():
    guide = DiversityGuidance(1.0, scale=0.1, every=3)
    guide.commit(torch.randn(3, 4, generator=gen(26)))
    z = torch.randn(2, 4, generator=gen(27))
    assert guide.apply(z, step=4) is z and guide.calls == 5
    assert guide.apply(z) is z  # call 5
    assert guide.apply(z) is not z  # call 6
    guide.reset()
    assert guide.calls == 0 and guide.apply(z) is not z
    # without a window, progress may be omitted
    assert guide.active(9) and not guide.active(10)


def test_progress_required_when_windowed():
    guide = DiversityGuidance(1.0, start=0.2)
    with pytest.raises(ValueError, match="progress is required"):
        guide.apply(torch.randn(2, 3))
    with pytest.raises(ValueError, match="progress must be in"):
        guide.apply(torch.randn(2, 3), progress=1.5)
    with pytest.raises(ValueError, match="progress must be in"):
        guide.apply(torch.randn(2, 3), progress=float("nan"))
    with pytest.raises(ValueError, match="step must be"):
        guide.active(-1, 0.5)


# ----------------------------------------------------------------------------- the bank


def test_commit_stores_features_and_respects_capacity():
    guide = DiversityGuidance(1.0, capacity=5, normalize=True)
    batches = [torch.randn(2, 3, 3, generator=gen(30 + i)) for i in range(4)]
    for x in batches:
        guide.commit(x)
    assert len(guide.bank) == 5
    newest = torch.cat(batches)[-5:]
    assert torch.allclose(guide.bank.features, features(newest), atol=1e-6)
    raw = DiversityGuidance(1.0, normalize=False)
    raw.commit(batches[0])
    assert torch.allclose(raw.bank.features, batches[0].reshape(2, -1))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"sigma": 0.0}, ValueError, "sigma must be finite and > 0"),
        ({"sigma": float("nan")}, ValueError, "sigma must be finite"),
        ({"sigma": "1"}, TypeError, "sigma must be a positive float"),
        ({"sigma": 1.0, "sigma_cond": -1.0}, ValueError, "sigma_cond must be finite"),
        ({"sigma": 1.0, "scale": float("inf")}, ValueError, "scale must be finite"),
        ({"sigma": 1.0, "scale": float("nan")}, ValueError, "scale must be finite"),
        ({"sigma": 1.0, "scale": "big"}, TypeError, "scale must be a finite float"),
        ({"sigma": 1.0, "every": 0}, ValueError, "every must be an int >= 1"),
        ({"sigma": 1.0, "every": 2.0}, TypeError, "every must be an int"),
        ({"sigma": 1.0, "every": True}, TypeError, "every must be an int"),
        ({"sigma": 1.0, "start": -0.1}, ValueError, "start must be in"),
        ({"sigma": 1.0, "stop": 1.5}, ValueError, "stop must be in"),
        ({"sigma": 1.0, "start": 0.6, "stop": 0.4}, ValueError, "start must be <= stop"),
        ({"sigma": 1.0, "start": "0"}, TypeError, "start must be a float"),
        ({"sigma": 1.0, "capacity": 0}, ValueError, "capacity must be an int >= 1"),
        ({"sigma": 1.0, "capacity": 10.0}, TypeError, "capacity must be an int"),
        ({"sigma": 1.0, "normalize": "yes"}, TypeError, "normalize must be True or False"),
        ({"sigma": 1.0, "include_batch": 1}, TypeError, "include_batch must be True or False"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    sigma = kwargs.pop("sigma")
    with pytest.raises(exc, match=match):
        DiversityGuidance(sigma, **kwargs)


def test_bad_cond_and_latents():
    cond_guide = DiversityGuidance(1.0, sigma_cond=0.5)
    plain = DiversityGuidance(1.0)
    z = torch.randn(2, 3)
    with pytest.raises(ValueError, match="cond is required"):
        cond_guide.apply(z)
    with pytest.raises(ValueError, match="cond is required"):
        cond_guide.commit(z)
    with pytest.raises(ValueError, match="cond is required"):
        cond_guide.grad(z)
    plain.commit(z)  # sigma_cond=None: a cond after prompt-less rows is refused
    with pytest.raises(ValueError, match="committed without cond"):
        plain.apply(z, torch.randn(2, 4))
    with pytest.raises(ValueError, match="committed without cond"):
        plain.commit(z, torch.randn(2, 4))
    with pytest.raises(ValueError, match="cond has 3 rows but latents has 2"):
        cond_guide.apply(z, torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"pool token embeddings"):
        cond_guide.apply(z, torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="cond contains NaN"):
        cond_guide.apply(z, torch.full((2, 4), float("nan")))
    with pytest.raises(TypeError, match="latents must be a torch tensor"):
        plain.apply([[1.0, 2.0]])
    with pytest.raises(ValueError, match="latents must be"):
        plain.apply(torch.zeros(0, 3))
    with pytest.raises(TypeError, match="latents must be floating point"):
        plain.apply(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="z contains NaN"):
        plain.apply(torch.full((2, 3), float("nan")))
    plain.commit(torch.randn(2, 3))
    with pytest.raises(ValueError, match="width"):
        plain.commit(torch.randn(2, 4))  # the bank's feature width is fixed


def test_repr_and_flags():
    g = DiversityGuidance(1.0, sigma_cond=0.5, every=10, start=0.1, stop=0.9)
    assert g.conditional and g.windowed
    assert "every=10" in repr(g) and "sigma_cond=0.5" in repr(g)
    assert not DiversityGuidance(1.0).windowed


def test_step_rules_example_mixed_prompts():
    """examples/step_rules.py (the docs' table): the fade leaves a sample of an unrelated prompt
    (nearly) where it was and a related prompt exactly as under the paper's rule."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "step_rules.py"
    spec = importlib.util.spec_from_file_location("step_rules", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.run(routes=mod.ROUTES[1:])  # the two routes with the plain log objective
    rows = {(r["route"], r["objective"], r["rule"], r["prompt"]): r for r in rows}
    for route, objective in (("apply", "log"), ("guided_denoiser", "log")):
        paper, fade = (rows[(route, objective, rule, 2)]["moved"] for rule in STEP_RULES[::-1])
        assert paper > 0.1 and fade <= 0.05 * paper  # unrelated prompt: faded
        related = [rows[(route, objective, rule, 1)]["moved"] for rule in STEP_RULES]
        assert related[0] == pytest.approx(related[1], rel=1e-6) and related[0] > 0.1

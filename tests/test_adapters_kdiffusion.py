"""guided_denoiser: classifier guidance D + scale sigma^2 g inside a k-diffusion style Euler loop,
on an exact Gaussian-mixture denoiser (rkekernels.toy)."""

import math

import pytest
import torch

from rkekernels import DiversityGuidance
from rkekernels import reference as ref
from rkekernels.adapters.kdiffusion import GuidedDenoiser, guided_denoiser
from rkekernels.toy import GaussianMixture, get_sigmas_karras, sample_euler
from tests.conftest import gen

pytestmark = pytest.mark.usefixtures("one_thread")


def _mixture():
    """Six modes on a circle of radius 2 (10 std apart), one of them holding 90% of the mass."""
    k = 6
    angles = 2 * math.pi * torch.arange(k) / k
    means = 2.0 * torch.stack([angles.cos(), angles.sin()], dim=1)
    weights = torch.tensor([0.9] + [0.1 / (k - 1)] * (k - 1))
    return GaussianMixture(means, weights, std=0.1)


def _generate(gm, sigmas, guide, seed, batches=8, b=4):
    """Batches sampled one after another; with guidance each finished batch joins the bank."""
    g = gen(seed)
    out = []
    for _ in range(batches):
        x = sigmas[0] * torch.randn(b, 2, generator=g)
        if guide is None:
            out.append(sample_euler(gm.denoise, x, sigmas))
        else:
            den = guided_denoiser(gm.denoise, guide, sigmas=sigmas)
            samples = sample_euler(den, x, sigmas)
            guide.commit(samples)
            out.append(samples)
    return torch.cat(out)


@pytest.mark.slow
def test_guidance_covers_more_modes_at_equal_precision():
    gm = _mixture()
    sigmas = get_sigmas_karras(25, 0.01, 20.0)
    rows = []
    for seed in range(3):
        plain = _generate(gm, sigmas, None, seed)
        guide = DiversityGuidance(1.0, scale=1.0, normalize=False, start=0.4, stop=0.7)
        guided = _generate(gm, sigmas, guide, seed)
        assert torch.isfinite(guided).all()
        assert len(guide.bank) == len(guided) == 32
        rows.append(
            (
                seed,
                gm.modes_covered(plain),
                gm.modes_covered(guided),
                gm.precision(plain),
                gm.precision(guided),
            )
        )
    print("\nk-diffusion Euler, 25 Karras steps, 6 modes (one at 90%), 8 batches x 4 samples")
    print("guidance: sigma=1, normalize=False, scale=1 (raw), window progress [0.4, 0.7]")
    print("seed | modes unguided | modes guided | precision unguided | precision guided")
    for seed, mu, mg, pu, pg in rows:
        print(f"{seed:4d} | {mu:14d} | {mg:12d} | {pu:18.3f} | {pg:16.3f}")
    mean = [sum(r[i] for r in rows) / len(rows) for i in range(1, 5)]
    print(f"mean | {mean[0]:14.2f} | {mean[1]:12.2f} | {mean[2]:18.3f} | {mean[3]:16.3f}")
    for _, mu, mg, pu, pg in rows:
        assert mg >= mu
        assert pg >= 0.85 * pu  # precision within 15% of unguided
    assert mean[1] >= mean[0] + 1.5  # clearly more modes


@pytest.mark.parametrize(
    "every, start, stop",
    [(1, 0.0, 1.0), (3, 0.0, 1.0), (2, 0.3, 0.7), (1, 0.5, 0.5), (4, 0.2, 1.0)],
)
def test_schedule_from_sigmas_selects_the_intended_steps(every, start, stop):
    gm = _mixture()
    steps = 10
    sigmas = get_sigmas_karras(steps, 0.01, 20.0)
    guide = DiversityGuidance(1.0, scale=0.01, normalize=False, every=every, start=start, stop=stop)
    guide.commit(gm.sample(4, generator=gen(0)))
    den = guided_denoiser(gm.denoise, guide, sigmas=sigmas)
    sample_euler(den, sigmas[0] * torch.randn(3, 2, generator=gen(1)), sigmas)
    expect = [i for i in range(steps) if i % every == 0 and start <= i / steps <= stop]
    assert den.guided_steps == expect
    # an evaluation between grid points (a second-order sampler) belongs to the step it is in
    assert den.locate(float(sigmas[3] * 0.9 + sigmas[4] * 0.1)) == (3, 0.3)
    assert den.locate(float(sigmas[0]) * 1.5) == (0, 0.0)  # churn above sigma_max


def test_schedule_without_sigmas_counts_calls_and_uses_progress():
    guide = DiversityGuidance(1.0, scale=0.1, normalize=False, every=2)
    guide.commit(torch.randn(3, 2, generator=gen(2)))
    den = guided_denoiser(lambda x, s: x, guide)
    x = torch.randn(2, 2, generator=gen(3))
    moved = [not torch.equal(den(x, 1.0), x) for _ in range(5)]
    assert moved == [True, False, True, False, True]
    windowed = DiversityGuidance(1.0, scale=0.1, normalize=False, start=0.5)
    windowed.commit(torch.randn(3, 2, generator=gen(4)))
    den = guided_denoiser(lambda x, s: x, windowed, progress=lambda s: 1.0 - s / 10.0)
    assert torch.equal(den(x, 8.0), x)  # progress 0.2 < start
    assert not torch.equal(den(x, 2.0), x)  # progress 0.8


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_guided_denoiser_is_score_space_classifier_guidance(dtype):
    """D' = D + scale sigma^2 g, sigma a float or per sample, g from the float64 reference."""
    bank = torch.randn(5, 6, generator=gen(5), dtype=dtype)
    x = torch.randn(3, 6, generator=gen(6), dtype=dtype)
    guide = DiversityGuidance(1.5, scale=0.3, bank_dtype=dtype)
    guide.commit(bank)

    def model(x, sigma):
        return 0.5 * x

    den = guided_denoiser(model, guide)
    g, _ = ref.guidance_grad(0.5 * x, ref.features(bank), sigma=1.5)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for sigma in (0.7, torch.tensor([0.7, 1.1, 2.0], dtype=dtype)):
        out = den(x, sigma)
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
        expect = 0.5 * x.double() + 0.3 * s**2 * g
        assert out.dtype == dtype and out.shape == x.shape
        assert float((out.double() - expect).norm() / expect.norm()) <= tol


def test_jacobian_vjp_is_the_chain_rule_through_the_denoiser():
    """jacobian="vjp": D' = D + scale sigma^2 (dD/dx)^T g, under no_grad too; identity default."""
    bank = torch.randn(5, 4, generator=gen(7), dtype=torch.float64)
    x = torch.randn(3, 4, generator=gen(8), dtype=torch.float64)
    a = torch.randn(4, 4, generator=gen(9), dtype=torch.float64)
    guide = DiversityGuidance(1.5, scale=0.3)
    guide.commit(bank)

    def model(x, sigma):  # dD/dx = a
        return x @ a.T

    g, _ = ref.guidance_grad(x @ a.T, ref.features(bank), sigma=1.5)
    with torch.no_grad():  # the sampler's context
        out = guided_denoiser(model, guide, jacobian="vjp")(x, 0.7)
        plain = guided_denoiser(model, guide)(x, 0.7)
    assert not out.requires_grad
    assert torch.allclose(out, x @ a.T + 0.3 * 0.49 * g @ a, atol=1e-10)
    assert torch.allclose(plain, x @ a.T + 0.3 * 0.49 * g, atol=1e-10)
    with pytest.raises(ValueError, match="jacobian must be"):
        guided_denoiser(model, guide, jacobian="exact")


def test_conditional_guidance_with_cond_from_model_kwargs():
    emb = torch.randn(3, 4, generator=gen(7))  # prompt index -> embedding
    guide = DiversityGuidance(1.0, sigma_cond=0.8, scale=0.2, normalize=False)
    bank = torch.randn(4, 2, generator=gen(8))
    guide.commit(bank, emb[torch.tensor([0, 0, 1, 2])])

    def model(x, sigma, prompt):
        return x

    den = guided_denoiser(model, guide, cond=lambda prompt: emb[prompt])
    x = torch.randn(2, 2, generator=gen(9))
    prompt = torch.tensor([0, 2])
    out = den(x, 0.5, prompt=prompt)
    g, _ = ref.guidance_grad(
        x,
        bank,
        cond=emb[prompt],
        bank_cond=guide.bank.cond,
        sigma=1.0,
        sigma_cond=0.8,
        normalize=False,
    )
    expect = x.double() + 0.2 * 0.25 * g
    assert float((out.double() - expect).norm() / expect.norm()) <= 1e-5
    fixed = guided_denoiser(model, guide, cond=emb[prompt])  # a fixed tensor works too
    assert torch.allclose(fixed(x, 0.5, prompt=prompt), out)


def test_prompt_fade_in_the_denoiser():
    """guided_denoiser fades its raw step exactly as apply does: D' - D = f (D'_paper - D)."""
    bank, bank_c = torch.randn(4, 2, generator=gen(10)), torch.zeros(4, 3)
    cond = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.2, 0.0]])  # matching, far (w = e^-5.8)
    x = torch.randn(2, 2, generator=gen(11))
    steps = {}
    for rule in ("paper", "prompt_fade"):
        guide = DiversityGuidance(
            1.0, sigma_cond=0.5, scale=0.2, normalize=False, include_batch=False, step_rule=rule
        )
        guide.commit(bank, bank_c)
        steps[rule] = guided_denoiser(lambda x, s: x, guide, cond=cond)(x, 0.5) - x
    f = min(1.0, math.exp(-(1.2**2) / 0.25) / 0.05)
    assert f < 0.1
    assert torch.allclose(steps["prompt_fade"][0], steps["paper"][0])
    assert torch.allclose(steps["prompt_fade"][1], f * steps["paper"][1], rtol=1e-5)


def test_bad_input():
    guide = DiversityGuidance(1.0)
    with pytest.raises(TypeError, match="model must be callable"):
        guided_denoiser(3, guide)
    with pytest.raises(TypeError, match=r"guidance must be a rkekernels\.DiversityGuidance"):
        guided_denoiser(lambda x, s: x, object())
    guide.commit(torch.ones(1, 3))
    with pytest.raises(ValueError, match="committed without cond"):
        guided_denoiser(lambda x, s: x, guide, cond=torch.ones(2, 3))
    with pytest.raises(ValueError, match="cond is required"):
        guided_denoiser(lambda x, s: x, DiversityGuidance(1.0, sigma_cond=1.0))
    windowed = DiversityGuidance(1.0, stop=0.5)
    with pytest.raises(ValueError, match="pass sigmas"):
        guided_denoiser(lambda x, s: x, windowed)
    with pytest.raises(ValueError, match="either sigmas or progress"):
        guided_denoiser(lambda x, s: x, guide, sigmas=[1.0, 0.0], progress=lambda s: 0.0)
    with pytest.raises(ValueError, match="non-increasing"):
        guided_denoiser(lambda x, s: x, guide, sigmas=[1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="finite"):
        guided_denoiser(lambda x, s: x, guide, sigmas=[float("nan"), 0.0])
    with pytest.raises(ValueError, match="steps >= 1"):
        guided_denoiser(lambda x, s: x, guide, sigmas=[1.0])
    with pytest.raises(TypeError, match="progress must be a callable"):
        guided_denoiser(lambda x, s: x, guide, progress=0.5)
    den = guided_denoiser(lambda x, s: x, DiversityGuidance(1.0, scale=0.1))
    with pytest.raises(ValueError, match="one value per sample"):
        den(torch.randn(3, 2), torch.ones(2))
    assert isinstance(den, GuidedDenoiser)


def test_plain_loop_example_agrees_with_the_adapter():
    """examples/plain_loop.py (DDIM calling guidance_grad) == guided_denoiser in sample_euler."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "plain_loop.py"
    spec = importlib.util.spec_from_file_location("plain_loop", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    gm = example.mixture()
    x = example.sample(gm, scale=1.0, batches=3, batch_size=4, steps=25, seed=0)
    guide = DiversityGuidance(1.0, scale=1.0, normalize=False, start=0.4, stop=0.7)
    y = _generate(gm, get_sigmas_karras(25, 0.01, 20.0), guide, seed=0, batches=3)
    assert torch.allclose(x, y, atol=1e-4)


def test_kdiffusion_extra_brings_a_setuptools_with_pkg_resources():
    """pip install "rkekernels[kdiffusion]": k-diffusion imports clip, which imports
    pkg_resources; setuptools removed it in 82.0.0, so the extra must cap setuptools."""
    import ast
    import re
    from pathlib import Path

    from packaging.requirements import Requirement

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    extra = ast.literal_eval(re.search(r"^kdiffusion = (\[.*\])$", text, re.M).group(1))
    reqs = {Requirement(r).name: Requirement(r) for r in extra}
    assert "k-diffusion" in reqs
    spec = reqs["setuptools"].specifier
    assert not spec.contains("82.0.0") and spec.contains("80.9.0")

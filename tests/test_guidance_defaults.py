"""`DiversityGuidance()` with nothing set: automatic bandwidths (SPEC third round, issue 24)."""

from __future__ import annotations

import math

import pytest
import torch

from rkekernels import DiversityGuidance
from rkekernels.adapters.kdiffusion import guided_denoiser
from rkekernels.guidance_defaults import AUTO_COND_DIV, AUTO_MIN_ROWS, DEFAULT_SCALE
from rkekernels.toy import GaussianMixture, PromptWorld, get_sigmas_karras, sample_euler


def test_unconditional_defaults_on_the_toy_mixture():
    """DiversityGuidance() through guided_denoiser covers more modes of a skewed mixture."""
    gm = GaussianMixture([[-4.0, 0.0], [0.0, 0.0], [4.0, 0.0]], [0.9, 0.05, 0.05], std=0.3)
    sigmas = get_sigmas_karras(10, 0.01, 10.0)
    gen = torch.Generator().manual_seed(0)
    noise = [10.0 * torch.randn(8, 2, generator=gen) for _ in range(6)]
    plain = torch.cat([sample_euler(gm.denoise, x, sigmas) for x in noise])
    guide = DiversityGuidance(normalize=False)  # 2-D: unit features would keep angles only
    assert guide.sigma is None and guide.scale == DEFAULT_SCALE and not guide.conditional
    out = []
    for x in noise:
        x = sample_euler(guided_denoiser(gm.denoise, guide, sigmas=sigmas), x, sigmas)
        guide.commit(x)
        out.append(x)
    guided = torch.cat(out)
    assert gm.mode_counts(plain)[1:].sum() == 6  # of 48 (41 / 5 / 1 by mode, seed 0)
    assert gm.mode_counts(guided)[1:].sum() >= 15  # 19 / 13 / 8
    assert gm.precision(guided) >= 0.8  # 0.98 unguided, 0.83 guided
    assert 0.0 < guide.bandwidths()[0] < 10.0


def test_conditional_defaults_on_the_prompt_world():
    """A cond makes DiversityGuidance() prompt-aware: an unrelated prompt barely moves."""
    world = PromptWorld(n_prompts=4, modes_per_prompt=3)
    sigmas = get_sigmas_karras(30, 0.01, 10.0)
    guide = DiversityGuidance(scale=0.5, normalize=False)
    gen = torch.Generator().manual_seed(1)
    emb = world.embeddings
    bank = sample_euler(world.denoise, 10.0 * torch.randn(6, 2, generator=gen), sigmas,
                        {"cond": torch.zeros(6, dtype=torch.long)})  # fmt: skip
    guide.commit(bank, emb[0])
    assert guide.conditional
    x = 10.0 * torch.randn(1, 2, generator=gen)
    moved = []
    for p in (0, 2):  # the bank's prompt, and one of another group
        plain = sample_euler(world.denoise, x, sigmas, {"cond": torch.tensor([p])})
        den = guided_denoiser(world.denoise, guide, cond=emb[p][None], sigmas=sigmas)
        moved.append(
            float((sample_euler(den, x, sigmas, {"cond": torch.tensor([p])}) - plain).norm())
        )
    assert moved[0] > 0.01
    assert moved[1] <= 0.1 * moved[0]
    # the unrelated prompt's weight: distinct prompts are >= AUTO_COND_DIV sigma_cond apart
    _, sigma_cond = guide.bandwidths(None, emb[2][None])
    w = math.exp(-(float((emb[2] - emb[0]).norm()) ** 2) / sigma_cond**2)
    assert w < 1e-3
    assert sigma_cond == pytest.approx(float((emb[2] - emb[0]).norm()) / AUTO_COND_DIV, rel=1e-6)


def test_sigma_refreshes_after_load_state_dict():
    small = DiversityGuidance(normalize=False)
    small.commit(torch.arange(4.0)[:, None])  # spacing 1
    assert small.bandwidths()[0] == pytest.approx(2.0)  # 3rd-NN distances 3, 2, 2, 3
    wide = DiversityGuidance(normalize=False)
    wide.commit(10.0 * torch.arange(2 * AUTO_MIN_ROWS, dtype=torch.float32)[:, None])
    small.bank.load_state_dict(wide.bank.state_dict())
    assert small.bandwidths()[0] == pytest.approx(20.0)  # read from the loaded bank
    cached = small._auto["rows"]
    small.commit(torch.tensor([[0.5]]))  # one more row: no recomputation
    small.bandwidths()
    assert small._auto["rows"] == cached


def test_sigma_from_the_batch_when_the_bank_is_empty():
    g = DiversityGuidance(normalize=False, scale=0.1)
    z = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    out = g.apply(z)
    assert not torch.equal(out, z)  # the batch's own samples count: guided from batch 1
    assert g.bandwidths(z)[0] > 0.0
    one = DiversityGuidance()
    assert torch.equal(one.apply(torch.ones(1, 3)), torch.ones(1, 3))  # nothing to push against


def test_zero_cond_gives_no_nan():
    g = DiversityGuidance()
    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    out = g.apply(z, cond=torch.zeros(3, 5))
    assert torch.isfinite(out).all() and g.conditional
    g.commit(out, cond=torch.zeros(3, 5))
    out = g.apply(z, cond=torch.zeros(3, 5))
    assert torch.isfinite(out).all()
    assert g.bandwidths(None, torch.zeros(1, 5))[1] == 1.0


def test_inf_sigma_cond_ignores_prompts():
    z = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    bank = torch.randn(5, 6, generator=torch.Generator().manual_seed(3))
    ignore = DiversityGuidance(sigma_cond=math.inf)
    plain = DiversityGuidance()
    ignore.commit(bank, cond=torch.randn(5, 3))
    plain.commit(bank)
    out = ignore.apply(z, cond=torch.randn(4, 3))
    assert not ignore.conditional and ignore.bank.cond is None
    assert torch.allclose(out, plain.apply(z))


def test_auto_cond_needs_cond_once_seen():
    g = DiversityGuidance()
    g.commit(torch.randn(2, 3), cond=torch.randn(2, 4))
    with pytest.raises(ValueError, match="cond is required"):
        g.apply(torch.randn(2, 3))
    assert "sigma_cond=auto" in repr(g)
    loaded = DiversityGuidance()  # a bank loaded with prompts makes it prompt-aware too
    assert not loaded.conditional
    loaded.bank.load_state_dict(g.bank.state_dict())
    assert loaded.conditional
    with pytest.raises(ValueError, match="cond is required"):
        loaded.apply(torch.randn(2, 3))


@pytest.mark.slow  # importing diffusers and building the tiny DiT: ~30 s alone, shared in a run
def test_diffusers_adapters_take_the_defaults():
    pytest.importorskip("diffusers")
    from rkekernels.adapters._tiny import tiny_call_kwargs, tiny_pipeline
    from rkekernels.adapters.diffusers import sparke

    pipe = tiny_pipeline("dit")
    plain = DiversityGuidance()  # captures DiT's class labels: prompt-aware on them
    with sparke(pipe, plain) as session:
        pipe(**tiny_call_kwargs("dit", seed=0))
    assert len(plain.bank) > 0 and plain._auto["sigma"] > 0.0 and plain._auto["sigma_cond"] > 0.0
    assert plain.conditional and session.cond_source == "class_labels"
    ignored = DiversityGuidance(sigma_cond=math.inf)
    with sparke(pipe, ignored) as session:
        pipe(**tiny_call_kwargs("dit", seed=0))
    assert not ignored.conditional and ignored.bank.cond is None and session.cond_source is None
    given = DiversityGuidance()
    b = len(plain.bank)
    with sparke(pipe, given, cond=torch.eye(3)[:1].expand(b, 3)):  # a given cond: prompt-aware
        pipe(**tiny_call_kwargs("dit", seed=0))
    assert given.conditional and given.bank.cond is not None


def test_automatic_sigma_refuses_latents_of_another_width():
    """With sigma=None the bandwidth is computed before guidance_grad's checks: latents of
    another width than the bank's get the same clear error (was a raw torch RuntimeError)."""
    g = DiversityGuidance()
    g.commit(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"width 4 .* width 5"):
        g.apply(torch.randn(2, 5))

"""sparke_callback inside a real diffusers StableDiffusionPipeline built from tiny random configs
(nothing downloaded), plus the optional-dependency behaviour."""

import importlib
import subprocess
import sys
from types import SimpleNamespace

import diffusers  # a declared test dependency (pyproject [test]): fail, never skip
import pytest
import torch

from rkekernels import DiversityGuidance, features
from rkekernels.adapters.diffusers import (
    SparkeCallback,
    pool_prompt_embeds,
    sparke_callback,
)

B, TOKENS, EMBED, STEPS = 2, 5, 32, 3


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    """The tiny SD 1.5 pipeline shared with the pipeline tests (called with prompt_embeds)."""
    from rkekernels.adapters._tiny import tiny_pipeline

    return tiny_pipeline("sd15")


@pytest.fixture(scope="module")
def embeds():
    g = torch.Generator().manual_seed(123)
    return torch.randn(B, TOKENS, EMBED, generator=g)


def _run(pipe, embeds, seed, callback=None, guidance_scale=1.0, output_type="latent"):
    kwargs = {}
    if guidance_scale > 1.0:
        kwargs["negative_prompt_embeds"] = torch.zeros_like(embeds)
    if callback is not None:
        kwargs["callback_on_step_end"] = callback
    out = pipe(
        prompt_embeds=embeds,
        num_inference_steps=STEPS,
        guidance_scale=guidance_scale,
        height=16,
        width=16,
        output_type=output_type,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )
    return torch.as_tensor(out.images)


def test_scale_zero_equals_unguided_and_bank_grows(pipe, embeds):
    guide = DiversityGuidance(1.0, scale=0.0)
    cb = sparke_callback(guide)
    assert isinstance(cb, diffusers.callbacks.PipelineCallback)
    assert cb.tensor_inputs == ["latents"]
    for i, seed in enumerate((0, 1)):
        plain = _run(pipe, embeds, seed)
        guided = _run(pipe, embeds, seed, cb)
        assert torch.equal(plain, guided)
        assert len(guide.bank) == B * (i + 1)


def test_guidance_moves_later_images_and_banks_every_image(pipe, embeds):
    guide = DiversityGuidance(1.0, scale=0.1, include_batch=False)
    cb = sparke_callback(guide)
    outs = []
    for i, seed in enumerate((0, 1, 2)):
        plain = _run(pipe, embeds, seed)
        guided = _run(pipe, embeds, seed, cb)
        assert torch.isfinite(guided).all()
        if i == 0:  # the bank is empty while the first batch is sampled: nothing to push from
            assert torch.equal(plain, guided)
        else:
            for a in range(B):
                assert not torch.allclose(plain[a], guided[a], atol=1e-3)
        outs.append(guided)
    # the bank holds every image, exactly the latents the pipeline returned
    assert len(guide.bank) == 3 * B
    assert torch.allclose(guide.bank.features, features(torch.cat(outs)), atol=1e-6)


def test_batch_members_repel_each_other(pipe, embeds):
    guide = DiversityGuidance(1.0, scale=0.1, include_batch=True)
    plain = _run(pipe, embeds, 0)
    guided = _run(pipe, embeds, 0, sparke_callback(guide))
    assert torch.isfinite(guided).all()
    assert not torch.allclose(plain, guided, atol=1e-3)


def test_conditional_with_explicit_cond(pipe, embeds):
    cond = torch.randn(B, 7, generator=torch.Generator().manual_seed(5))
    guide = DiversityGuidance(1.0, sigma_cond=1.0, scale=0.1, include_batch=False)
    cb = sparke_callback(guide, cond=cond)
    assert cb.tensor_inputs == ["latents"]
    _run(pipe, embeds, 0, cb)
    plain = _run(pipe, embeds, 1)
    guided = _run(pipe, embeds, 1, cb)
    assert not torch.allclose(plain, guided, atol=1e-3)
    assert torch.allclose(guide.bank.cond, torch.cat([cond, cond]))


def test_conditional_with_pooled_prompt_embeds(pipe, embeds):
    guide = DiversityGuidance(1.0, sigma_cond=1.0, scale=0.1, include_batch=False)
    cb = sparke_callback(guide)
    assert cb.tensor_inputs == ["latents", "prompt_embeds"]
    _run(pipe, embeds, 0, cb)
    plain = _run(pipe, embeds, 1)
    guided = _run(pipe, embeds, 1, cb)
    assert torch.isfinite(guided).all()
    assert not torch.allclose(plain, guided, atol=1e-3)
    pooled = embeds.mean(dim=1)
    pooled = pooled / pooled.norm(dim=1, keepdim=True)
    assert torch.allclose(guide.bank.cond, torch.cat([pooled, pooled]), atol=1e-6)


def test_classifier_free_guidance_run_uses_the_conditional_half(pipe, embeds):
    guide = DiversityGuidance(1.0, sigma_cond=1.0, scale=0.1, include_batch=False)
    cb = sparke_callback(guide)
    _run(pipe, embeds, 0, cb, guidance_scale=3.0)
    plain = _run(pipe, embeds, 1, guidance_scale=3.0)
    guided = _run(pipe, embeds, 1, cb, guidance_scale=3.0)
    assert torch.isfinite(guided).all()
    assert not torch.allclose(plain, guided, atol=1e-3)
    # negative embeddings are zeros: a pooled negative half would be all zeros
    pooled = embeds.mean(dim=1)
    pooled = pooled / pooled.norm(dim=1, keepdim=True)
    assert torch.allclose(guide.bank.cond, torch.cat([pooled, pooled]), atol=1e-6)
    # decoded images work too (the callback only touches latents)
    images = _run(pipe, embeds, 2, cb, guidance_scale=3.0, output_type="np")
    assert images.shape == (B, 16, 16, 3) and torch.isfinite(images).all()
    assert len(guide.bank) == 3 * B


class _Spy(DiversityGuidance):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.seen = []

    def apply(self, latents, cond=None, progress=None, *, step=None):
        out = super().apply(latents, cond, progress, step=step)
        self.seen.append((step, progress, out is not latents))
        return out


def test_schedule_in_the_pipeline(pipe, embeds):
    steps = 5
    spy = _Spy(1.0, scale=0.1, every=2, start=0.3)
    spy.commit(torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(9)))
    pipe(
        prompt_embeds=embeds,
        num_inference_steps=steps,
        guidance_scale=1.0,
        height=16,
        width=16,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        callback_on_step_end=sparke_callback(spy),
    )
    assert [s for s, _, _ in spy.seen] == list(range(steps))
    assert [p for _, p, _ in spy.seen] == [i / steps for i in range(steps)]
    assert [i for i, _, moved in spy.seen if moved] == [2, 4]  # every 2nd, progress >= 0.3
    assert len(spy.bank) == 2 * B


@pytest.mark.slow
def test_any_latent_layout_with_a_minimal_pipeline():
    """Packed sequence latents (b, tokens, c), prompt_embeds without CFG doubling."""
    guide = DiversityGuidance(1.0, sigma_cond=0.5, scale=0.2)
    cb = sparke_callback(guide)
    fake = SimpleNamespace(num_timesteps=2, do_classifier_free_guidance=False)
    lat = torch.randn(3, 16, 8, generator=torch.Generator().manual_seed(1))
    pe = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(2))
    out0 = cb(fake, 0, None, {"latents": lat, "prompt_embeds": pe})["latents"]
    assert out0.shape == lat.shape and not torch.equal(out0, lat)
    out1 = cb(fake, 1, None, {"latents": out0, "prompt_embeds": pe})["latents"]
    assert len(guide.bank) == 3 and guide.bank.dim == 16 * 8
    assert torch.allclose(guide.bank.features, features(out1), atol=1e-6)


def test_pool_prompt_embeds_and_bad_input():
    pe = torch.arange(24.0).reshape(4, 3, 2)
    assert torch.equal(pool_prompt_embeds(pe, 2, cfg=True, normalize=False), pe[2:].mean(1))
    assert torch.equal(pool_prompt_embeds(pe, 4, cfg=True, normalize=False), pe.mean(1))
    assert torch.equal(pool_prompt_embeds(pe[:, 0], 4, cfg=False, normalize=False), pe[:, 0])
    unit = pool_prompt_embeds(pe, 4, cfg=False)
    assert torch.allclose(unit, pe.mean(1) / pe.mean(1).norm(dim=1, keepdim=True))
    zero = pool_prompt_embeds(torch.zeros(2, 3, 4), 2, cfg=False)  # stays zero, no NaN
    assert torch.equal(zero, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="pass cond"):
        pool_prompt_embeds(pe, 3, cfg=False)
    with pytest.raises(ValueError, match="prompt_embeds must be"):
        pool_prompt_embeds(torch.zeros(2, 3, 4, 5), 2, cfg=False)
    with pytest.raises(TypeError, match="guidance must be"):
        sparke_callback("guide")
    filled = DiversityGuidance(1.0)
    filled.commit(torch.ones(1, 4))
    with pytest.raises(ValueError, match="committed without cond"):
        sparke_callback(filled, cond=torch.zeros(2, 3))
    # token-level cond is pooled once
    cb = sparke_callback(DiversityGuidance(1.0, sigma_cond=1.0), cond=pe)
    assert isinstance(cb, SparkeCallback) and torch.equal(cb.cond, pe.mean(1))


def test_friendly_import_error_without_diffusers(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    monkeypatch.setitem(sys.modules, "diffusers.callbacks", None)
    monkeypatch.delitem(sys.modules, "rkekernels.adapters.diffusers", raising=False)
    with pytest.raises(ImportError, match=r"pip install diffusers.*rkekernels\[diffusers\]"):
        importlib.import_module("rkekernels.adapters.diffusers")


def test_importing_rkekernels_does_not_import_diffusers():
    code = (
        "import sys, rkekernels, rkekernels.adapters, rkekernels.adapters.kdiffusion\n"
        "assert 'diffusers' not in sys.modules, 'diffusers was imported'\n"
        "assert 'k_diffusion' not in sys.modules, 'k_diffusion was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

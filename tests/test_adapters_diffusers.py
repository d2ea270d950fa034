"""sparke_callback inside a real diffusers StableDiffusionPipeline built from tiny random configs
(nothing downloaded), plus the optional-dependency behaviour."""

import importlib
import math
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
    guide = DiversityGuidance(1.0, sigma_cond=math.inf, scale=0.0)  # prompts ignored
    cb = sparke_callback(guide)
    assert isinstance(cb, diffusers.callbacks.PipelineCallback)
    assert cb.tensor_inputs == ["latents"]
    for i, seed in enumerate((0, 1)):
        plain = _run(pipe, embeds, seed)
        guided = _run(pipe, embeds, seed, cb)
        assert torch.equal(plain, guided)
        assert len(guide.bank) == B * (i + 1)


def test_guidance_moves_later_images_and_banks_every_image(pipe, embeds):
    guide = DiversityGuidance(1.0, sigma_cond=math.inf, scale=0.1, include_batch=False)
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
    # unconditional: the two prompts differ, so prompt-aware guidance would barely move them
    guide = DiversityGuidance(1.0, sigma_cond=math.inf, scale=0.1, include_batch=True)
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


def test_default_sigma_cond_captures_prompt_embeds(pipe, embeds):
    # issue 24: DiversityGuidance() (sigma_cond=None) is prompt-aware on the pipeline's own
    # prompt embeddings from the first batch on; sigma_cond=math.inf ignores them
    guide = DiversityGuidance(include_batch=False)
    cb = sparke_callback(guide)
    assert cb.tensor_inputs == ["latents", "prompt_embeds"]  # SD reads them from the callback
    _run(pipe, embeds, 0, cb)
    assert guide.conditional
    plain = _run(pipe, embeds, 1)
    guided = _run(pipe, embeds, 1, cb)
    assert not torch.allclose(plain, guided, atol=1e-3)
    pooled = embeds.mean(dim=1)
    pooled = pooled / pooled.norm(dim=1, keepdim=True)
    assert torch.allclose(guide.bank.cond, torch.cat([pooled, pooled]), atol=1e-6)
    ignored = DiversityGuidance(sigma_cond=math.inf)
    cb = sparke_callback(ignored)
    assert cb.tensor_inputs == ["latents"]
    _run(pipe, embeds, 0, cb)
    assert not ignored.conditional and ignored.bank.cond is None
    # a bank filled without prompts stays unconditional (its rows have no prompt to weigh)
    filled = DiversityGuidance()
    filled.commit(torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(4)))
    cb = sparke_callback(filled)
    assert cb.tensor_inputs == ["latents"]
    _run(pipe, embeds, 0, cb)
    assert not filled.conditional and len(filled.bank) == 2 * B


def test_default_sigma_cond_without_prompt_embeds():
    # a pipeline that offers no prompt embeddings to callbacks is guided unconditionally;
    # one that offers them but did not hand them over is told how to pass them
    lat = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(1))
    guide = DiversityGuidance()
    cb = sparke_callback(guide)
    bare = SimpleNamespace(num_timesteps=2, _callback_tensor_inputs=["latents", "image_embeds"])
    out = cb(bare, 0, None, {"latents": lat})["latents"]
    assert not torch.equal(out, lat)  # the batch members repel each other
    cb(bare, 1, None, {"latents": out})
    assert len(guide.bank) == 2 and guide.bank.cond is None and not guide.conditional
    texty = SimpleNamespace(num_timesteps=2, _callback_tensor_inputs=["latents", "prompt_embeds"])
    cb = sparke_callback(DiversityGuidance())
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        cb(texty, 0, None, {"latents": lat})
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        sparke_callback(DiversityGuidance(sigma_cond=0.5))(bare, 0, None, {"latents": lat})


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


def test_pool_prompt_embeds_collapses_per_frame_copies():
    # issue 23 B: AnimateDiff repeats each prompt embedding once per frame (repeat_interleave):
    # b * frames rows, [negative, positive] * frames under classifier-free guidance
    g = torch.Generator().manual_seed(0)
    neg, pos = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    frames = 5
    plain = pool_prompt_embeds(pos, 2, cfg=False, mask=mask)
    for cfg in (False, None):
        got = pool_prompt_embeds(
            pos.repeat_interleave(frames, 0), 2, cfg, mask=mask.repeat_interleave(frames, 0)
        )
        assert torch.equal(got, plain)
    doubled = torch.cat([neg, pos]).repeat_interleave(frames, 0)
    got = pool_prompt_embeds(doubled, 2, True, mask=torch.cat([mask, mask]).repeat_interleave(5, 0))
    assert torch.equal(got, plain)
    # frames differ: no copies to collapse
    with pytest.raises(ValueError, match="pass cond"):
        pool_prompt_embeds(torch.randn(10, 3, 4, generator=g), 2, cfg=False)
    # one prompt twice under CFG, cfg unknown: [n, n, p, p] * frames also reads as b blocks
    # of 2 * frames equal rows ([n, p]): refused, never the negative prompt
    same = torch.cat([neg[:1], neg[:1], pos[:1], pos[:1]]).repeat_interleave(frames, 0)
    with pytest.raises(ValueError, match="pass cond"):
        pool_prompt_embeds(same, 2, cfg=None)
    want = pool_prompt_embeds(pos[:1].expand(2, 3, 4), 2, cfg=False)
    assert torch.equal(pool_prompt_embeds(same, 2, cfg=True), want)


def _captured(**kwargs):
    """A `_Capture` that saw one denoiser call of 2 latents with these keyword arguments."""
    from rkekernels.adapters.diffusers.capture import _Capture

    capture = _Capture()
    capture(None, (torch.zeros(2, 4, 8, 8),), kwargs)
    return capture


def test_kandinsky22_image_embeds_but_no_ip_adapter_list():
    # issue 23 B: Kandinsky 2.2's decoders call their UNet with encoder_hidden_states=None and
    # added_cond_kwargs={"image_embeds": (b, m)} (2b rows [negative, positive] under CFG);
    # SDXL with an IP-Adapter passes a list under the same key, which is no prompt embedding
    from rkekernels.adapters.diffusers.capture import capture_cond

    g = torch.Generator().manual_seed(0)
    neg, emb = torch.randn(2, 6, generator=g), torch.randn(2, 6, generator=g)
    want = emb / emb.norm(dim=1, keepdim=True)
    for cfg, rows in ((False, emb), (True, torch.cat([neg, emb]))):
        pipe, notes = SimpleNamespace(do_classifier_free_guidance=cfg), []
        capture = _captured(encoder_hidden_states=None, added_cond_kwargs={"image_embeds": rows})
        got = capture_cond(pipe, capture, 2, None, None, notes.append)
        assert torch.allclose(got, want) and notes == ["added_cond_kwargs['image_embeds']"]
    for bad in ([emb], emb[:, None]):
        capture = _captured(encoder_hidden_states=None, added_cond_kwargs={"image_embeds": bad})
        with pytest.raises(ValueError, match="pass cond"):
            capture_cond(SimpleNamespace(), capture, 2, None, None, print)


def test_qwenimage_encoder_hidden_states_mask_is_read():
    # issue 23 B: QwenImage hands its transformer encoder_hidden_states_mask (None when no
    # token is padding), not encoder_attention_mask
    from rkekernels.adapters.diffusers.capture import capture_cond

    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 4, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    pipe = SimpleNamespace(do_classifier_free_guidance=False)
    for m, want in ((mask, pool_prompt_embeds(tokens, 2, mask=mask)), (None, None)):
        notes = []
        capture = _captured(encoder_hidden_states=tokens, encoder_hidden_states_mask=m)
        got = capture_cond(pipe, capture, 2, None, ["a dog", "a cat"], notes.append)
        want = pool_prompt_embeds(tokens, 2) if want is None else want  # None: all tokens
        assert torch.allclose(got, want)
        assert notes == ["encoder_hidden_states (encoder_hidden_states_mask)"]


def test_tokens_past_the_tokenizer_length_are_no_prompt():
    # issue 23 B: Stable Audio hands its transformer [text tokens, start s, end s] and no mask;
    # a prompt as long as the tokenizer (8 here) fills every text token, and the two seconds
    # embeddings after the text are no part of the prompt
    from rkekernels.adapters._tiny import WIDTH, tiny_tokenizer
    from rkekernels.adapters.diffusers.capture import capture_cond

    tok = tiny_tokenizer(bos=False)
    pipe = SimpleNamespace(
        do_classifier_free_guidance=False,
        tokenizer=tok,
        text_encoder=SimpleNamespace(config=SimpleNamespace(d_model=WIDTH)),
    )
    prompts = ["a photo of the big red dog on the beach", "a small house"]
    text = tok(prompts, padding="max_length", max_length=8, truncation=True).attention_mask
    mask = torch.nn.functional.pad(torch.tensor(text), (0, 2))  # the seconds tokens: 0
    assert mask[0, :8].all() and not mask[1, :8].all()
    tokens = torch.randn(2, 10, WIDTH, generator=torch.Generator().manual_seed(0))
    notes = []
    got = capture_cond(
        pipe, _captured(encoder_hidden_states=tokens), 2, None, prompts, notes.append
    )
    assert torch.allclose(got, pool_prompt_embeds(tokens, 2, mask=mask))
    assert notes == ["encoder_hidden_states (tokenizer mask)"]


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

"""`sparke(pipe, guidance)` in every supported diffusers pipeline, built tiny and locally
(`rkekernels.adapters._tiny`: random weights, 2 steps, 8x8 latents or smaller; nothing is
downloaded), in the three modes: (a) unconditional (``sigma_cond=math.inf``: prompts ignored),
(b) prompt-aware with cond pooled from the pipeline's prompt embeddings (the default automatic
``sigma_cond=None``), (c) (b) with an explicit ``sigma_cond`` plus classifier-free guidance."""

import inspect
import math

import pytest
import torch

from rkekernels import DiversityGuidance, features
from rkekernels.adapters._tiny import (
    TINY_PIPELINES,
    TOKENS,
    tiny_call_kwargs,
    tiny_guided_run,
    tiny_image_embeds,
    tiny_output,
    tiny_pipeline,
)
from rkekernels.adapters.diffusers import SparkeError, sparke, sparke_callback

B = 2
SLOW = {"kandinsky3", "controlnet", "controlnet_sdxl"}  # > ~1.5 s for the three modes
ROUTE = {
    "stable_audio": "scheduler.step",
    "pixart_sigma": "scheduler.step",
    "pixart_alpha": "scheduler.step",
    "dit": "scheduler.step",
}
SOURCE = {
    "sd15": "encoder_hidden_states (tokenizer mask)",
    "sd2": "encoder_hidden_states (tokenizer mask)",
    "controlnet": "encoder_hidden_states (tokenizer mask)",
    "cogvideox": "encoder_hidden_states (tokenizer mask)",
    "img2img": "encoder_hidden_states (tokenizer mask)",
    "inpaint": "encoder_hidden_states (tokenizer mask)",
    "animatediff": "encoder_hidden_states (tokenizer mask)",  # one copy per frame: collapsed
    "stable_audio": "encoder_hidden_states (tokenizer mask)",  # its 2 seconds tokens left out
    "qwenimage": "encoder_hidden_states (encoder_hidden_states_mask)",
    "kandinsky22": "added_cond_kwargs['image_embeds']",
    "sdxl": "added_cond_kwargs['text_embeds']",
    "controlnet_sdxl": "added_cond_kwargs['text_embeds']",
    "sd3": "pooled_projections",
    "flux": "pooled_projections",
    "pixart_sigma": "encoder_hidden_states (encoder_attention_mask)",
    "pixart_alpha": "encoder_hidden_states (encoder_attention_mask)",
    "kandinsky3": "encoder_hidden_states (encoder_attention_mask)",
    "dit": "class_labels",
}
PROMPTS = ["a photo of a dog", "a red car in the snow"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _unit(x):
    return x / x.norm(dim=1, keepdim=True)


def _masked_mean(e, mask):
    m = mask.to(e)[..., None]
    return (e * m).sum(1) / m.sum(1)


def expected_cond(name, pipe):
    """The documented pooling, computed from the pipeline's own encode_prompt."""
    if name == "dit":
        return torch.nn.functional.one_hot(torch.tensor([1, 2]), 1000).float()
    kw = {"do_classifier_free_guidance": False}
    if name == "kandinsky22":
        return _unit(tiny_image_embeds(B)[0])
    if name == "qwenimage":
        pe, mask = pipe.encode_prompt(PROMPTS, max_sequence_length=4 * TOKENS)
        assert (mask == 0).any()  # the prompts' lengths differ, so the mask matters
        return _unit(_masked_mean(pe.float(), mask))
    if name in ("sd15", "sd2", "controlnet", "cogvideox", "img2img", "inpaint", "animatediff"):
        if name == "cogvideox":
            pe, _ = pipe.encode_prompt(PROMPTS, max_sequence_length=TOKENS, **kw)
        else:
            pe, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
        mask = pipe.tokenizer(PROMPTS, padding="max_length", max_length=TOKENS).attention_mask
        mask = torch.tensor(mask)
        assert (mask == 0).any()  # some padding, so the mask matters
        return _unit(_masked_mean(pe.float(), mask))
    if name == "stable_audio":  # (b, TOKENS, m) text tokens, before the 2 seconds tokens
        pe = pipe.encode_prompt(PROMPTS, "cpu", False)
        mask = pipe.tokenizer(PROMPTS, padding="max_length", max_length=TOKENS).attention_mask
        mask = torch.tensor(mask)
        assert (mask == 0).any()
        return _unit(_masked_mean(pe.float(), mask))
    if name in ("sdxl", "controlnet_sdxl"):
        return _unit(pipe.encode_prompt(PROMPTS, device="cpu", **kw)[2].float())
    if name == "sd3":
        return _unit(pipe.encode_prompt(PROMPTS, None, None, max_sequence_length=TOKENS, **kw)[2])
    if name == "flux":
        return _unit(pipe.encode_prompt(PROMPTS, None, max_sequence_length=TOKENS)[1].float())
    if name.startswith("pixart"):
        pe, mask, _, _ = pipe.encode_prompt(
            PROMPTS, max_sequence_length=TOKENS, clean_caption=False, **kw
        )
        return _unit(_masked_mean(pe.float(), mask))
    if name == "kandinsky3":
        pe, _, mask, _ = pipe.encode_prompt(PROMPTS, **kw)
        return _unit(_masked_mean(pe.float(), mask))
    raise AssertionError(name)


def _cases():
    for name in TINY_PIPELINES:
        for mode in ("a", "b", "c"):
            marks = [pytest.mark.slow] if name in SLOW else []
            yield pytest.param(name, mode, id=f"{name}-{mode}", marks=marks)


@pytest.mark.parametrize(("name", "mode"), list(_cases()))
def test_sparke_in_every_pipeline(name, mode):
    pipe = tiny_pipeline(name)
    cls = type(pipe)
    run = tiny_guided_run(name, mode)
    guide, session, outs, plain = run.guide, run.session, run.outputs, run.plain
    assert run.banks == [B, 2 * B]  # the bank grows by the batch every call
    assert run.steps == [2, 2]
    assert session.route == ROUTE.get(name, "callback_on_step_end")
    assert torch.isfinite(outs[1]).all()
    for a in range(B):  # every image of the second call moved
        assert (outs[1][a] - plain[a]).abs().max() > 1e-3
    if name != "dit":  # DiT returns decoded images; the others their final latents
        assert torch.allclose(guide.bank.features[B:], features(outs[1]), atol=1e-5)
    if mode == "a":
        assert guide.bank.cond is None and session.cond_source is None
    else:  # (b): captured by the automatic sigma_cond, prompt-aware from the first call
        assert guide.conditional and session.cond_source == SOURCE[name]
        want = expected_cond(name, pipe)
        assert torch.allclose(guide.bank.cond, torch.cat([want, want]), atol=1e-5)
    # nothing is left behind
    assert type(pipe) is cls
    assert "step" not in vars(pipe.scheduler)
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    assert not denoiser._forward_pre_hooks


def test_default_guidance_is_prompt_aware_on_the_captured_prompts():
    # issue 24: sparke(pipe, DiversityGuidance()) captures the pipeline's prompt embeddings
    pipe = tiny_pipeline("sd15")
    guide = DiversityGuidance()
    outs = []
    with sparke(pipe, guide) as session:
        for seed in range(2):
            outs.append(tiny_output(pipe(**tiny_call_kwargs("sd15", seed=seed))))
            assert guide.conditional and session.cond_source == SOURCE["sd15"]
    want = expected_cond("sd15", pipe)
    assert torch.allclose(guide.bank.cond, torch.cat([want, want]), atol=1e-5)
    assert guide.bandwidths()[1] is not None  # an automatic sigma_cond is in use
    plain = tiny_output(pipe(**tiny_call_kwargs("sd15", seed=1)))
    for a in range(B):
        assert (outs[1][a] - plain[a]).abs().max() > 1e-3
    # a bank filled without prompts stays unconditional; sigma_cond=math.inf captures nothing
    filled = DiversityGuidance()
    filled.commit(torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
    for guide in (filled, DiversityGuidance(sigma_cond=math.inf)):
        with sparke(pipe, guide) as session:
            pipe(**tiny_call_kwargs("sd15"))
        assert session.cond_source is None and guide.bank.cond is None
        assert not guide.conditional and session.steps == 2


def _tiny_ddim():
    """An unconditional DDIM pipeline (its UNet gets the sample and the timestep only)."""
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=100))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_unconditional_pipeline_stays_unconditional():
    pipe = _tiny_ddim()

    def call(seed):
        g = torch.Generator().manual_seed(seed)
        out = pipe(batch_size=B, num_inference_steps=2, output_type="np", generator=g)
        return torch.as_tensor(out.images)

    guide = DiversityGuidance(scale=0.2)  # sigma_cond=None: no prompts here, no error
    with sparke(pipe, guide) as session:
        outs = [call(seed) for seed in range(2)]
    assert session.route == "scheduler.step" and session.cond_source is None
    assert len(guide.bank) == 2 * B and guide.bank.cond is None and not guide.conditional
    plain = call(1)
    assert (outs[1] - plain).abs().amax() > 1e-3  # guided
    with pytest.raises(ValueError, match="found no prompt embeddings"):
        with sparke(pipe, DiversityGuidance(sigma_cond=0.5)):  # an explicit one needs prompts
            call(0)


def _first_cond(pipe, name, **call):
    guide = DiversityGuidance(1.0, sigma_cond=0.5, scale=0.2)
    with sparke(pipe, guide) as session:
        pipe(**{**tiny_call_kwargs(name), **call})
    return guide.bank.cond, session.cond_source


def test_stable_audio_pools_its_text_tokens_only():
    # issue 23 B: Stable Audio hands its transformer [text tokens, start s, end s] and no mask;
    # a prompt longer than the tokenizer fills every text token, and the two seconds
    # embeddings after them are no part of the prompt
    pipe = tiny_pipeline("stable_audio")
    long = ["a photo of the big red dog on the beach in the snow", "a small house in the city"]
    cond, source = _first_cond(pipe, "stable_audio", prompt=long)
    pe = pipe.encode_prompt(long, "cpu", False)  # (b, TOKENS, m), padding zeroed
    tok = pipe.tokenizer(long, padding="max_length", max_length=TOKENS, truncation=True)
    mask = torch.tensor(tok.attention_mask)
    assert mask[0].all() and not mask[1].all()
    assert source == "encoder_hidden_states (tokenizer mask)"
    assert torch.allclose(cond, _unit(_masked_mean(pe.float(), mask)), atol=1e-5)


def test_qwenimage_prompts_of_one_length_pass_no_mask():
    # QwenImage passes encoder_hidden_states_mask=None when no token is padding: all tokens
    pipe = tiny_pipeline("qwenimage")
    same = ["a photo of a dog", "a photo of a cat"]
    cond, source = _first_cond(pipe, "qwenimage", prompt=same)
    pe, mask = pipe.encode_prompt(same, max_sequence_length=4 * TOKENS)
    assert mask is None and source == "encoder_hidden_states (encoder_hidden_states_mask)"
    assert torch.allclose(cond, _unit(pe.float().mean(1)), atol=1e-5)


def test_dit_cfg_keeps_the_doubled_batch_consistent():
    pipe = tiny_pipeline("dit")
    seen = []
    guide = DiversityGuidance(1.0, sigma_cond=0.5, scale=0.3)
    guide.commit(torch.randn(B, 4, 8, 8), cond=torch.eye(1000)[:B])
    orig = type(pipe.scheduler).step

    def spy(self, model_output, t, sample, **kw):
        seen.append(sample.clone())  # the doubled batch the scheduler gets at each step
        return orig(self, model_output, t, sample, **kw)

    pipe.scheduler.step = spy.__get__(pipe.scheduler)
    try:
        with sparke(pipe, guide):
            pipe(**tiny_call_kwargs("dit", cfg=True))
    finally:
        del pipe.scheduler.step
    assert len(seen) == 2 and all(s.shape[0] == 2 * B for s in seen)
    for s in seen[1:]:  # after the first guided step both halves are the same guided latents
        assert torch.equal(s[:B], s[B:])
    assert len(guide.bank) == 2 * B


def test_scale_zero_and_empty_schedule_are_not_errors():
    pipe = tiny_pipeline("pixart_sigma")
    plain = tiny_output(pipe(**tiny_call_kwargs("pixart_sigma")))
    for guide in (
        DiversityGuidance(1.0, scale=0.0),
        DiversityGuidance(1.0, scale=0.2, start=0.9, stop=0.95),  # selects none of 2 steps
    ):
        guide.commit(torch.randn(B, 4, 8, 8))
        with sparke(pipe, guide):
            out = tiny_output(pipe(**tiny_call_kwargs("pixart_sigma")))
        assert torch.equal(out, plain) and len(guide.bank) == 2 * B


class _Loopless:
    """A pipeline whose loop steps no scheduler SPARKE can see."""

    def __init__(self):
        from diffusers import DDIMScheduler

        self.scheduler = DDIMScheduler()

    def __call__(self, n=2):
        return "done"


class _Forgetful(_Loopless):
    """Takes callback_on_step_end, steps its scheduler, never calls the callback."""

    def __call__(self, n=2, callback_on_step_end=None):
        self.scheduler.set_timesteps(n)
        for t in self.scheduler.timesteps:
            self.scheduler.step(torch.zeros(1, 2), t, torch.ones(1, 2))
        return "done"


def test_a_call_that_never_reaches_the_hook_raises():
    with sparke(_Loopless(), DiversityGuidance(1.0)) as s:
        assert s.route == "scheduler.step"
        with pytest.raises(SparkeError, match=r"no callback_on_step_end and never called"):
            type(s.pipe).__call__(s.pipe)
        with pytest.raises(SparkeError, match="guide the loop yourself"):
            s.pipe()
    pipe = _Forgetful()
    guide = DiversityGuidance(1.0)
    with sparke(pipe, guide), pytest.raises(SparkeError, match=r"never called it .*2 times"):
        pipe()
    assert len(guide.bank) == 0 and guide.calls == 0
    assert type(pipe) is _Forgetful and "step" not in vars(pipe.scheduler)


def test_everything_is_restored_after_an_exception():
    pipe = tiny_pipeline("sd15")
    cls, call = type(pipe), type(pipe).__call__
    guide = DiversityGuidance(1.0, sigma_cond=0.5, scale=0.2)
    with pytest.raises(ValueError, match="height"), sparke(pipe, guide):
        pipe(**{**tiny_call_kwargs("sd15"), "height": 13})  # diffusers rejects it
    assert type(pipe) is cls and cls.__call__ is call
    assert "step" not in vars(pipe.scheduler) and not pipe.unet._forward_pre_hooks
    assert len(guide.bank) == 0
    with pytest.raises(KeyError, match="inside"), sparke(pipe, guide):
        raise KeyError("inside")
    assert type(pipe) is cls


def test_sparke_bad_input_and_nesting():
    pipe = tiny_pipeline("dit")
    with pytest.raises(TypeError, match="guidance must be"):
        with sparke(pipe, "guide"):
            pass
    filled = DiversityGuidance(1.0)
    filled.commit(torch.ones(1, 4))
    with pytest.raises(ValueError, match="committed without cond"):
        with sparke(pipe, filled, cond=torch.zeros(2, 3)):
            pass
    with pytest.raises(TypeError, match="with a scheduler"):
        with sparke(object(), DiversityGuidance(1.0)):
            pass
    with sparke(pipe, DiversityGuidance(1.0)), pytest.raises(ValueError, match="already inside"):
        with sparke(pipe, DiversityGuidance(1.0)):
            pass
    assert type(pipe).__name__ == "DiTPipeline"


def test_explicit_cond_and_a_user_callback_inside_sparke():
    pipe = tiny_pipeline("flux")
    cond = torch.randn(B, 6, generator=torch.Generator().manual_seed(3))
    guide = DiversityGuidance(1.0, sigma_cond=0.5, scale=0.2)
    seen = []

    def mine(p, i, t, kw):
        seen.append(sorted(kw))
        return kw

    with sparke(pipe, guide, cond=cond) as s:
        pipe(
            **tiny_call_kwargs("flux"),
            callback_on_step_end=mine,
            callback_on_step_end_tensor_inputs=["prompt_embeds"],
        )
    assert s.cond_source == "cond" and torch.equal(guide.bank.cond, cond)
    assert seen == [["latents", "prompt_embeds"]] * 2  # ran after the guidance, got its tensors


def test_sparke_callback_names_the_missing_tensor_input():
    pipe = tiny_pipeline("flux")  # reads callback_on_step_end_tensor_inputs, not tensor_inputs
    assert "callback_on_step_end_tensor_inputs" in inspect.signature(type(pipe).__call__).parameters
    guide = DiversityGuidance(1.0, sigma_cond=0.5, scale=0.2)
    cb = sparke_callback(guide)
    with pytest.raises(ValueError, match=r"callback_on_step_end_tensor_inputs=\['latents', 'pro"):
        pipe(**tiny_call_kwargs("flux"), callback_on_step_end=cb)
    pipe(
        **tiny_call_kwargs("flux"),
        callback_on_step_end=cb,
        callback_on_step_end_tensor_inputs=cb.tensor_inputs,
    )
    assert len(guide.bank) == B and guide.bank.cond.shape == (B, 32)


def test_sparke_callback_prefers_the_pooled_embedding():
    pipe = tiny_pipeline("sd3")
    guide = DiversityGuidance(1.0, sigma_cond=0.5, scale=0.2)
    cb = sparke_callback(guide, pooled="pooled_prompt_embeds")
    assert cb.tensor_inputs == ["latents", "pooled_prompt_embeds"]
    pipe(**tiny_call_kwargs("sd3", cfg=True), callback_on_step_end=cb)  # SD3 reads tensor_inputs
    assert torch.allclose(guide.bank.cond, expected_cond("sd3", pipe), atol=1e-5)


def test_the_docs_example_prints_the_support_table(capsys):
    """examples/diffusers_pipelines.py (the docs' table) runs on the shared tiny builders."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "diffusers_pipelines.py"
    spec = importlib.util.spec_from_file_location("diffusers_pipelines", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.main(["dit"])
    assert [r["bank"] for r in rows] == [[2, 4]] * 3
    assert all(r["change"] > 1e-3 for r in rows)
    assert (
        "| DiTPipeline (dit) | c | scheduler.step | class_labels | 2 -> 4 |"
        in capsys.readouterr().out
    )


def test_tiny_guided_run_names_a_bad_mode():
    with pytest.raises(ValueError, match="mode must be 'a', 'b' or 'c', got 'd'"):
        tiny_guided_run("dit", "d")


# ------------------------------------------------------------------ encoder features

VAE_PIPELINES = [
    "sd15",
    "sdxl",
    "controlnet",
    "pixart_sigma",
    "dit",
    "kandinsky3",
    "sd3",
    "flux",
    "cogvideox",
]


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW else []) for n in VAE_PIPELINES],
)
def test_encoder_features_of_the_decoded_prediction(name):
    from rkekernels.adapters._tiny import tiny_clip_encoder
    from rkekernels.adapters.diffusers import decode_latents, decoded_features

    pipe, enc = tiny_pipeline(name), tiny_clip_encoder()
    fn = decoded_features(pipe, enc)
    guide = DiversityGuidance(1.0, sigma_cond=0.5, scale=0.2, feature_fn=fn)
    seen = []
    enc_call = type(enc).__call__

    class Spy(type(enc)):
        def __call__(self, images, **kw):
            seen.append(images.detach().clone())
            return enc_call(self, images, **kw)

    enc.__class__ = Spy
    try:
        with sparke(pipe, guide):
            outs = [tiny_output(pipe(**tiny_call_kwargs(name, seed=s))) for s in range(2)]
    finally:
        enc.__class__ = Spy.__mro__[1]
    plain = tiny_output(pipe(**tiny_call_kwargs(name, seed=1)))
    assert (outs[1] - plain).abs().amax() > 1e-3  # guided in encoder space
    if name == "dit":
        assert guide.bank.features.shape == (2 * B, enc.dim)
    else:  # the bank holds the encoder features of the decoded final latents (video: frames)
        size = (8, 8) if name == "flux" else None
        with torch.no_grad():
            want = enc(decode_latents(pipe, outs[1], size).float(), value_range=(-1, 1))
        want = features(want.reshape(B, -1))
        assert want.shape[1] % enc.dim == 0 and guide.bank.features.shape == (2 * B, want.shape[1])
        assert torch.allclose(guide.bank.features[B:].float(), want, atol=1e-4)
    assert fn.x0 is None and len(seen) == 2 * (2 + 1)  # 2 guided steps + 1 commit per call
    assert not torch.equal(seen[0], seen[1])  # step 0 decodes the prediction, not the latents


def test_decoded_features_use_the_x0_prediction():
    """Step 0 decodes DDIM's pred_original_sample of step 0 (computed here unguided)."""
    from rkekernels.adapters._tiny import tiny_clip_encoder
    from rkekernels.adapters.diffusers import decode_latents, decoded_features

    pipe, enc = tiny_pipeline("sd15"), tiny_clip_encoder()
    x0s = []
    orig = type(pipe.scheduler).step

    def spy(self, *a, **k):
        out = orig(self, *a, **k)
        x0s.append(out[1] if isinstance(out, tuple) else out.pred_original_sample)
        return out

    pipe.scheduler.step = spy.__get__(pipe.scheduler)
    try:
        pipe(**tiny_call_kwargs("sd15"))
    finally:
        del pipe.scheduler.step
    fn = decoded_features(pipe, enc)
    images = []
    decode = fn.__call__

    class Recorder(type(fn)):
        def __call__(self, z):
            images.append(decode_latents(self.pipe, self.x0 if self.x0 is not None else z))
            return decode(z)

    fn.__class__ = Recorder
    guide = DiversityGuidance(1.0, scale=0.2, feature_fn=fn)
    with sparke(pipe, guide):
        pipe(**tiny_call_kwargs("sd15"))
    with torch.no_grad():
        assert torch.allclose(images[0], decode_latents(pipe, x0s[0]), atol=1e-5)

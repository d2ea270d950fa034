"""The pipeline builders of `rkekernels.adapters._tiny`, one per family, and their table.

Each builder takes the ``diffusers`` module and the pipeline's name and assembles the pipeline
from the parts of `rkekernels.adapters._tiny_parts` (and its own denoiser), drawing the random
weights in a fixed order from torch's global generator: `rkekernels.adapters._tiny._build` seeds
it first.
"""

from __future__ import annotations

from typing import Any

from ._tiny_parts import (
    _DIT_BLOCKS,
    TOKENS,
    WIDTH,
    _clip,
    _controlnet,
    _ddim,
    _movq,
    _t5,
    _unet,
    _vae,
    _vocab_size,
    tiny_tokenizer,
)


def _sd(d: Any, name: str) -> Any:
    """SD 1.5 / 2.x (v-prediction), ControlNet SD, SD img2img and inpainting: CLIP text
    encoder, UNet, DDIM."""
    parts = dict(
        vae=_vae(),
        text_encoder=_clip(),
        tokenizer=tiny_tokenizer(),
        unet=_unet(WIDTH, v2=name == "sd2"),
        scheduler=_ddim(prediction_type="v_prediction" if name == "sd2" else "epsilon"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if name == "controlnet":
        parts["controlnet"] = _controlnet(WIDTH)
        return d.StableDiffusionControlNetPipeline(**parts)
    if name == "img2img":
        return d.StableDiffusionImg2ImgPipeline(**parts)
    if name == "inpaint":  # a 4-channel UNet: the pipeline blends the masked latents itself
        return d.StableDiffusionInpaintPipeline(**parts)
    return d.StableDiffusionPipeline(**parts)


def _sdxl(d: Any, name: str) -> Any:
    """SDXL and ControlNet SDXL: two CLIP text encoders (the second with projection)."""
    parts = dict(
        vae=_vae(),
        text_encoder=_clip(hidden=WIDTH // 2),
        text_encoder_2=_clip(projection=True, hidden=WIDTH),
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(),
        unet=_unet(WIDTH + WIDTH // 2, sdxl=True),
        scheduler=_ddim(),
    )
    if name == "controlnet_sdxl":
        parts["controlnet"] = _controlnet(WIDTH + WIDTH // 2, sdxl=True)
        return d.StableDiffusionXLControlNetPipeline(**parts)
    return d.StableDiffusionXLPipeline(**parts)


def _pixart(d: Any, name: str) -> Any:
    """PixArt-Sigma / -Alpha: a PixArt transformer with a T5 text encoder."""
    transformer = d.PixArtTransformer2DModel(
        caption_channels=WIDTH,
        cross_attention_dim=16,
        norm_type="ada_norm_single",
        norm_eps=1e-6,
        **_DIT_BLOCKS,
    ).eval()
    cls = d.PixArtSigmaPipeline if name == "pixart_sigma" else d.PixArtAlphaPipeline
    return cls(
        tokenizer=tiny_tokenizer(bos=False),
        text_encoder=_t5(),
        vae=_vae(),
        transformer=transformer,
        scheduler=_ddim(),
    )


def _dit(d: Any, name: str) -> Any:
    """DiT: a class-conditional transformer (no text encoder)."""
    transformer = d.Transformer2DModel(norm_type="ada_norm_zero", **_DIT_BLOCKS).eval()
    return d.DiTPipeline(transformer=transformer, vae=_vae(), scheduler=_ddim())


def _kandinsky3(d: Any, name: str) -> Any:
    """Kandinsky 3: its UNet, a MoVQ decoder and a T5 text encoder."""
    unet = d.Kandinsky3UNet(
        in_channels=4,
        time_embedding_dim=4,
        groups=2,
        attention_head_dim=4,
        layers_per_block=3,
        block_out_channels=(32, 64),
        cross_attention_dim=4,
        encoder_hid_dim=WIDTH,
    ).eval()
    movq = _movq(d)
    scheduler = d.DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=True,
        thresholding=False,
    )
    return d.Kandinsky3Pipeline(
        tokenizer=tiny_tokenizer(bos=False),
        text_encoder=_t5(),
        unet=unet,
        scheduler=scheduler,
        movq=movq,
    )


def _sd3(d: Any, name: str) -> Any:
    """SD3: an MMDiT transformer, two CLIP encoders and a T5 one, flow matching."""
    transformer = d.SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=WIDTH,
        pooled_projection_dim=2 * WIDTH,
        out_channels=4,
    ).eval()
    return d.StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=d.FlowMatchEulerDiscreteScheduler(),
        vae=_vae(blocks=1, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_clip(projection=True),
        tokenizer=tiny_tokenizer(),
        text_encoder_2=_clip(projection=True),
        tokenizer_2=tiny_tokenizer(),
        text_encoder_3=_t5(),
        tokenizer_3=tiny_tokenizer(bos=False),
    )


def _flux(d: Any, name: str) -> Any:
    """Flux: its transformer, a CLIP and a T5 encoder, flow matching."""
    transformer = d.FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=WIDTH,
        pooled_projection_dim=WIDTH,
        axes_dims_rope=[4, 4, 8],
    ).eval()
    return d.FluxPipeline(
        scheduler=d.FlowMatchEulerDiscreteScheduler(),
        vae=_vae(latent_channels=1, blocks=1, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_clip(),
        tokenizer=tiny_tokenizer(),
        text_encoder_2=_t5(),
        tokenizer_2=tiny_tokenizer(bos=False),
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )


def _cogvideox(d: Any, name: str) -> Any:
    """CogVideoX: a 3-D transformer and video VAE with a T5 text encoder."""
    transformer = d.CogVideoXTransformer3DModel(
        num_attention_heads=4,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=WIDTH,
        num_layers=1,
        sample_width=2,
        sample_height=2,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=TOKENS,
    ).eval()
    vae = d.AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    ).eval()
    return d.CogVideoXPipeline(
        tokenizer=tiny_tokenizer(bos=False),
        text_encoder=_t5(),
        vae=vae,
        transformer=transformer,
        scheduler=_ddim(),
    )


def _animatediff(d: Any, name: str) -> Any:
    """AnimateDiff: the SD UNet turned into a UNetMotionModel by a tiny MotionAdapter."""
    adapter = d.MotionAdapter(
        block_out_channels=(8, 16),
        motion_layers_per_block=1,
        motion_norm_num_groups=2,
        motion_num_attention_heads=2,
        motion_max_seq_length=8,
    )
    return d.AnimateDiffPipeline(
        vae=_vae(),
        text_encoder=_clip(),
        tokenizer=tiny_tokenizer(),
        unet=_unet(WIDTH),
        motion_adapter=adapter,
        scheduler=_ddim(),
        feature_extractor=None,
        image_encoder=None,
    )


def _kandinsky22(d: Any, name: str) -> Any:
    """Kandinsky 2.2's decoder: a UNet conditioned on an image embedding only, MoVQ, DDPM."""
    unet = d.UNet2DConditionModel(
        in_channels=4,
        out_channels=8,  # learned variance
        addition_embed_type="image",
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(8, 16),
        layers_per_block=1,
        encoder_hid_dim=WIDTH,
        encoder_hid_dim_type="image_proj",
        cross_attention_dim=16,
        attention_head_dim=4,
        resnet_time_scale_shift="scale_shift",
        class_embed_type=None,
        norm_num_groups=4,
    ).eval()
    scheduler = d.DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        beta_schedule="linear",
        clip_sample=False,
        variance_type="learned_range",
    )
    return d.KandinskyV22Pipeline(unet=unet, scheduler=scheduler, movq=_movq(d))


def _qwenimage(d: Any, name: str) -> Any:
    """QwenImage: its transformer and video-style VAE, a Qwen2.5-VL text encoder (random,
    vocabulary of `tiny_tokenizer`), flow matching."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    transformer = d.QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=WIDTH // 2,
        axes_dims_rope=(2, 2, 4),
    ).eval()
    vae = d.AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    ).eval()
    text = dict(
        vocab_size=_vocab_size(),
        hidden_size=WIDTH // 2,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        rope_parameters={"mrope_section": [1, 1, 2], "rope_type": "default", "rope_theta": 1e6},
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    vision = dict(depth=1, hidden_size=8, intermediate_size=8, num_heads=2, out_hidden_size=16)
    encoder = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(text_config=text, vision_config=vision)
    ).eval()
    tok = tiny_tokenizer(bos=False)
    tok.model_max_length = 10**6  # the pipeline pads to the longest prompt, no further
    pipe = d.QwenImagePipeline(
        scheduler=d.FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=encoder,
        tokenizer=tok,
        transformer=transformer,
    )
    # the hidden states dropped: the template before the prompt, as this tokenizer splits it
    # (34 tokens for Qwen's own tokenizer)
    prefix = pipe.prompt_template_encode.split("{}")[0]
    pipe.prompt_template_encode_start_idx = len(tok(prefix, add_special_tokens=False).input_ids)
    return pipe


def _stable_audio(d: Any, name: str) -> Any:
    """Stable Audio: its DiT, an Oobleck VAE, a T5 text encoder and the projection model."""
    transformer = d.StableAudioDiTModel(
        sample_size=4,
        in_channels=3,
        num_layers=1,
        attention_head_dim=4,
        num_attention_heads=2,
        num_key_value_attention_heads=2,
        out_channels=3,
        cross_attention_dim=4,
        time_proj_dim=8,
        global_states_input_dim=2 * WIDTH,  # [start, end] seconds embeddings
        cross_attention_input_dim=WIDTH,
    ).eval()
    vae = d.AutoencoderOobleck(
        encoder_hidden_size=6,
        downsampling_ratios=[1, 2],
        decoder_channels=3,
        decoder_input_channels=3,
        audio_channels=2,
        channel_multiples=[2, 4],
        sampling_rate=4,
    ).eval()
    projection = d.StableAudioProjectionModel(
        text_encoder_dim=WIDTH, conditioning_dim=WIDTH, min_value=0, max_value=32
    ).eval()
    # the pipeline's own CosineDPMSolverMultistepScheduler needs torchsde: its deterministic
    # EDM sibling (same sigmas and v-prediction)
    scheduler = d.EDMDPMSolverMultistepScheduler(
        solver_order=2,
        prediction_type="v_prediction",
        sigma_data=1.0,
        sigma_schedule="exponential",
    )
    return d.StableAudioPipeline(
        vae=vae,
        text_encoder=_t5(),
        projection_model=projection,
        tokenizer=tiny_tokenizer(bos=False),
        transformer=transformer,
        scheduler=scheduler,
    )


#: name -> builder(diffusers, name): the pipeline with its components, built in a fixed order
#: (the order their random weights are drawn in after ``torch.manual_seed(0)``)
_BUILDERS = {
    "sd15": _sd,
    "sd2": _sd,
    "controlnet": _sd,
    "sdxl": _sdxl,
    "controlnet_sdxl": _sdxl,
    "pixart_sigma": _pixart,
    "pixart_alpha": _pixart,
    "dit": _dit,
    "kandinsky3": _kandinsky3,
    "sd3": _sd3,
    "flux": _flux,
    "cogvideox": _cogvideox,
    "img2img": _sd,
    "inpaint": _sd,
    "animatediff": _animatediff,
    "kandinsky22": _kandinsky22,
    "qwenimage": _qwenimage,
    "stable_audio": _stable_audio,
}

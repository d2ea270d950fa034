"""The models of the tiny pipelines of `rkekernels.adapters._tiny`, every configuration in one
place: the word-level tokenizer, the components several pipelines share (CLIP and T5 text
encoders, VAE, UNet and ControlNet, DDIM, MoVQ, the DiT transformer blocks), then one builder per
family and their table `_BUILDERS`.

Each builder draws its random weights from torch's global generator when called, in a fixed
order: `rkekernels.adapters._tiny` seeds it first. Needs diffusers and transformers (the
``diffusers`` extra).
"""

from __future__ import annotations

from typing import Any

__all__ = ["TOKENS", "WIDTH", "WORDS", "tiny_tokenizer"]

WIDTH = 32  # text embedding width
TOKENS = 8  # tokenizer length of the CLIP-style encoders (and max_sequence_length of T5 ones)
WORDS = (
    "a photo of the dog cat car red blue green on in at beach snow city painting squirrel "
    "eating burger bad quality dance monkey tree house small big"
).split()


def tiny_tokenizer(max_length: int = TOKENS, *, bos: bool = True) -> Any:
    """A word-level fast tokenizer: ids 0 <pad>, 1 <unk>, 2 <s>, 3 </s>, then `WORDS`.

    ``bos=True`` wraps a text as ``<s> words </s>`` (CLIP style), else ``words </s>`` (T5).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(("<pad>", "<unk>", "<s>", "</s>", *WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    single = "<s> $A </s>" if bos else "$A </s>"
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("<s>", 2), ("</s>", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def _vocab_size() -> int:
    return 4 + len(WORDS)


def _clip(projection: bool = False, hidden: int = WIDTH) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=_vocab_size(),
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TOKENS,
        projection_dim=hidden,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(cfg).eval()


def _clip_vision() -> Any:
    """The random-weight CLIP image model of `rkekernels.adapters._tiny.tiny_clip_encoder`."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(
        image_size=16,
        patch_size=4,
        hidden_size=WIDTH,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=WIDTH,
    )
    return CLIPVisionModelWithProjection(cfg)


def _t5() -> Any:
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=_vocab_size(),
        d_model=WIDTH,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=3,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(cfg).eval()


def _vae(latent_channels: int = 4, blocks: int = 2, **kw: Any) -> Any:
    from diffusers import AutoencoderKL

    ch = (8, 16)[:blocks] if blocks <= 2 else (8,) * blocks
    return AutoencoderKL(
        block_out_channels=ch,
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks,
        latent_channels=latent_channels,
        norm_num_groups=4 if blocks > 1 or ch[0] % 4 == 0 else 1,
        layers_per_block=1,
        **kw,
    ).eval()


#: the down path the UNet and its ControlNet share (a ControlNet copies the UNet's encoder)
_DOWN_PATH = dict(
    block_out_channels=(8, 16),
    layers_per_block=1,
    in_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    norm_num_groups=4,
)

#: SDXL's added conditioning (pooled text and time ids), in the UNet and its ControlNet alike
_SDXL_ADDITIONS = dict(
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=8 * 6 + WIDTH,
    transformer_layers_per_block=(1, 1),
)


def _unet(cross: int, sdxl: bool = False, v2: bool = False) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        **_DOWN_PATH,
        sample_size=8,
        out_channels=4,
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross,
        attention_head_dim=(2, 4) if v2 else 4,
        use_linear_projection=v2 or sdxl,
        **(_SDXL_ADDITIONS if sdxl else {}),
    ).eval()


def _ddim(**kw: Any) -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        **kw,
    )


#: the transformer blocks PixArt and DiT share (8x8 latents, patches of 2, 1000 classes)
_DIT_BLOCKS = dict(
    sample_size=8,
    num_layers=1,
    patch_size=2,
    attention_head_dim=8,
    num_attention_heads=2,
    in_channels=4,
    out_channels=8,
    attention_bias=True,
    activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000,
    norm_elementwise_affine=False,
)


def _movq(d: Any) -> Any:
    """The MoVQ decoder of Kandinsky 2.2 and 3 (spatial norms: 32 groups, so 32 channels)."""
    return d.VQModel(
        block_out_channels=[32, 64],
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        in_channels=3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        norm_type="spatial",
        num_vq_embeddings=12,
        out_channels=3,
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        vq_embed_dim=4,
    ).eval()


def _controlnet(cross: int, sdxl: bool = False) -> Any:
    from diffusers import ControlNetModel

    return ControlNetModel(
        **_DOWN_PATH,
        cross_attention_dim=cross,
        conditioning_embedding_out_channels=(4, 8),
        attention_head_dim=4,
        **(dict(_SDXL_ADDITIONS, use_linear_projection=True) if sdxl else {}),
    ).eval()


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

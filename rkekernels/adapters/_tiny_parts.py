"""The parts of the tiny pipelines of `rkekernels.adapters._tiny`: constants, the word-level
tokenizer, and the small components several pipelines share (CLIP and T5 text encoders, VAE, UNet
and ControlNet, DDIM, MoVQ, the DiT transformer blocks).

Each builder draws its random weights from torch's global generator when called: the caller
(`rkekernels.adapters._tiny._build`) seeds it and fixes the order. Needs diffusers and
transformers (the ``diffusers`` extra).
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

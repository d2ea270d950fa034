"""rkekernels.adapters.encoders: tiny random-weight models, nothing downloaded."""

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rkekernels.adapters.encoders import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderUnavailableError,
    load_encoder,
    load_image,
    load_text_encoder,
)
from tests.conftest import tiny_clip, tiny_dinov2, write_images

pytest.importorskip("transformers")


def _smooth_image(h, w, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w, yy / h, (xx + yy) / (h + w)], -1) * 200 + 20
    return Image.fromarray((base + rng.normal(0, 2, base.shape)).clip(0, 255).astype(np.uint8))


def test_pixels_value_range_gradient_and_mixed_sizes():
    enc = load_encoder("pixels", size=4, batch_size=2)
    x = torch.rand(3, 3, 8, 8, requires_grad=True)
    f01 = enc(x)
    f11 = enc(x * 2 - 1, value_range=(-1, 1))
    assert f01.shape == (3, 48)
    torch.testing.assert_close(f01, f11)
    torch.testing.assert_close(
        f01, F.interpolate(x, size=(4, 4), mode="bilinear", antialias=True).flatten(1)
    )
    f01.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    imgs = [
        torch.rand(3, 8, 8),
        torch.rand(3, 5, 9),
        np.random.default_rng(0).integers(0, 255, (6, 6, 3), dtype=np.uint8),
    ]
    out = enc.encode(imgs)
    assert out.shape == (3, 48) and out.dtype == torch.float32
    torch.testing.assert_close(out[0], enc(imgs[0][None])[0].detach())


def test_clip_preprocessing_matches_the_published_transform():
    """Same pixels as transformers' CLIPImageProcessor (PIL bicubic) up to resampling noise."""
    from transformers import BitImageProcessor, CLIPImageProcessor

    img = _smooth_image(24, 40)
    enc = load_encoder("clip", model=tiny_clip()[0])
    mine = enc.transform(load_image_from_pil(img))
    theirs = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})(
        images=img, return_tensors="pt"
    )["pixel_values"]
    assert mine.shape == theirs.shape == (1, 3, 16, 16)
    assert (mine - theirs).abs().mean() < 0.02
    # DINOv2: shortest side to 256/224 of the crop, centre crop, ImageNet statistics
    dino = load_encoder("dinov2", model=tiny_dinov2())
    assert (dino.transform.resize, dino.transform.crop) == (18, 16)
    theirs = BitImageProcessor(
        size={"shortest_edge": 18},
        crop_size={"height": 16, "width": 16},
        do_center_crop=True,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        do_convert_rgb=True,
    )(images=img, return_tensors="pt")["pixel_values"]
    mine = dino.transform(load_image_from_pil(img))
    assert (mine - theirs).abs().mean() < 0.02
    # a wrong convention (no crop, other statistics) is far off: the check can fail
    wrong = (
        F.interpolate(load_image_from_pil(img), size=(16, 16))
        - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    ) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert (wrong - theirs).abs().mean() > 0.1


def load_image_from_pil(img):
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def test_clip_and_dinov2_features_equal_the_models_own_outputs_with_gradients():
    clip, tok = tiny_clip()
    dino = tiny_dinov2()
    x = torch.rand(2, 3, 16, 16)
    enc = load_encoder("clip", model=clip, tokenizer=tok, value_range=(-1, 1))
    xr = (x * 2 - 1).requires_grad_(True)
    f = enc(xr)
    px = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    want = clip.visual_projection(clip.vision_model(pixel_values=px).pooler_output)
    torch.testing.assert_close(f, F.normalize(want, dim=1), atol=1e-5, rtol=1e-5)
    assert f.shape == (2, 16) and enc.dim == 16
    f[:, 0].sum().backward()
    assert xr.grad is not None and torch.isfinite(xr.grad).all() and xr.grad.abs().sum() > 0

    enc_d = load_encoder("dinov2", model=dino)
    big = torch.rand(2, 3, 18, 18)
    px = (big[..., 1:17, 1:17] - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_STD
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(
        enc_d(big), dino(pixel_values=px).pooler_output, atol=1e-5, rtol=1e-5
    )
    assert enc_d.dim == 32


def test_half_precision_is_close_to_float32():
    dino = tiny_dinov2()
    x = torch.rand(2, 3, 16, 16)
    f32 = load_encoder("dinov2", model=tiny_dinov2()).encode(x)
    f16 = load_encoder("dinov2", model=dino, half=True).encode(x)
    assert f16.dtype == torch.float32
    assert (f16 - f32).abs().max() < 0.05 * f32.abs().max()


def test_text_tower_embeds_prompts():
    clip, tok = tiny_clip()
    enc = load_encoder("clip", model=clip, tokenizer=tok, batch_size=2)
    e = enc.encode_text(["a cat", "a dog on a mat", "a cat"])
    assert e.shape == (3, 16)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(e[0], e[2])
    assert (e[0] - e[1]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="no text tower"):
        load_encoder("dinov2", model=tiny_dinov2()).encode_text(["a"])
    txt = load_text_encoder(clip, tokenizer=tok)
    torch.testing.assert_close(txt.encode(["a cat"])[0], e[0])


def test_saved_folders_load_offline_and_missing_weights_say_how_to_get_them(
    tiny_encoder_dirs, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    paths = write_images(tmp_path / "imgs", 3, size=[16, 20, 12])
    enc = load_encoder("clip", model=tiny_encoder_dirs["clip"])
    assert enc.model_id == tiny_encoder_dirs["clip"] and enc.text is not None
    assert enc.encode(paths).shape == (3, 16)
    enc_d = load_encoder("dinov2", model=tiny_encoder_dirs["dinov2"])
    assert enc_d.encode(paths, progress=True).shape == (3, 32)
    with pytest.raises(EncoderUnavailableError, match="hf download no-such/model") as err:
        load_encoder("dinov2", model="no-such/model")
    assert "\n" not in str(err.value)
    with pytest.raises(EncoderUnavailableError, match="unknown encoder 'resnet'"):
        load_encoder("resnet")


def test_corrupt_image_names_the_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"bad\.png"):
        load_image(bad)
    with pytest.raises(ValueError, match=r"\(b, 3, H, W\)"):
        load_encoder("pixels")(torch.rand(3, 8, 8))


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is not None, reason="torchvision present"
)
def test_inception_without_torchvision_says_what_to_install():
    with pytest.raises(EncoderUnavailableError, match=r"pip install 'rkekernels\[inception\]'"):
        load_encoder("inception")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="needs torchvision")
def test_inception_pool3_features_from_a_random_weight_model():
    import torchvision

    model = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    enc = load_encoder("inception", model=model, batch_size=2)
    f = enc.encode([torch.rand(3, 32, 40), torch.rand(3, 16, 16)])
    assert f.shape == (2, 2048) and torch.isfinite(f).all()


class _InceptionLike(torch.nn.Module):
    """The parts of torchvision's Inception3 the wrapper touches: fc, aux_logits, AuxLogits."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(3, 2048)  # pool, then widen: no 2048 x 299 x 299 maps
        self.fc = torch.nn.Linear(2048, 10)
        self.aux_logits, self.AuxLogits, self.transform_input = True, torch.nn.Identity(), True
        self.seen = None

    def forward(self, x):
        self.seen = x
        return self.fc(self.body(x.mean((2, 3))))


def test_inception_wrapper_pool_features_and_fid_transform():
    model = _InceptionLike()
    enc = load_encoder("inception", model=model, batch_size=2)
    x = torch.rand(3, 3, 40, 24)
    f = enc(x)
    assert f.shape == (3, 2048) and enc.dim == 2048  # fc removed: the pool features
    assert model.seen.shape == (3, 3, 299, 299) and not model.transform_input
    want = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False, antialias=True)
    want = (want - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(model.seen, want)

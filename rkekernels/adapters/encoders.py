"""Image and text encoders for evaluation and encoder-feature guidance (transformers, torchvision).

One module, one entry point: `load_encoder` (name) -> `ImageEncoder`.

========== ============================================ ======= ==================================
name       model (default weights)                      D       published pre-processing
========== ============================================ ======= ==================================
pixels     none (the resized pixels themselves)          3 s^2   resize to s x s (default 32)
clip       transformers CLIPModel                       768     shortest side -> 224 (bicubic),
           ``openai/clip-vit-large-patch14``                    centre crop 224, CLIP mean/std;
                                                                 projected embedding, L2-normalised
dinov2     transformers Dinov2Model                     1024    shortest side -> 256 (bicubic),
           ``facebook/dinov2-large``                            centre crop 224, ImageNet mean/std;
                                                                 the CLS token (``pooler_output``)
inception  torchvision inception_v3 (IMAGENET1K_V1)     2048    resize to 299 x 299 (bilinear, the
                                                                 FID convention), ImageNet mean/std;
                                                                 the pool3 features
========== ============================================ ======= ==================================

The crop size follows the model's ``config.image_size`` (so small models built from config classes
work the same way) and the resize is crop * 256 / 224 for DINOv2, as in its evaluation transform.
Images of mixed sizes are resized per image by the encoder's transform, then batched.

Two ways to call an encoder:

- ``encoder(images)``: a differentiable torch function, (b, 3, H, W) images with values in
  ``value_range`` ((0, 1) or (-1, 1), as a VAE decodes them) -> (b, D) features, on the encoder's
  device, with gradients w.r.t. the images (for encoder-feature guidance).
- ``encoder.encode(items)``: paths, PIL images, (3, H, W) tensors or uint8 arrays of any sizes ->
  (n, D) float32 CPU tensor, in batches of ``batch_size`` under ``torch.no_grad``, with a tqdm
  progress bar when ``progress`` is set.

CLIP also embeds text: ``encoder.encode_text(prompts)`` -> (n, D) (L2-normalised); for any image
encoder, `load_text_encoder` gives CLIP's text tower (prompts are embedded with CLIP whatever the
image encoder is).

Weights are loaded with ``from_pretrained`` from the Hugging Face cache first (no network), then,
unless ``HF_HUB_OFFLINE=1``, from the hub; ``model=`` also takes a local folder (``save_pretrained``
output) or an already-built model object. Missing weights raise `EncoderUnavailableError` with a
one-line message saying how to get them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ._images import _as_chw, _Transform, load_image, map_batches, read_rgb, rgb_chw

__all__ = [
    "ENCODERS",
    "EncoderUnavailableError",
    "ImageEncoder",
    "TextEncoder",
    "load_encoder",
    "load_image",
    "load_text_encoder",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DEFAULT_MODELS = {
    "clip": "openai/clip-vit-large-patch14",
    "dinov2": "facebook/dinov2-large",
    "inception": "IMAGENET1K_V1",
}
ENCODERS = ("pixels", "clip", "dinov2", "inception")


class EncoderUnavailableError(ImportError, ValueError):
    """An encoder cannot be built here: an unknown name, a missing package or missing weights.

    Subclasses ImportError (something is missing) and ValueError (a bad argument); the message is
    one line and says how to get what is missing.
    """


# --------------------------------------------------------------------------- encoders


class ImageEncoder(torch.nn.Module):
    """An image model with its published pre-processing: images -> (b, D) features.

    Build one with `load_encoder`. ``encoder(images)`` is differentiable; ``encode`` batches
    any number of images of any sizes without gradients.

    Attributes:
        name: "pixels", "clip", "dinov2" or "inception".
        model_id: the weights it was built from (hub id, folder, or "random"/"none").
        dim: D, the feature width.
        value_range: what ``__call__`` expects by default, (0, 1) or (-1, 1).
        batch_size, device, dtype: as given to `load_encoder`.
    """

    def __init__(
        self,
        name: str,
        model: torch.nn.Module | None,
        embed: Callable[[torch.nn.Module | None, torch.Tensor], torch.Tensor],
        transform: _Transform,
        *,
        dim: int,
        model_id: str,
        normalize: bool,
        batch_size: int,
        device: torch.device,
        half: bool,
        value_range: tuple[float, float],
        text: TextEncoder | None = None,
    ):
        super().__init__()
        self.name, self.model_id, self.dim = name, model_id, int(dim)
        self.model = model
        self._embed, self.transform, self.normalize = embed, transform, normalize
        self.batch_size, self.device = int(batch_size), device
        self.dtype = torch.float16 if half else torch.float32
        self.value_range = _check_range(value_range)
        self.text = text
        if model is not None:
            model.to(device=device, dtype=self.dtype).eval()
            model.requires_grad_(False)

    @property
    def key(self) -> str:
        """A string that identifies the features (for on-disk caches): name, weights, transform."""
        t = self.transform
        return f"{self.name}|{self.model_id}|{t.resize}|{t.crop}|{t.mode}|norm={self.normalize}"

    def forward(
        self, images: torch.Tensor, *, value_range: tuple[float, float] | None = None
    ) -> torch.Tensor:
        """(b, 3, H, W) images -> (b, D) float32 features, differentiable w.r.t. ``images``.

        Args:
            images: a float tensor of shape (b, 3, H, W) (or (b, 1, H, W), repeated to RGB),
                values in ``value_range``; any H, W (the encoder resizes).
            value_range: (0, 1) or (-1, 1); None uses the encoder's ``value_range``.

        Returns:
            (b, D) float32 features on the encoder's device.

        Example:
            >>> import torch
            >>> from rkekernels.adapters.encoders import load_encoder
            >>> enc = load_encoder("pixels", size=8)
            >>> x = torch.rand(2, 3, 16, 16, requires_grad=True)
            >>> f = enc(x)
            >>> tuple(f.shape), f.requires_grad
            ((2, 192), True)
        """
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images)
            raise ValueError(f"images must be a (b, 3, H, W) tensor; got {shape}")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if images.shape[1] != 3:
            raise ValueError(f"images must have 3 channels (b, 3, H, W); got {images.shape[1]}")
        lo, hi = _check_range(value_range) if value_range is not None else self.value_range
        x = images.to(self.device, torch.float32)
        if (lo, hi) != (0.0, 1.0):
            x = (x - lo) / (hi - lo)
        return self._features(self.transform.geometry(x))

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """Resized [0, 1] images (b, 3, h, w) -> (b, D) features."""
        f = self._embed(self.model, self.transform.normalise(x).to(self.dtype)).float()
        return F.normalize(f, dim=1) if self.normalize else f

    def encode(
        self,
        items: Sequence[Any] | torch.Tensor,
        *,
        progress: bool = False,
        desc: str = "encode",
        workers: int = 0,
    ) -> torch.Tensor:
        """Encode any number of images without gradients: (n, D) float32 CPU tensor.

        Streamed: ``batch_size`` images are decoded, resized and encoded at a time, so memory
        holds the (n, D) features and a few batches of images, not n images.

        Args:
            items: paths, PIL images, (3, H, W) tensors / (H, W, 3) uint8 arrays (mixed sizes
                allowed: each is resized by the transform), or one (n, 3, H, W) tensor in
                ``value_range``. Paths and PIL images are read as [0, 1].
            progress: show a tqdm bar (images per second) on stderr.
            workers: processes that read and decode image files (paths only) while the model
                runs; 0 decodes in this process (`map_batches`).

        Example:
            >>> import torch
            >>> from rkekernels.adapters.encoders import load_encoder
            >>> enc = load_encoder("pixels", size=4, batch_size=2)
            >>> imgs = [torch.rand(3, 8, 8), torch.rand(3, 5, 9), torch.rand(3, 4, 4)]
            >>> tuple(enc.encode(imgs).shape)
            (3, 48)
        """
        n = len(items)
        out = torch.empty(n, self.dim, dtype=torch.float32)
        bar = _bar(n, progress, f"{desc} ({self.name})")
        paths = not isinstance(items, torch.Tensor) and all(
            isinstance(it, str | os.PathLike) for it in items
        )
        if isinstance(items, torch.Tensor):
            batches = ((s, items[s : s + self.batch_size]) for s in range(0, n, self.batch_size))
        elif paths:
            batches = (
                (s, [rgb_chw(a) for a in arrs])
                for s, arrs in map_batches(read_rgb, items, batch=self.batch_size, workers=workers)
            )
        else:
            batches = map_batches(_as_chw, items, batch=self.batch_size)
        with torch.no_grad():
            for s, chunk in batches:
                if isinstance(chunk, torch.Tensor):
                    f = self(chunk)
                else:  # mixed sizes: resize per image, then one batch
                    geo = self.transform.geometry
                    f = self._features(torch.cat([geo(x[None].to(self.device)) for x in chunk]))
                out[s : s + len(chunk)] = f.cpu()
                bar.update(len(chunk))
        bar.close()
        return out

    def encode_text(self, prompts: Sequence[str], *, progress: bool = False) -> torch.Tensor:
        """Prompts -> (n, D_text) float32 CPU tensor with CLIP's text tower (clip encoder only)."""
        if self.text is None:
            raise ValueError(
                f"encoder {self.name!r} has no text tower; use load_text_encoder() for prompts"
            )
        return self.text.encode(prompts, progress=progress)


class TextEncoder:
    """CLIP's text tower: prompts -> (n, D) L2-normalised embeddings (``get_text_features``).

    Build it with `load_text_encoder`, or get it as ``load_encoder("clip").text``.
    """

    def __init__(self, model, tokenizer, *, model_id: str, batch_size: int, device, dtype):
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.batch_size, self.device, self.dtype = int(batch_size), device, dtype
        self.max_length = int(getattr(model.config.text_config, "max_position_embeddings", 77))

    @property
    def key(self) -> str:
        """Identifies the embeddings (for on-disk caches)."""
        return f"clip-text|{self.model_id}"

    def encode(self, prompts: Sequence[str], *, progress: bool = False) -> torch.Tensor:
        """(n,) prompts -> (n, D) float32 CPU embeddings, L2-normalised, without gradients.

        Example:
            >>> from rkekernels.adapters.encoders import load_text_encoder
            >>> load_text_encoder  # doctest: +ELLIPSIS
            <function load_text_encoder at ...>
        """
        prompts = [str(p) for p in prompts]
        outs = []
        bar = _bar(len(prompts), progress, "encode prompts (clip text)", unit=" prompt")
        with torch.no_grad():
            for s in range(0, len(prompts), self.batch_size):
                chunk = prompts[s : s + self.batch_size]
                tok = self.tokenizer(
                    chunk,
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                tok = {k: v.to(self.device) for k, v in tok.items()}
                f = _pooled(self.model.get_text_features(**tok)).float()
                outs.append(F.normalize(f, dim=1).cpu())
                bar.update(len(chunk))
        bar.close()
        dim = int(self.model.config.projection_dim)
        return torch.cat(outs) if outs else torch.empty(0, dim)


# --------------------------------------------------------------------------- loading


def _check_range(value_range) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise ValueError(
            f"value_range must be (low, high), e.g. (0, 1); got {value_range!r}"
        ) from None
    if not hi > lo:
        raise ValueError(f"value_range must have high > low; got {value_range!r}")
    return lo, hi


#: the bar's rate is always in images per second (tqdm's default turns to s/img below 1 img/s)
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}]"


def _bar(total: int, enabled: bool, desc: str, unit: str = " img"):
    """A tqdm bar on stderr counting ``unit`` (images), its rate always per second (images per
    second); a no-op if not ``enabled``."""
    if enabled:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, bar_format=BAR_FORMAT, leave=False)

    class _Null:
        def update(self, _n):
            pass

        def close(self):
            pass

    return _Null()


def _pooled(out: Any) -> torch.Tensor:
    """get_image/text_features returns a tensor (transformers 4) or an output object (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _how_to_get(name: str, model_id: str) -> str:
    return (
        f"no weights for encoder {name!r} ({model_id!r}) in the local Hugging Face cache; "
        f"download them once with network access (`hf download {model_id}`), "
        f"or pass a local folder saved with save_pretrained"
    )


def _from_pretrained(cls, name: str, model_id: str):
    """cls.from_pretrained from the cache first (no network), then the hub unless offline."""
    try:
        return cls.from_pretrained(model_id, local_files_only=True)
    except OSError:
        if _offline() or os.path.isdir(model_id):
            raise EncoderUnavailableError(_how_to_get(name, model_id)) from None
    try:
        return cls.from_pretrained(model_id)
    except OSError:
        raise EncoderUnavailableError(_how_to_get(name, model_id)) from None


def _need(package: str, extra: str):
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise EncoderUnavailableError(
            f"this encoder needs {package} ({exc}); install it: pip install 'rkekernels[{extra}]'"
        ) from None


def _model_id(model: Any, default: str) -> str:
    if model is None:
        return default
    if isinstance(model, str | os.PathLike):
        return os.fspath(model)
    path = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return path or f"object:{type(model).__name__}"


def _clip_parts(model: Any, tokenizer: Any):
    tr = _need("transformers", "encoders")
    mid = _model_id(model, DEFAULT_MODELS["clip"])
    if model is None or isinstance(model, str | os.PathLike):
        model = _from_pretrained(tr.CLIPModel, "clip", mid)
        if tokenizer is None:
            tokenizer = _from_pretrained(tr.AutoTokenizer, "clip", mid)
    elif isinstance(tokenizer, str | os.PathLike):
        tokenizer = _from_pretrained(tr.AutoTokenizer, "clip", os.fspath(tokenizer))
    return model, tokenizer, mid


def load_text_encoder(
    model: Any = None,
    *,
    tokenizer: Any = None,
    batch_size: int = 64,
    device: Any = "cpu",
    half: bool = False,
) -> TextEncoder:
    """CLIP's text tower, for prompt embeddings: ``.encode(prompts)`` -> (n, D).

    Args:
        model: None (``openai/clip-vit-large-patch14``), a hub id or local folder, or a built
            ``transformers.CLIPModel``.
        tokenizer: the matching tokenizer (loaded with the model when None and ``model`` is a
            name); a built tokenizer or a folder.
        batch_size, device, half: as in `load_encoder`.

    Raises:
        EncoderUnavailableError: transformers missing, or no weights offline.

    Example:
        >>> from rkekernels.adapters.encoders import load_text_encoder
        >>> callable(load_text_encoder)
        True
    """
    model, tokenizer, mid = _clip_parts(model, tokenizer)
    if tokenizer is None:
        raise ValueError("tokenizer is None: a built CLIPModel needs its tokenizer for text")
    dtype = torch.float16 if half else torch.float32
    dev = torch.device(device)
    model.to(device=dev, dtype=dtype).eval()
    return TextEncoder(
        model, tokenizer, model_id=mid, batch_size=batch_size, device=dev, dtype=dtype
    )


def load_encoder(
    name: str = "dinov2",
    *,
    model: Any = None,
    tokenizer: Any = None,
    batch_size: int = 32,
    device: Any = "cpu",
    half: bool = False,
    value_range: tuple[float, float] = (0.0, 1.0),
    normalize: bool | None = None,
    size: int = 32,
) -> ImageEncoder:
    """Build an image encoder by name, with its published pre-processing.

    Args:
        name: "pixels", "clip", "dinov2" or "inception" (see the module table).
        model: None for the default weights (hub cache first), a hub id, a local folder, or an
            already-built model (``transformers.CLIPModel`` / ``CLIPVisionModelWithProjection`` /
            ``Dinov2Model``, a torchvision ``Inception3``; tests pass tiny random-weight models).
        tokenizer: CLIP's tokenizer (for ``encode_text``), loaded with the model by name.
        batch_size: images per forward pass in ``encode``.
        device: where the model runs ("cpu", "cuda", a torch.device).
        half: run the model in float16 (features are returned as float32).
        value_range: what ``encoder(images)`` expects: (0, 1) or (-1, 1).
        normalize: L2-normalise the features; None keeps each encoder's convention (True for
            clip, False otherwise).
        size: the side of the ``pixels`` encoder's resize (D = 3 size^2).

    Returns:
        ImageEncoder: ``encoder(images)`` (differentiable) and ``encoder.encode(items)``.

    Raises:
        EncoderUnavailableError: unknown name, package missing, or no weights offline (the
            message says how to get them).

    Example:
        >>> import torch
        >>> from rkekernels.adapters.encoders import load_encoder
        >>> enc = load_encoder("pixels", size=4)
        >>> f = enc(torch.zeros(1, 3, 9, 9), value_range=(-1, 1))  # 0 in [-1, 1] is 0.5 in [0, 1]
        >>> tuple(f.shape), round(float(f.mean()), 4)
        ((1, 48), 0.5)
    """
    if not isinstance(name, str) or name.lower() not in ENCODERS:
        raise EncoderUnavailableError(
            f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}"
        )
    name = name.lower()
    dev = torch.device(device)
    common = dict(batch_size=batch_size, device=dev, half=half, value_range=value_range)
    if name == "pixels":
        size = int(size)
        if size < 1:
            raise ValueError(f"size must be >= 1; got {size}")
        tf = _Transform(resize=size, crop=None, mode="bilinear", mean=None, std=None)
        return ImageEncoder(
            "pixels",
            None,
            lambda _m, x: x.flatten(1),
            tf,
            dim=3 * size * size,
            model_id="none",
            normalize=bool(normalize),
            **common,
        )
    if name == "clip":
        return _build_clip(model, tokenizer, normalize, half, common)
    if name == "dinov2":
        tr = _need("transformers", "encoders")
        mid = _model_id(model, DEFAULT_MODELS["dinov2"])
        if model is None or isinstance(model, str | os.PathLike):
            model = _from_pretrained(tr.Dinov2Model, "dinov2", mid)
        crop = int(model.config.image_size)
        tf = _Transform(
            resize=round(crop * 256 / 224),
            crop=crop,
            mode="bicubic",
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        )
        return ImageEncoder(
            "dinov2",
            model,
            lambda m, x: m(pixel_values=x).pooler_output,
            tf,
            dim=int(model.config.hidden_size),
            model_id=mid,
            normalize=bool(normalize),
            **common,
        )
    return _build_inception(model, normalize, common)


def _build_clip(model, tokenizer, normalize, half, common) -> ImageEncoder:
    tr = _need("transformers", "encoders")
    model, tokenizer, mid = _clip_parts(model, tokenizer)
    vcfg = getattr(model.config, "vision_config", model.config)
    crop = int(vcfg.image_size)
    tf = _Transform(resize=crop, crop=crop, mode="bicubic", mean=CLIP_MEAN, std=CLIP_STD)
    if isinstance(model, tr.CLIPModel):

        def embed(m, x):
            return _pooled(m.get_image_features(pixel_values=x))

        dim = int(model.config.projection_dim)
    else:  # CLIPVisionModelWithProjection

        def embed(m, x):
            return m(pixel_values=x).image_embeds

        dim = int(model.config.projection_dim)
    text = None
    if tokenizer is not None and isinstance(model, tr.CLIPModel):
        text = TextEncoder(
            model,
            tokenizer,
            model_id=mid,
            batch_size=common["batch_size"],
            device=common["device"],
            dtype=torch.float16 if half else torch.float32,
        )
    norm = True if normalize is None else bool(normalize)
    return ImageEncoder(
        "clip", model, embed, tf, dim=dim, model_id=mid, normalize=norm, text=text, **common
    )


def _build_inception(model, normalize, common) -> ImageEncoder:
    mid = _model_id(model, DEFAULT_MODELS["inception"]) if not isinstance(model, str) else model
    if model is None or isinstance(model, str):
        tv = _need("torchvision", "inception")
        weights = getattr(tv.models.Inception_V3_Weights, mid, None)
        if weights is None:
            raise EncoderUnavailableError(
                f"unknown torchvision Inception weights {mid!r}; use 'IMAGENET1K_V1'"
            )
        try:
            model = tv.models.inception_v3(weights=weights, aux_logits=True)
        except (OSError, RuntimeError) as exc:  # urllib errors are OSErrors
            raise EncoderUnavailableError(
                f"no weights for encoder 'inception' ({mid}) in the torch hub cache "
                f"({torch.hub.get_dir()}): {type(exc).__name__}; run once with network access "
                "(torchvision.models.inception_v3(weights='DEFAULT') downloads them)"
            ) from None
    model.fc = torch.nn.Identity()  # the 2048-d pool3 features (FID's layer)
    model.aux_logits, model.AuxLogits = False, None
    if hasattr(model, "transform_input"):
        model.transform_input = False  # the transform below normalises already
    tf = _Transform(resize=299, crop=None, mode="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD)

    def embed(m, x):
        out = m(x)
        return out if isinstance(out, torch.Tensor) else out[0]

    return ImageEncoder(
        "inception", model, embed, tf, dim=2048, model_id=mid, normalize=bool(normalize), **common
    )

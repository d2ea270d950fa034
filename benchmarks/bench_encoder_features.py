"""Cost of one guided step: latent features against encoder features of the decoded prediction.

One `DiversityGuidance.apply` on a batch of b latents against a bank of n entries, with
(1) the default latent features (flatten, normalise) and (2) ``feature_fn=decoded_features``:
VAE decode of the x0 prediction, a CLIP vision model, and one VJP back through both. Random
weights at the real architectures' sizes (nothing downloaded): the SD 1.5 VAE decoder
(AutoencoderKL, block_out_channels 128/256/512/512) and CLIP ViT-B/16 (224 px, 12 layers,
width 768), plus the tiny pipeline of the tests. Medians of paired rounds (both paths timed in
each round), so a load that changes between rounds cancels in the ratio::

    python benchmarks/bench_encoder_features.py [--latent 16] [--rounds 3] [--threads 1]

(One thread by default: on a shared 2-core machine two threads oversubscribe and a 30 ms step
takes 0.5 to 4 s.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results

from rkekernels import DiversityGuidance
from rkekernels.adapters.diffusers import decoded_features


class _VaePipe:
    """The two attributes decode_latents reads."""

    def __init__(self, vae):
        self.vae = vae


def _sd_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        scaling_factor=0.18215,
    ).eval()


def _clip_b16():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from rkekernels.adapters.encoders import load_encoder

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(image_size=224, patch_size=16, projection_dim=512)
    return load_encoder("clip", model=CLIPVisionModelWithProjection(cfg))


def _time_pair(g_lat, g_enc, z, rounds):
    lat, enc = [], []
    for _ in range(rounds):
        for guide, out in ((g_lat, lat), (g_enc, enc)):
            t = time.perf_counter()
            guide.apply(z)
            out.append(time.perf_counter() - t)
    return statistics.median(lat), statistics.median(enc)


def run(latent: int = 16, batch: int = 2, bank: int = 1000, rounds: int = 3) -> list[dict]:
    from rkekernels.adapters._tiny import tiny_clip_encoder, tiny_pipeline

    rows = []
    setups = [
        ("tiny (tests): VAE 8/16, CLIP 16 px, width 32", tiny_pipeline("sd15"), 8, True),
        (
            f"SD 1.5 VAE decoder + CLIP ViT-B/16, {8 * latent} px",
            _VaePipe(_sd_vae()),
            latent,
            False,
        ),
    ]
    for label, pipe, side, tiny in setups:
        enc = tiny_clip_encoder() if tiny else _clip_b16()
        gen = torch.Generator().manual_seed(0)
        z = torch.randn(batch, 4, side, side, generator=gen)
        g_lat = DiversityGuidance(1.0, scale=0.1, include_batch=False)
        g_enc = DiversityGuidance(
            1.0, scale=0.1, include_batch=False, feature_fn=decoded_features(pipe, enc)
        )
        g_lat.bank.add(torch.nn.functional.normalize(torch.randn(bank, 4 * side * side), dim=1))
        g_enc.bank.add(torch.nn.functional.normalize(torch.randn(bank, enc.dim), dim=1))
        g_lat.apply(z), g_enc.apply(z)  # warm up
        t_lat, t_enc = _time_pair(g_lat, g_enc, z, rounds)
        rows.append(
            {
                "setup": label,
                "b": batch,
                "n": bank,
                "latent_ms": t_lat * 1e3,
                "encoder_ms": t_enc * 1e3,
                "ratio": t_enc / t_lat,
            }
        )
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latent", type=int, default=16, help="latent side of the SD-sized row")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = run(latent=a.latent, rounds=a.rounds)
    print(
        write_results(
            "encoder_features",
            rows,
            ["setup", "b", "n", "latent_ms", "encoder_ms", "ratio"],
            "One guided step (apply): latent features vs CLIP features of the decoded x0",
        )
    )


if __name__ == "__main__":
    main()

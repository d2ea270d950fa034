"""`sparke(pipe, guidance)` in every supported diffusers pipeline, on tiny local pipelines.

Builds each pipeline of `rkekernels.adapters._tiny` (random weights, nothing downloaded) and
runs two guided calls of 2 images, 2 steps each, in three modes: (a) unconditional
(``sigma_cond=math.inf``), (b) prompt-aware with ``cond`` pooled from the pipeline's prompt
embeddings (the default automatic ``sigma_cond=None``), (c) (b) with ``sigma_cond=0.5`` plus
classifier-free guidance. It prints, per pipeline and mode: how the pipeline is guided, where
``cond`` came from, the bank size after each call, and the largest change of the second call's
latents against the same call unguided (same seed). The docs' support table comes from it::

    python examples/diffusers_pipelines.py [NAME ...]     # default: all of them
"""

from __future__ import annotations

import argparse
import math

import torch

from rkekernels import DiversityGuidance
from rkekernels.adapters._tiny import TINY_PIPELINES, tiny_call_kwargs, tiny_pipeline
from rkekernels.adapters.diffusers import sparke


def _output(out) -> torch.Tensor:
    x = next(getattr(out, k) for k in ("frames", "audios", "images") if hasattr(out, k))
    return torch.as_tensor(x).float()


def measure(name: str, mode: str) -> dict:
    """Two guided calls of ``tiny_pipeline(name)`` in ``mode`` ("a", "b" or "c")."""
    pipe = tiny_pipeline(name)
    cfg = mode == "c"
    # scale=0.2 is larger than the default 0.1, so the change shows after 2 steps
    sigma_cond = {"a": math.inf, "b": None, "c": 0.5}[mode]
    guide = DiversityGuidance(1.0, sigma_cond=sigma_cond, scale=0.2)
    sizes = []
    with sparke(pipe, guide) as session:
        for seed in range(2):
            guided = _output(pipe(**tiny_call_kwargs(name, cfg=cfg, seed=seed)))
            sizes.append(len(guide.bank))
    plain = _output(pipe(**tiny_call_kwargs(name, cfg=cfg, seed=1)))
    return {
        "pipeline": TINY_PIPELINES[name],
        "name": name,
        "mode": mode,
        "route": session.route,
        "cond": session.cond_source or "-",
        "bank": sizes,
        "change": float((guided - plain).abs().amax()),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(TINY_PIPELINES))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [measure(n, m) for n in args.names for m in "abc"]
    print("| pipeline | mode | guided through | cond from | bank after calls | max change |")
    print("|---|---|---|---|---|---:|")
    for r in rows:
        bank = " -> ".join(str(s) for s in r["bank"])
        print(
            f"| {r['pipeline']} ({r['name']}) | {r['mode']} | {r['route']} | {r['cond']} | "
            f"{bank} | {r['change']:.3f} |"
        )
    return rows


if __name__ == "__main__":
    main()

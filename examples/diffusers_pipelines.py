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

import torch

from rkekernels.adapters._tiny import TINY_PIPELINES, tiny_guided_run


def measure(name: str, mode: str) -> dict:
    """Two guided calls of ``tiny_pipeline(name)`` in ``mode`` ("a", "b" or "c")."""
    run = tiny_guided_run(name, mode)
    return {
        "pipeline": TINY_PIPELINES[name],
        "name": name,
        "mode": mode,
        "route": run.session.route,
        "cond": run.session.cond_source or "-",
        "bank": run.banks,
        "change": float((run.outputs[-1] - run.plain).abs().amax()),
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

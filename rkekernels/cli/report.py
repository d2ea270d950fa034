"""The report of ``rkekernels evaluate --out DIR``: report.md, results.json and the figures.

`write_report` writes them from the result of `rkekernels.evaluation.evaluate` (and what it kept
for the report: the set and the bandwidth sweep) into a temporary folder renamed to DIR at the
end, so a failure leaves nothing half-written. The figures (matplotlib, Pillow) are a grid of the
top modes, the most and least crowded samples, the novel modes and the bandwidth sweep.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["fmt", "write_report"]


def fmt(v: Any) -> str:
    """A value of the result as the report and the summary print it (4 digits, n/a for None)."""
    if v is None:
        return "n/a"
    if isinstance(v, list):
        return ", ".join(fmt(a) for a in v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_report(result: dict[str, Any], out_dir: str | os.PathLike, keep: dict) -> Path:
    """Write report.md, results.json and the figures into ``out_dir``, all or nothing.

    Everything is written to a temporary folder beside ``out_dir``, then renamed to it (an
    existing ``out_dir`` is replaced only once the new report is complete).

    Args:
        result: the dict of `rkekernels.evaluation.evaluate`.
        out_dir: the report folder.
        keep: the dict passed as ``evaluate(..., _keep=keep)`` (the set, sigma, the sweep).

    Returns:
        The path of report.md.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a report is an ordinary folder
    try:
        lines = _summary(result, keep["gen"])
        lines += _figures(result, keep["gen"], tmp)
        ref_sweep = keep.get("ref_sweep")
        _sweep_plot(keep["sweep"], keep["sigma"], tmp / "sweep.png", ref_sweep)
        lines += ["## Bandwidth sweep", "", "![bandwidth sweep](sweep.png)", ""]
        lines += _modes_table(result["modes"])
        sweeps = {"sweep": keep["sweep"]}
        if ref_sweep is not None:
            sweeps["reference_sweep"] = ref_sweep
        body = json.dumps({**result, **sweeps}, indent=2)
        lines += ["", "## Results (JSON)", "", "```json", body, "```", ""]
        (tmp / "results.json").write_text(body + "\n")
        (tmp / "report.md").write_text("\n".join(lines))
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "report.md"


def _replace(tmp: Path, out: Path) -> None:
    """Rename the finished folder ``tmp`` to ``out``, moving an existing ``out`` away first."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "report")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _summary(result: dict[str, Any], g) -> list[str]:
    """The head of report.md: the set, the bandwidth and the scores with their intervals (one
    line per sigma with several, each labelled with its sigma)."""
    ci = result["rke_interval"]
    many = isinstance(result["sigma"], list)
    sigmas = result["sigma"] if many else [result["sigma"]]

    def at(v, i):
        return v[i] if isinstance(v, list) else v

    lines = [
        "# rkekernels evaluate report",
        "",
        f"- set: `{g.path}` (n = {result['n']}, features d = {result['d']}, "
        f"encoder `{result['encoder']}`)",
        f"- bandwidth sigma = {fmt(result['sigma'])} (sigma_from: {result['sigma_from']})",
    ]
    for i, s in enumerate(sigmas):
        lab = f" at sigma {fmt(s)}" if many else ""
        lines += [
            f"- **RKE** (order 2){lab} = {fmt(at(result['rke'], i))}, "
            f"{int(100 * ci['level'])}% interval "
            + (f"of the unbiased estimate {fmt(at(ci['estimate'], i))} " if ci["unbiased"] else "")
            + f"[{fmt(at(ci['low'], i))}; {fmt(at(ci['high'], i))}]",
            f"- **Vendi** (order 1){lab} = {fmt(at(result['vendi'], i))}",
        ]
        if "cond_rke" in result:
            cc = result["cond_rke_interval"]
            lines.append(
                f"- **conditional RKE**{lab} = {fmt(at(result['cond_rke'], i))} "
                f"[{fmt(at(cc['low'], i))}; {fmt(at(cc['high'], i))}], conditional Vendi = "
                f"{fmt(at(result['cond_vendi'], i))} (prompt sigma = {fmt(result['sigma_t'])})"
            )
        if "relative_rke" in result:
            lines.append(f"- relative RKE{lab} = {fmt(at(result['relative_rke'], i))}")
    if "novelty" in result:
        null, p = result.get("novelty_null"), result.get("novelty_p")
        lines.append(
            f"- **novelty** (KEN) at sigma {fmt(sigmas[0])} = {fmt(result['novelty'])} (novel "
            f"mass {fmt(result['novel_mass'])}) against m = {result['m']} reference samples"
            + (
                f"; null {null['mean']:.4g} +- {null['std']:.2g} over {null['draws']} "
                f"reference splits, p = {p:.3g}"
                if null is not None
                else "; no null (it needs --null-draws > 0 and m >= 2 n)"
            )
        )
    lines += [
        "",
        "How to read the interval: it is a jackknife interval on log RKE; two generators "
        "whose intervals do not overlap differ by more than sampling noise at this n.",
        "",
    ]
    return lines


def _figures(result: dict[str, Any], g, tmp: Path) -> list[str]:
    """The image grids (modes, crowded samples, novel modes) into ``tmp``; their sections."""
    images = g.images
    if images is None:
        return ["(embedding input: modes list row indices, see results.json)", ""]
    cols = max(1, min(8, max((len(m["files"]) for m in result["modes"]), default=1)))
    by_name = dict(zip(g.names, images))
    rows = [
        (
            f"mode {i + 1}\nw={m['weight']:.3f}\nsigma {fmt(m['sigma'])}",
            [by_name[f] for f in m["files"]],
        )
        for i, m in enumerate(result["modes"])
        if m["files"]
    ]
    _grid(rows, tmp / "modes.png", cols)
    lines = [
        "## Top modes",
        "",
        "Each row: a mode (eigenvector of K/n) with its weight and the samples assigned to "
        "it, most representative first (modes with no assigned sample are left out).",
        "",
        "![top modes](modes.png)",
        "",
    ]
    crowd = [
        ("most\ncrowded", [by_name[c["file"]] for c in result["most_crowded"]]),
        ("least\ncrowded", [by_name[c["file"]] for c in result["least_crowded"]]),
    ]
    _grid(crowd, tmp / "crowded.png", max(1, len(result["most_crowded"])))
    lines += [
        "## Most and least crowded samples",
        "",
        "s_i = sum_j k(x_i, x_j)^2: large in dense modes, 1 for a sample alone.",
        "",
        "![crowded samples](crowded.png)",
        "",
    ]
    if result.get("novel_modes"):
        rows = [
            (f"novel {i + 1}\nw={m['weight']:.3f}", [by_name[f] for f in m["files"]])
            for i, m in enumerate(result["novel_modes"])
            if m["files"]
        ]
        _grid(rows, tmp / "novel_modes.png", cols)
        lines += ["## Novel modes (KEN)", "", "![novel modes](novel_modes.png)", ""]
    return lines


def _grid(rows: list[tuple[str, list[Path]]], path: Path, cols: int) -> None:
    """A figure of thumbnails: one row per (label, images)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from PIL import Image

    nrows = max(1, len(rows))
    fig, axes = plt.subplots(nrows, cols, figsize=(1.3 * cols + 1.2, 1.3 * nrows), squeeze=False)
    for r, (label, files) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if c < len(files):
                with Image.open(files[c]) as im:
                    ax.imshow(im.convert("RGB"))
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _modes_table(modes: list[dict[str, Any]]) -> list[str]:
    """The modes section: the modes that hold samples (the result lists no others), with sigma."""
    lines = ["## Modes", "", "| mode | sigma | weight | files |", "| --- | --- | --- | --- |"]
    for i, m in enumerate(modes):
        files = ", ".join(f"`{f}`" for f in m["files"])
        lines.append(f"| {i + 1} | {fmt(m['sigma'])} | {m['weight']:.4f} | {files} |")
    return lines


def _sweep_plot(sweep: dict, s0: float, path: Path, ref: dict | None = None) -> None:
    """RKE (with its interval) and Vendi against sigma, log-log; the reference's curves beside
    the generated set's; the chosen sigma marked."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.fill_between(sweep["sigma"], sweep["low"], sweep["high"], alpha=0.25, label="RKE 95% CI")
    ax.plot(sweep["sigma"], sweep["rke"], "o-", color="C0", label="RKE (order 2)")
    ax.plot(sweep["sigma"], sweep["vendi"], "s--", color="C1", label="Vendi (order 1)")
    if ref is not None:
        ax.plot(ref["sigma"], ref["rke"], "o:", color="C2", label="reference RKE")
        ax.plot(ref["sigma"], ref["vendi"], "s:", color="C3", label="reference Vendi")
    ax.axvline(s0, color="grey", lw=0.8, ls=":", label=f"chosen sigma = {s0:.3g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.3g}")
    ax.set_xticks(sweep["sigma"][::2])  # sigma x 2^(-2 .. 2)
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("bandwidth sigma")
    ax.set_ylabel("effective number of modes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""The report of ``rkekernels evaluate --out DIR``: report.md, results.json and the figures.

`check_out_dir` checks DIR before any work: a new folder, an empty one, or one holding an
earlier report (its marker file `MARKER`), writable, and not an input. `write_report` writes
the report's own files (`REPORT_FILES`) from the result of `rkekernels.evaluation.evaluate` (and
what it kept for the report: the set and the bandwidth sweep), each atomically (a temporary
file renamed over its name); nothing else in DIR is ever deleted or overwritten. The figures
(matplotlib, Pillow) are a grid of the top modes, the most and least crowded samples, the novel
modes and the bandwidth sweep.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._errors import CLIError
from ..evaluation.inputs import REPORT_MARKER

__all__ = ["MARKER", "REPORT_FILES", "check_out_dir", "fmt", "write_report"]

#: the marker file of a report folder: JSON {"rkekernels_report": 1, "files": [...]}
MARKER = REPORT_MARKER  # GEN's listing skips folders holding it
#: every file a report may write (and the only ones it ever replaces or removes)
REPORT_FILES = frozenset(
    {"report.md", "results.json", "modes.png", "crowded.png", "novel_modes.png", "sweep.png"}
)


def fmt(v: Any) -> str:
    """A value of the result as the report and the summary print it (4 digits, n/a for None)."""
    if v is None:
        return "n/a"
    if isinstance(v, list):
        return ", ".join(fmt(a) for a in v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def check_out_dir(out_dir: str | os.PathLike, inputs: Sequence[Any] = ()) -> Path:
    """Check, before any work, that a report may be written into ``out_dir``; return its path.

    A report never deletes or overwrites a file it did not write: ``out_dir`` must be a new
    folder, an empty one, or one that holds an earlier report (its marker file `MARKER` lists
    the files that report wrote). It must not be one of the ``inputs`` (GEN, REF, the prompt
    file), and it must be writable: a probe file is created and removed there (or in the
    nearest existing parent folder), so nothing is left behind.

    Raises:
        CLIError: one line saying why (the command exits with code 2).

    Example:
        >>> import tempfile
        >>> from rkekernels.cli.report import check_out_dir
        >>> check_out_dir(tempfile.mkdtemp() + "/report").name
        'report'
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out}: is a file, not a folder; give a new or empty folder")
    for i in inputs:
        if i is not None and Path(i).exists() and Path(i).resolve() == out.resolve():
            raise CLIError(f"--out {out}: is the input {i}; give another folder for the report")
    if out.is_dir():
        if any(True for _ in os.scandir(out)) and not (out / MARKER).is_file():
            raise CLIError(
                f"--out {out}: the folder is not empty and holds no earlier rkekernels report; "
                "give a new or empty folder (a report never overwrites what it did not write)"
            )
        probe = out
    else:
        probe = out.absolute().parent
        while not probe.exists():
            probe = probe.parent
        if not probe.is_dir():
            raise CLIError(f"--out {out}: {probe} is a file, not a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".rkekernels-probe-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise CLIError(f"--out {out}: cannot write into {probe}: {exc.strerror or exc}") from None
    return out


def _earlier_files(out: Path) -> set[str]:
    """The files an earlier report in ``out`` wrote (from its marker; only the report's names)."""
    try:
        listed = json.loads((out / MARKER).read_text(encoding="utf-8"))["files"]
        return {f for f in listed if f in REPORT_FILES}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _write_text(path: Path, text: str) -> None:
    # a file name that is not valid UTF-8 (surrogate escapes from the file system) is written
    # as \udcXX instead of failing
    with open(path, "w", encoding="utf-8", errors="backslashreplace") as f:
        f.write(text)


def _write_marker(out: Path, files: set[str], stage) -> None:
    tmp = stage(MARKER)
    _write_text(tmp, json.dumps({"rkekernels_report": 1, "files": sorted(files)}) + "\n")
    os.replace(tmp, out / MARKER)


def write_report(result: dict[str, Any], out_dir: str | os.PathLike, keep: dict) -> Path:
    """Write report.md, results.json and the figures into ``out_dir``, each file atomically.

    Only the report's own files (`REPORT_FILES`) are written, and listed in the marker file
    `MARKER`; nothing else in ``out_dir`` is touched. Each file is rendered under a temporary
    name in ``out_dir``, then renamed over its final name (``os.replace``); a failure removes
    the temporary files (and ``out_dir`` if this call created it and it is still empty). Files
    of an earlier report that this one does not write (novel_modes.png without a reference)
    are removed. The folder is checked first by `check_out_dir`.

    Args:
        result: the dict of `rkekernels.evaluation.evaluate`.
        out_dir: the report folder (created with its parents when missing).
        keep: the dict passed as ``evaluate(..., _keep=keep)`` (the set, sigma, the sweep).

    Returns:
        The path of report.md.
    """
    out = check_out_dir(out_dir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(4)
    staged: dict[str, Path] = {}

    def stage(name: str) -> Path:
        stem, suffix = os.path.splitext(name)
        staged[name] = out / f".{stem}.tmp-{token}{suffix}"  # the suffix tells matplotlib
        return staged[name]

    try:
        lines = _summary(result, keep["gen"])
        lines += _figures(result, keep["gen"], stage)
        ref_sweep = keep.get("ref_sweep")
        _sweep_plot(keep["sweep"], keep["sigma"], stage("sweep.png"), ref_sweep)
        lines += ["## Bandwidth sweep", "", "![bandwidth sweep](sweep.png)", ""]
        lines += _modes_table(result["modes"])
        sweeps = {"sweep": keep["sweep"]}
        if ref_sweep is not None:
            sweeps["reference_sweep"] = ref_sweep
        body = json.dumps({**result, **sweeps}, indent=2)
        lines += ["", "## Results (JSON)", "", "```json", body, "```", ""]
        _write_text(stage("results.json"), body + "\n")
        _write_text(stage("report.md"), "\n".join(lines))
        earlier, written = _earlier_files(out), set(staged)
        _write_marker(out, earlier | written, stage)  # first: from now on a report's folder
        for name in written:
            os.replace(staged.pop(name), out / name)
        for name in earlier - written:
            (out / name).unlink(missing_ok=True)
        _write_marker(out, written, stage)
    except BaseException:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only when empty
        raise
    return out / "report.md"


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
                + (f"(unbiased {fmt(at(cc['estimate'], i))}) " if cc.get("unbiased") else "")
                + f"[{fmt(at(cc['low'], i))}; {fmt(at(cc['high'], i))}], conditional Vendi = "
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


def _figures(result: dict[str, Any], g, stage) -> list[str]:
    """The image grids (modes, crowded samples, novel modes), at ``stage(name)``; their sections."""
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
    _grid(rows, stage("modes.png"), cols)
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
    _grid(crowd, stage("crowded.png"), max(1, len(result["most_crowded"])))
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
        _grid(rows, stage("novel_modes.png"), cols)
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

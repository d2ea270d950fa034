"""docs/guide_samplers.md runs as written: every python block, in page order, in one namespace.

A ``print(...)  # WANT`` line must print WANT (the comment up to its first colon), and the
hand-written loop is `examples/plain_loop.py`'s and gives the table printed under it.
"""

import contextlib
import importlib.util
import io
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "guide_samplers.md"


def _example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_block_runs_and_prints_what_it_says(one_thread):
    pytest.importorskip("diffusers")
    text = DOC.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 10
    ns: dict = {}
    for i, code in enumerate(blocks):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            exec(compile(code, f"{DOC} (python block {i})", "exec"), ns)
        want = [c.split(":")[0] for c in re.findall(r"^print\(.*\)  # (.*)$", code, re.M)]
        assert buf.getvalue().splitlines() == want, f"block {i}"

    # the hand-written loop is examples/plain_loop.py's sampler, and prints its table
    example = _example("plain_loop")
    gm = example.mixture()
    table = re.search(r"\$ python examples/plain_loop.py --seed 1\n(.*?)```", text, re.S)
    rows = {ln.split()[0]: ln.split()[1:] for ln in table.group(1).splitlines()[2:]}
    for name, scale in (("unguided", 0.0), ("guided", 1.0)):
        got = ns["sample"](gm, scale, seed=1)
        want = example.sample(gm, scale=scale, batches=8, batch_size=4, steps=25, seed=1)
        assert torch.equal(got, want)
        modes, _, of, precision, _ = rows[name]
        assert f"{gm.modes_covered(got)} / {gm.n_components}" == f"{modes} / {of}"
        assert f"{gm.precision(got):.3f}" == precision

"""benchmarks/gpu_check.py, both commands, at --small sizes in the Triton interpreter.

The script is run by hand in the first minutes of a lent GPU; here every section of both
commands runs end to end on CPU tensors (TRITON_INTERPRET=1), so a bug that would cost GPU time
(a crash, a row lost to an exception, a reference on the wrong device) shows here first.
"""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rkekernels._input import triton_available

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.skipif(not triton_available(), reason="Triton is not installed"),
    # on a GPU machine run the real commands (python -m benchmarks.gpu_check) instead
    pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter smoke test (no GPU)"),
    pytest.mark.slow,
]


@pytest.fixture(scope="module")
def first_command(tmp_path_factory):
    """`python -m benchmarks.gpu_check --small` (the first command), started in a child process
    as soon as a test asks for it: the in-process test of the second command runs beside it."""
    out = tmp_path_factory.mktemp("quick")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.gpu_check", "--small", "--out", str(out)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    yield proc, out
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_second_command_runs_the_large_and_optional_sections(tmp_path, capsys, first_command):
    # in this process, while the first command runs in its child (the next test proves
    # `python -m benchmarks.gpu_check` runs from the root); the script sets torch's global
    # matmul flags, so they are put back afterwards
    sys.path.insert(0, str(ROOT))
    from benchmarks import gpu_check

    flags = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32
    try:
        rc = gpu_check.main(["extended", "--small", "--out", str(tmp_path)])
    finally:
        torch.set_float32_matmul_precision(flags[0])
        torch.backends.cuda.matmul.allow_tf32 = flags[1]
    assert rc == 0, capsys.readouterr().out[-3000:]
    rows = _rows(tmp_path / "gpu_check_extended.csv")
    assert {r["section"] for r in rows} == {"stream", "large", "evaluate", "modes", "variants"}
    assert len([r for r in rows if r["section"] == "evaluate" and r["status"] == "ok"]) == 2
    assert not [r for r in rows if r["status"].startswith(("FAIL", "ERROR"))]
    assert {r["precision"] for r in rows if r["section"] == "modes"} == {"tf32", "bf16", "tf32x3"}


def test_first_command_covers_every_kernel_and_counts_variants(first_command):
    proc, out = first_command
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    rows = _rows(out / "gpu_check_quick.csv")
    assert (out / "gpu_check_quick.md").exists()
    assert {r["section"] for r in rows} == {"check", "guidance", "matmul", "backward", "variants"}
    assert not [r for r in rows if r["status"].startswith(("FAIL", "ERROR"))]
    checks = [r for r in rows if r["section"] == "check"]
    # every precision mode and float64, forward and backward, at each size, plus backend="auto"
    assert {r["precision"] for r in checks} == {"ieee", "tf32", "tf32x3", "bf16"}
    assert all(r["status"] == "ok" for r in checks) and len(checks) == 3 * 5 * 2 + 1
    guide = [r for r in rows if r["section"] == "guidance" and "vs reference" in r["case"]]
    assert len(guide) == 2 and all(r["status"] == "ok" for r in guide)
    (variants,) = [r for r in rows if r["section"] == "variants"]
    count = int(variants["n"])
    assert f"compiled variants: {count}" in stdout
    # the launches of the check reuse their compiled variants: far fewer variants than launches
    launches = int(variants["detail"].split(" launches")[0].rsplit(" ", 1)[-1])
    assert 0 < count < launches


def test_variant_counter_keys():
    # integers not in do_not_specialize split on == 1 and multiples of 16; counts do not
    sys.path.insert(0, str(ROOT))
    import rkekernels as rk
    from benchmarks.compile_count import VariantCounter

    with VariantCounter() as vc:
        for n in (20, 21, 33):  # n is not specialised: one variant for all three
            rk.rke_score(torch.randn(n, 5), 1.0, backend="triton")
    assert vc.by_kernel() == {"_fwd_kernel": 1} and vc.launches == 3
    with VariantCounter() as vc:
        for d in (5, 16):  # the width is: a multiple of 16 is another variant
            rk.rke_score(torch.randn(20, d), 1.0, backend="triton")
    assert vc.by_kernel() == {"_fwd_kernel": 2}

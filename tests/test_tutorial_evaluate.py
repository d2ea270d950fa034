"""docs/tutorials/evaluate.md runs: its set-up block, and the commands print what it shows."""

import json
import re
from pathlib import Path

import pytest

from rkekernels import evaluation
from rkekernels.cli import main

pytest.importorskip("transformers")
DOC = Path(__file__).resolve().parent.parent / "docs" / "tutorials" / "evaluate.md"


def _console(text, command):
    """The output lines shown under ``$ command`` in the tutorial."""
    block = re.search(r"```console\n\$ " + re.escape(command) + r"\n(.*?)```", text, re.S)
    return [ln.rstrip() for ln in block.group(1).strip().splitlines()]


@pytest.mark.slow
def test_tutorial_setup_and_first_commands(tmp_path, monkeypatch, capsys):
    text = DOC.read_text()
    setup = re.search(r"## Set up.*?```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(setup, str(DOC), "exec"), {})
    assert len(list(Path("gen").glob("*.png"))) == 24 and Path("tiny-dinov2").is_dir()

    cmd = "rkekernels evaluate gen --encoder pixels --sigma 5"
    assert main([*cmd.split()[1:], "--no-progress", "--no-cache"]) == 0
    got = [ln.rstrip() for ln in capsys.readouterr().out.strip().splitlines()]
    assert got == _console(text, cmd)

    args = "evaluate gen --encoder pixels --sigma 5 --reference ref --prompts prompts.npy"
    assert main([*args.split(), "--sigma-t", "0.5", "--no-progress", "--no-cache"]) == 0
    out = capsys.readouterr().out
    for line in (
        "cond RKE = 3.488  cond Vendi = 4.228",
        "relative RKE = 5.471",
        "novelty (KEN) = 0.7731",
        "novelty p: n/a (the null needs a reference of at least 2 n = 48 samples; it has 24)",
    ):
        assert line in out and line in text
    # against a reference without --sigma: GEN at REF's default bandwidth
    cmd = "rkekernels evaluate gen --encoder pixels --reference ref"
    assert main([*cmd.split()[1:], "--no-progress", "--no-cache"]) == 0
    got = [ln.rstrip() for ln in capsys.readouterr().out.strip().splitlines()]
    assert got == _console(text, cmd)
    assert (
        main(
            [
                "evaluate",
                "gen",
                "--encoder",
                "dinov2",
                "--encoder-model",
                "tiny-dinov2",
                "--no-progress",
                "--no-cache",
            ]
        )
        == 0
    )
    # the Python form of the command (the tutorial's evaluation.evaluate block) gives its JSON
    capsys.readouterr()
    monkeypatch.setenv("RKEKERNELS_CACHE", str(tmp_path / "cache"))
    snippet = re.search(r"```python\n(res = evaluation\.evaluate.*?)```", text, re.S).group(1)
    scope = {"evaluation": evaluation, "print": lambda *a: None}
    exec(compile(snippet, str(DOC), "exec"), scope)
    args = "evaluate gen --reference ref --prompts prompts.npy --encoder pixels --sigma 5 --json"
    assert main([*args.split(), "--no-progress", "--no-cache"]) == 0
    want = json.loads(capsys.readouterr().out)
    got = scope["res"]
    assert got["cache"]["encoded"] + got["cache"]["cached"] == 24 + 24  # gen, then ref
    assert {**got, "cache": None} == {**want, "cache": None}

"""Folders of images at scale: the chunked embedding cache (resume, concurrent writers, damage),
streamed decoding (worker processes) and the progress bar's rate. Small: 8 x 8 PNGs, the pixels
encoder (or a counting wrapper around it)."""

from __future__ import annotations

import multiprocessing
import os
import re

import pytest
import torch

from rkekernels.adapters.encoders import load_encoder
from rkekernels.evaluation import cache as cache_mod
from rkekernels.evaluation.embeddings import _embed_sets, _encoder_key, _file_digest
from rkekernels.evaluation.inputs import _Set
from tests.conftest import write_images

KEY = _encoder_key("pixels", None, 4)
FORK = "fork" in multiprocessing.get_all_start_methods()


class _Counting:
    """`_Encoders` stand-in: the pixels encoder (batch 2), counting ``encode`` calls; at call
    ``stop`` it raises (``how="raise"``) or ends the process at once (``how="exit"``: no
    ``finally`` runs, as under SIGKILL)."""

    def __init__(self, stop: int | None = None, how: str = "raise"):
        self.enc = load_encoder("pixels", size=4, batch_size=2)
        self.calls, self.stop, self.how = 0, stop, how
        real = self.enc.encode

        def encode(items, **kw):
            self.calls += 1
            if self.calls == self.stop:
                if self.how == "exit":
                    os._exit(3)
                raise KeyboardInterrupt  # as Ctrl-C would
            return real(items, **kw)

        self.enc.encode = encode

    def image(self):
        return self.enc


def _embed(folder, cache, enc=None, **kw):
    stats = {"cached": 0, "encoded": 0}
    s = folder if isinstance(folder, _Set) else _Set(str(folder))
    (x,) = _embed_sets([s], enc or _Counting(), cache, KEY, False, stats, **kw)
    return x, stats


def _chunks(cache):
    return sorted(cache.rglob("*.pt"))


@pytest.fixture
def folder(tmp_path):
    write_images(tmp_path / "imgs", 12, size=8, clusters=3, seed=0)
    return tmp_path / "imgs"


def test_interrupted_run_resumes_from_the_chunks_written_as_it_went(folder, tmp_path):
    """A process killed while encoding (no `finally`, as SIGKILL) keeps the chunks written so
    far; the next run encodes only the rest and gives the features of an uncached run."""
    if not FORK:
        pytest.skip("needs fork")
    cache = tmp_path / "cache"
    want, _ = _embed(folder, None)
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(
        target=_embed, args=(folder, cache, _Counting(4, "exit")), kwargs={"flush_s": 0}
    )
    p.start()
    p.join(60)
    assert p.exitcode == 3
    assert len(_chunks(cache)) == 3  # one chunk per batch of 2 before the 4th batch
    enc = _Counting()
    x, stats = _embed(folder, cache, enc)
    assert stats == {"cached": 6, "encoded": 6} and enc.calls == 3
    assert torch.equal(x, want)
    assert len(_chunks(cache)) == 1  # compacted
    again, stats = _embed(folder, cache, _Counting(1))  # would raise if it encoded anything
    assert stats == {"cached": 12, "encoded": 0} and torch.equal(again, want)


def test_an_error_or_ctrl_c_keeps_what_was_encoded(folder, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        _embed(folder, cache, _Counting(5), flush_s=3600)  # no timed chunk: only the last one
    enc = _Counting()
    _, stats = _embed(folder, cache, enc)
    assert stats == {"cached": 8, "encoded": 4} and enc.calls == 2


def _rank(folder, cache, rank, rounds, barrier):
    """Round k embeds the images i with i % (2 rounds) == 2 k + rank: many small runs, each
    appending chunks and merging all of them, interleaved with the other process."""
    cache_mod.COMPACT_AT = 0  # merge at the end of every run ...
    cache_mod._Cache._lock = lambda self: True  # ... with no lock: the worst case
    barrier.wait()
    s = _Set(str(folder))
    for k in range(rounds):
        idx = [i for i in range(len(s)) if i % (2 * rounds) == 2 * k + rank]
        _embed(s.subset(idx), cache, flush_s=0)


def test_two_processes_writing_one_cache_lose_and_corrupt_nothing(tmp_path):
    if not FORK:
        pytest.skip("needs fork")
    folder = tmp_path / "imgs"
    write_images(folder, 48, size=4, clusters=4, seed=1)
    cache = tmp_path / "cache"
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_rank, args=(folder, cache, r, 6, barrier)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    stats = {}
    c = cache_mod._Cache(cache, KEY, folder, stats)
    assert c.damaged == 0 and not list(cache.rglob("*.tmp"))
    s = _Set(str(folder))
    digests = [_file_digest(p.read_bytes()) for p in s.images]
    assert set(digests) <= set(c.index)  # no entry lost
    want, _ = _embed(folder, None)
    got = torch.stack([c.get(d) for d in digests])
    assert torch.equal(got, want)
    _, stats = _embed(folder, cache, _Counting(1))  # the whole folder: all cached, compacted
    assert stats == {"cached": 48, "encoded": 0} and len(_chunks(cache)) == 1


@pytest.mark.parametrize("damage", ["garbage bytes", "wrong checksum"])
def test_a_damaged_chunk_is_ignored_and_rebuilt(folder, tmp_path, damage):
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        _embed(folder, cache, _Counting(4), flush_s=0)  # three chunks of 2
    bad = _chunks(cache)[1]
    if damage == "garbage bytes":
        bad.write_bytes(b"not a chunk")
    else:
        obj = torch.load(bad, weights_only=True)
        obj["vectors"][0, 0] += 1.0  # a wrong vector, its checksum unchanged
        torch.save(obj, bad)
    enc = _Counting()
    x, stats = _embed(folder, cache, enc)
    assert stats == {"cached": 4, "encoded": 8} and enc.calls == 4
    assert torch.equal(x, _embed(folder, None)[0])
    assert not bad.exists() and len(_chunks(cache)) == 1  # removed by the compaction
    _, stats = _embed(folder, cache, _Counting(1))
    assert stats == {"cached": 12, "encoded": 0}


def test_the_single_file_of_earlier_releases_is_read_then_folded_in(folder, tmp_path):
    cache = tmp_path / "cache"
    want, _ = _embed(folder, cache)
    (chunk,) = _chunks(cache)
    legacy = chunk.parent.with_suffix(".pt")  # <h(folder)>.pt beside the chunk folder
    os.replace(chunk, legacy)
    chunk.parent.rmdir()
    x, stats = _embed(folder, cache, _Counting(1))
    assert stats == {"cached": 12, "encoded": 0} and torch.equal(x, want)
    assert not legacy.exists() and len(_chunks(cache)) == 1


@pytest.mark.skipif(not FORK, reason="the worker pool is cheap to start with fork only")
def test_decoding_workers_give_the_same_features(folder, tmp_path):
    want, _ = _embed(folder, None)
    x, stats = _embed(folder, tmp_path / "cache", workers=2)
    assert torch.equal(x, want) and stats["encoded"] == 12
    paths = sorted(folder.glob("*.png"))
    enc = load_encoder("pixels", size=4, batch_size=5)
    assert torch.equal(enc.encode(paths, workers=2), enc.encode(paths))


def test_progress_bar_shows_images_per_second(folder, capsys, monkeypatch):
    """Even below one image per second (tqdm's default turns to s/img there)."""
    import tqdm.std

    clock = iter(range(0, 10**6, 3))  # 3 s per reading: about 1/3 image per second
    monkeypatch.setattr(tqdm.std, "time", lambda: float(next(clock)))
    stats = {"cached": 0, "encoded": 0}
    _embed_sets([_Set(str(folder))], _Counting(), None, KEY, True, stats)
    err = capsys.readouterr().err
    assert re.search(r"encode imgs \(pixels\).*\d+\.\d\d img/s", err), err
    assert "s/img" not in err


def test_warm_runs_and_slices_write_nothing(folder, tmp_path):
    """A compacted cache read again (a folder with two identical images, or a slice of it, as a
    torchrun rank has) is neither rewritten nor pruned."""
    (folder / "zz_copy.png").write_bytes((folder / "img_000.png").read_bytes())
    cache = tmp_path / "cache"
    want, stats = _embed(folder, cache)
    assert stats == {"cached": 0, "encoded": 13} and torch.equal(want[12], want[0])
    (chunk,) = _chunks(cache)
    x, stats = _embed(folder, cache, _Counting(1))
    assert stats == {"cached": 13, "encoded": 0} and torch.equal(x, want)
    part, stats = _embed(_Set(str(folder)).subset([3, 12]), cache, _Counting(1))
    assert stats == {"cached": 2, "encoded": 0} and torch.equal(part, want[[3, 12]])
    assert _chunks(cache) == [chunk]

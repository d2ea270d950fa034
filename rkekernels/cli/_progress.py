"""Progress of a streamed pass over the pairs, on stderr: pairs done, pairs/s and the time left.

`PairProgress` is the ``progress(pairs_done, pairs_total)`` callback that
`rkekernels.ops.pair_sums.reporting` hands to the torch tile loop (``ops.scores_torch``). The
work is counted in kernel entries (the tiles' areas, about n^2 / 2 of them), so the rate and
the estimate are real ones::

    rate = pairs_done / elapsed            (the mean since the first tile)
    left = (pairs_total - pairs_done) / rate

On a terminal with tqdm installed this is a tqdm bar (unit "pair", its own average rate, the
same estimate); otherwise (a log file, a pipe, no tqdm) one plain line every `LINE_EVERY_S`
seconds and one at the end, e.g.::

    scoring n=2,000,000: 12.5% of 2.00T pairs, 610M pairs/s, 0:06:50 so far, about 0:47:48 left
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO

__all__ = ["LINE_EVERY_S", "PairProgress", "duration", "si"]

#: seconds between two plain progress lines (not on a terminal, or without tqdm)
LINE_EVERY_S = 10.0


def si(v: float) -> str:
    """A count with an SI prefix, 3 digits: ``si(1830) == '1.83k'``, ``si(2e12) == '2.00T'``."""
    prefixes = ("", "k", "M", "G", "T", "P", "E")
    i = 0
    while abs(v) >= 999.5 and i < len(prefixes) - 1:
        v, i = v / 1000.0, i + 1
    prefix = prefixes[i]
    if prefix == "":
        return f"{v:.0f}"
    digits = 2 if abs(v) < 9.995 else 1 if abs(v) < 99.95 else 0
    return f"{v:.{digits}f}{prefix}"


def duration(seconds: float) -> str:
    """h:mm:ss, e.g. ``duration(2868.4) == '0:47:48'``."""
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or file-like stream without isatty
        return False


class PairProgress:
    """A ``progress(pairs_done, pairs_total)`` callback that reports on ``stream`` (stderr).

    A call with ``pairs_done == 0`` starts a pass (its clock); calls must then come with
    non-decreasing ``pairs_done``, the last one equal to ``pairs_total`` (as the tile loop
    makes them). Use as a context manager (or call `close`) to remove a terminal bar.

    Args:
        desc: the text before the numbers (e.g. ``"scoring n=60"``).
        stream: where to write (default: ``sys.stderr`` at construction).
        bar: True: a tqdm bar (needs tqdm), False: plain lines, None: a bar on a terminal
            when tqdm imports, else plain lines.
        every: seconds between plain lines (None: `LINE_EVERY_S`); the last tile always
            prints one.
        clock: the time source (seconds; ``time.monotonic``).

    Example:
        >>> import io
        >>> ticks = iter([0.0, 4.0, 8.0])
        >>> out = io.StringIO()
        >>> p = PairProgress("scoring", stream=out, bar=False, every=3.0, clock=lambda: next(ticks))
        >>> p(0, 1000); p(250, 1000); p(1000, 1000)
        >>> print(out.getvalue(), end="")
        scoring: 25.0% of 1.00k pairs, 62 pairs/s, 0:00:04 so far, about 0:00:12 left
        scoring: 100% of 1.00k pairs in 0:00:08 (125 pairs/s)
    """

    def __init__(
        self,
        desc: str,
        *,
        stream: IO[str] | None = None,
        bar: bool | None = None,
        every: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.desc, self.clock = desc, clock
        self.every = LINE_EVERY_S if every is None else every
        self.stream = sys.stderr if stream is None else stream
        self._tqdm = None
        if bar is None:
            bar = _is_terminal(self.stream)
        if bar:
            try:
                from tqdm.auto import tqdm  # optional (rkekernels[demo])

                self._tqdm = tqdm
            except ImportError:
                self._tqdm = None
        self._bar = None
        self._t0 = self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        if self._tqdm is not None:
            self._bar_update(done, total)
            return
        now = self.clock()
        if done == 0:
            self._t0 = self._last = now
            return
        if done < total and now - self._last < self.every:
            return
        self._last = now
        elapsed = max(now - self._t0, 1e-9)
        rate = done / elapsed
        if done >= total:
            line = f"{self.desc}: 100% of {si(total)} pairs in {duration(elapsed)}"
            line += f" ({si(rate)} pairs/s)"
        else:
            left = (total - done) / rate
            line = f"{self.desc}: {100.0 * done / total:.1f}% of {si(total)} pairs, "
            line += f"{si(rate)} pairs/s, {duration(elapsed)} so far, about {duration(left)} left"
        print(line, file=self.stream, flush=True)

    def _bar_update(self, done: int, total: int) -> None:
        if done == 0 or self._bar is None:
            self.close()
            # smoothing=0: the rate (and so the estimate) is the mean since the pass began
            self._bar = self._tqdm(
                total=total, desc=self.desc, unit="pair", unit_scale=True, smoothing=0.0,
                file=self.stream, leave=False, dynamic_ncols=True,
            )  # fmt: skip
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        """Remove the terminal bar, if any (plain lines need nothing)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> PairProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

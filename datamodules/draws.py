"""Which source each draw of a scheduled mixture came from, in a bounded resume position.

Under a mixture schedule the weights of a draw depend on the batch being filled, which a
batcher that holds items back (packing) makes a function of the whole epoch so far. A
fast-forward therefore does not redraw the old samples by their weights: it forces each old
draw's source (:class:`ForcedWeights`; the random number is still drawn, so the stream goes on
exactly as before). The sources of the skipped draws only need the right total per source
(each source is its own stream), and each draw still held (read again on resume) needs its
source and the per-source totals before it. So a position stores one total per source and
``1 + sources`` numbers per held draw: bounded by the batcher's buffer however long the epoch,
and made in O(held) per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any


class Draws:
    """Counts one worker's main-stream draws per source and keeps those it may read again.

    Args:
        sources: Main sources of the mixture.
        drawn: Draws per source before the resumed position (None: a fresh epoch).
        held: ``position -> [source, totals per source before it]`` of the draws the resumed
            position reads again (its ``main_redo``).
    """

    def __init__(
        self, sources: int, drawn: Sequence[int] | None = None,
        held: dict[int, list[int]] | None = None,
    ) -> None:  # fmt: skip
        self.resumed = list(drawn) if drawn is not None else [0] * sources
        self.drawn = [0] * sources  # draws per source so far (forwarded ones included)
        self.before = dict(held or {})  # position -> [source, *totals before it]
        self.plan = self._plan()
        self.last = 0  # the source of the latest draw

    def counted(self, source: int, samples: Iterable[Any]) -> Iterator[Any]:
        """Source ``source``'s samples, counted as the mixture draws them."""
        for sample in samples:
            self.drawn[source] += 1
            self.last = source
            yield sample

    def note(self, pos: int) -> None:
        """The latest draw got main-stream position ``pos`` (it may be held at a save)."""
        totals = list(self.drawn)
        totals[self.last] -= 1
        self.before[pos] = [self.last, *totals]

    def state(self, forwarding: bool, keep: Sequence[int]) -> tuple[list[int], list[list[int]]]:
        """(draws per source at the position, ``[source, *totals]`` of each of ``keep``).

        Args:
            forwarding: The stream is still before its resumed position (which stays the
                position until it is passed).
            keep: The positions a resume would read again (sorted); the others are forgotten.
        """
        self.before = {p: self.before[p] for p in keep}
        return list(self.resumed if forwarding else self.drawn), [self.before[p] for p in keep]

    def _plan(self) -> Iterator[int]:
        """The source of each draw before the resumed position, in order.

        Held draws come at their positions from their sources (after the totals they had
        before them); the draws in between, which are skipped, take any order that keeps the
        totals.
        """
        have = [0] * len(self.resumed)
        entries = sorted(self.before.items())
        for _, (source, *before) in entries:
            for s, n in enumerate(before):
                yield from [s] * (n - have[s])
                have[s] = n
            yield source
            have[source] += 1
        for s, n in enumerate(self.resumed):
            yield from [s] * (n - have[s])


class ForcedWeights:
    """Mixture weights that force the planned source while the stream fast-forwards.

    Args:
        weights: The schedule's weights (a zero-argument callable).
        draws: The worker's draws (their plan).
        forwarding: Whether the main stream is still before its resumed position.
    """

    def __init__(
        self, weights: Callable[[], list[float]], draws: Draws, forwarding: Callable[[], bool]
    ) -> None:
        self.weights, self.draws, self.forwarding = weights, draws, forwarding

    def __call__(self) -> list[float]:
        """One-hot on the old draw's source while forwarding, else the schedule's weights."""
        if not self.forwarding():
            return self.weights()
        hot = [0.0] * len(self.draws.resumed)
        hot[next(self.draws.plan)] = 1.0
        return hot

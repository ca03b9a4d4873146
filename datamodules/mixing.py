"""Source mixtures that change over a run, replay of old data, and per-batch source counts."""

from __future__ import annotations

import itertools
import math
import random
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mmpt.datamodules.stages import (
    SkipCounter,
    mix,
    read_shards,
    resampled_urls,
    shuffle,
)
from mmpt.datamodules.urls import ResolvedSource

#: Ramps a :class:`MixPoint` may take.
RAMPS = ("step", "linear")


@dataclass
class MixPoint:
    """A point of a weight schedule (``StreamConfig.weight_schedule``).

    Attributes:
        at: Where in the run: a fraction of the run's training batches when <= 1.0, else a
            global training batch index (per rank, counting gradient-accumulation batches).
        weights: One weight per source.
        ramp: ``step``: the weights jump to these at ``at``; ``linear``: they move linearly
            from the previous point's weights (the stream's ``weights`` for the first point),
            starting at the previous point's ``at`` (0 for the first), to arrive here at ``at``.
    """

    at: float
    weights: list[float]
    ramp: str = "step"


@dataclass
class ReplayConfig:
    """Old data mixed into every batch at a fixed fraction (``StreamConfig.replay``).

    Replay sources are always drawn resampled (shards with replacement, endless, a seed per
    rank, worker and epoch), so they never run out, whatever the main stream does.

    Attributes:
        urls: One replay source or a list of them (any form ``StreamConfig.urls`` takes).
        fraction: Share of every batch taken from replay, 0 < fraction < 1. Item ``i`` of a
            worker's stream is replay iff ``floor((i + 1) * f) > floor(i * f)``, so a batch of
            ``B`` holds ``floor(f * B)`` or ``ceil(f * B)`` replay items and the long-run share
            is exact.
        name: The name replay items are counted and logged under (``data/mix/<name>``).
        weights: One weight per replay source (default: equal).
    """

    urls: str | list[str]
    fraction: float
    name: str = "replay"
    weights: list[float] | None = None

    def specs(self) -> list[str]:
        """The replay source specs as a list."""
        return [self.urls] if isinstance(self.urls, str) else list(self.urls)


def as_dataclass(value: Any, cls: type) -> Any:
    """``value`` as ``cls``: parsed dicts (or jsonargparse Namespaces) become instances."""
    if value is None or isinstance(value, cls):
        return value
    return cls(**(value.as_dict() if hasattr(value, "as_dict") else dict(value)))


def default_names(specs: Sequence[str]) -> list[str]:
    """One unique log name per source spec: its folder's (or file's) last path component.

    A shard pattern (``.../laion/shard-{0000..0099}.tar``, a glob) is named by its folder; a
    name already taken gets ``_2``, ``_3`` ...; a spec with no usable component is ``source<i>``.
    """
    out: list[str] = []
    for i, spec in enumerate(specs):
        parts = [p for p in re.split(r"[/\\]", spec.split("::")[0].strip()) if p]
        while parts and re.search(r"[{*?\[]|\.tar$|:$", parts[-1]):
            parts.pop()
        base = parts[-1] if parts and not spec.startswith("pipe:") else f"source{i}"
        name, n = base, 2
        while name in out:
            name, n = f"{base}_{n}", n + 1
        out.append(name)
    return out


def check_weights(weights: Sequence[float], n: int, where: str) -> None:
    """Raise a ValueError naming ``where`` unless ``weights`` are ``n`` values >= 0, sum > 0."""
    if len(weights) != n:
        raise ValueError(f"{where} has {len(weights)} entries for {n} sources")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"{where} must be >= 0 with a positive sum")


def check_schedule(points: Sequence[MixPoint], n: int, field: str) -> None:
    """Check a weight schedule over ``n`` sources; errors name ``<field>.weight_schedule``."""
    where = f"{field}.weight_schedule"
    for i, p in enumerate(points):
        check_weights(p.weights, n, f"{where}[{i}].weights")
        if p.ramp not in RAMPS:
            raise ValueError(f"{where}[{i}].ramp is {p.ramp!r}; use one of {RAMPS}")
        if p.at < 0:
            raise ValueError(f"{where}[{i}].at is {p.at}; use a fraction or batch index >= 0")
        if i and p.at <= points[i - 1].at:
            raise ValueError(f"{where}[{i}].at ({p.at}) must be after the previous point's at")
    if len({p.at <= 1 for p in points}) > 1:
        raise ValueError(
            f"{where} mixes fractions of the run (at <= 1) and batch indices (at > 1): use one"
        )


def check_replay(replay: ReplayConfig, field: str, names: Sequence[str]) -> list[str]:
    """Check a replay config next to the main ``names``; returns its source specs.

    Errors name ``field`` (e.g. ``data.train.replay``).
    """
    if not 0 < replay.fraction < 1:
        raise ValueError(f"{field}.fraction is {replay.fraction}; it must be in (0, 1)")
    specs = replay.specs()
    if not specs:
        raise ValueError(f"{field}.urls is empty: give at least one shard source")
    if replay.weights is not None:
        check_weights(replay.weights, len(specs), f"{field}.weights")
    if not replay.name or replay.name in names:
        raise ValueError(f"{field}.name {replay.name!r} must differ from the source names")
    return specs


class WeightSchedule:
    """Source weights as a function of the global training batch index.

    Args:
        base: Weights before the first point.
        points: The schedule (checked by :func:`check_schedule`).
        total_batches: Training batches of the run per rank (needed by fractions), or None.

    Raises:
        ValueError: The points are fractions and ``total_batches`` is unknown.
    """

    def __init__(
        self, base: Sequence[float], points: Sequence[MixPoint], total_batches: int | None
    ) -> None:
        if any(p.at <= 1 for p in points) and not total_batches:
            raise ValueError(
                "the weight_schedule gives fractions of the run (at <= 1), but the stream does "
                "not know the run's length: the datamodule must call "
                "ShardStream.set_total_batches() before building the loader (or give `at` as "
                "batch indices > 1)"
            )
        self.base = [float(w) for w in base]
        scale = total_batches if any(p.at <= 1 for p in points) else 1
        self.points = [(p.at * scale, [float(w) for w in p.weights], p.ramp) for p in points]
        self._cached: tuple[int, list[float]] | None = None

    def weights_at(self, batch: int) -> list[float]:
        """The weights in force while global batch ``batch`` is being filled."""
        if self._cached is not None and self._cached[0] == batch:
            return self._cached[1]
        start, weights = 0.0, self.base
        for at, target, ramp in self.points:
            if batch >= at:
                start, weights = at, target
                continue
            if ramp == "linear":
                t = (batch - start) / (at - start)
                weights = [a + t * (b - a) for a, b in zip(weights, target, strict=True)]
            break
        self._cached = (batch, weights)
        return weights


class BatchClock:
    """The global training batch index of the batch a worker is filling.

    The DataLoader takes batches from its workers in turn, so worker ``w`` of ``W``, making its
    ``k``-th batch of epoch ``e``, makes global batch ``e * per_epoch + offset + k * W + w``: a
    pure function of the position in the stream. ``offset`` is the number of batches of the
    epoch a resumed run had already done (set by the model at train start).

    Args:
        epoch: Current epoch.
        per_epoch: Batches per epoch per rank.
        worker: This worker's index.
        num_workers: Workers of the DataLoader.
        offset: Batches of the epoch done before this pass started (a mid-epoch resume).
    """

    def __init__(
        self, epoch: int, per_epoch: int, worker: int, num_workers: int, offset: int = 0
    ) -> None:
        self.first = epoch * per_epoch + offset + worker
        self.stride, self.made = num_workers, 0

    def tick(self) -> None:
        """One batch was made."""
        self.made += 1

    @property
    def batch(self) -> int:
        """Global index of the batch being filled."""
        return self.first + self.made * self.stride


class ScheduledWeights:
    """Zero-argument callable: the schedule's weights at the clock's batch (for ``mix``)."""

    def __init__(self, schedule: WeightSchedule, clock: BatchClock) -> None:
        self.schedule, self.clock = schedule, clock

    def __call__(self) -> list[float]:
        """Current weights."""
        return self.schedule.weights_at(self.clock.batch)


def resampled_mix(
    sources: Sequence[ResolvedSource],
    names: Sequence[str],
    weights: Sequence[float] | Callable[[], Sequence[float]],
    shuffle_buffer: int,
    rng: random.Random,
    counter: SkipCounter,
    count: Callable[[int, Iterator[dict[str, Any]]], Iterator[dict[str, Any]]] | None = None,
) -> Iterator[dict[str, Any]]:
    """Samples of shards drawn with replacement, tagged with their source and mixed.

    Each source is shuffled on its own before the mix, so the mix (and a schedule) acts on
    the stream as batched, with no shuffle-buffer delay.

    Args:
        sources: The sources.
        names: Tag of each source (:data:`SOURCE_KEY`).
        weights: Weights or a weights callable, see :func:`~mmpt.datamodules.stages.mix`.
        shuffle_buffer: Shuffle buffer per source.
        rng: Seeds every draw.
        counter: Counts unreadable shards and samples.
        count: ``(source index, its samples) -> samples``, wrapped around each source as the
            mixture draws from it (e.g. :meth:`~mmpt.datamodules.draws.Draws.counted`).
    """
    streams = [
        tag(
            shuffle(
                read_shards(resampled_urls(s.urls, random.Random(rng.random())), counter),
                shuffle_buffer,
                random.Random(rng.random()),
            ),
            name,
        )
        for s, name in zip(sources, names, strict=True)
    ]
    if count is not None:
        streams = [count(i, stream) for i, stream in enumerate(streams)]
    return mix(streams, weights, rng)


def is_replay(i: int, fraction: float) -> bool:
    """Whether item ``i`` of a worker's stream is a replay item (Bresenham credit)."""
    return math.floor((i + 1) * fraction) > math.floor(i * fraction)


def interleave(
    main: Iterator[Any], replay: Iterator[Any], fraction: float, start: int = 0
) -> Iterator[Any]:
    """Items of ``main`` with ``fraction`` of all items from ``replay`` credited in between.

    Ends when ``main`` does (replay is endless), after the replay items credited before the
    next main item. ``start`` is the item index to begin at (a resumed worker's).
    """
    for i in itertools.count(start):
        if is_replay(i, fraction):
            yield next(replay)
            continue
        item = next(main, _END)
        if item is _END:
            return
        yield item


_END = object()


def combined_items(main_items: int, fraction: float) -> int:
    """Items :func:`interleave` yields from ``main_items`` main items (with the replay items).

    The largest ``T`` with ``T - floor(T * fraction) <= main_items``.
    """
    t = int(main_items / (1 - fraction))
    while t - math.floor(t * fraction) > main_items:
        t -= 1
    while (t + 1) - math.floor((t + 1) * fraction) <= main_items:
        t += 1
    return t


class SourceTally:
    """Counts, per batch, the sources of the items a batcher draws.

    Wraps a stream of ``(source name, item)`` pairs and yields the items; :meth:`take` returns
    the counts since its previous call. Taken as each batch comes out of the batcher, these are
    exactly the batch's items for plain batching (it yields a batch as soon as it has drawn
    its last item). A batcher that buffers (packing, length buckets, scene lookahead) gets the
    items it drew while making the batch: every item is counted once, in the batch whose making
    drew it, so sums over batches are exact and per-batch shares are close, not exact.

    Args:
        pairs: ``(name, item)`` pairs.
        names: Every source name (counted 0 when absent, so logs are continuous).
    """

    def __init__(self, pairs: Iterator[tuple[str, Any]], names: Sequence[str]) -> None:
        self.pairs, self.names = pairs, list(dict.fromkeys(names))
        self.counts = dict.fromkeys(self.names, 0)

    def __iter__(self) -> Iterator[Any]:
        for name, item in self.pairs:
            if name in self.counts:
                self.counts[name] += 1
            yield item

    def take(self) -> dict[str, int]:
        """Items per source since the previous call."""
        out, self.counts = self.counts, dict.fromkeys(self.names, 0)
        return out


#: Sample key holding the name of the source a raw sample came from.
SOURCE_KEY = "__source__"


def tag(samples: Iterable[dict[str, Any]], name: str | Mapping[str, str]) -> Iterator[dict]:
    """Raw samples with :data:`SOURCE_KEY` set: ``name``, or ``name[sample["__url__"]]``."""
    for sample in samples:
        sample[SOURCE_KEY] = name if isinstance(name, str) else name.get(sample.get("__url__"))
        yield sample


class Tagged:
    """``sample -> (source name, fn(sample))``; ``fn`` never sees :data:`SOURCE_KEY`.

    Args:
        fn: The stream's sample function (raw sample -> decoded item).
    """

    def __init__(self, fn: Callable[[dict[str, Any]], Any]) -> None:
        self.fn = fn

    def __call__(self, sample: dict[str, Any]) -> tuple[str, Any]:
        """Decode; raises what ``fn`` raises (the sample is then skipped and counted)."""
        name = sample.pop(SOURCE_KEY, None)
        return name, self.fn(sample)

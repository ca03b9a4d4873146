"""A WebDataset stream over one or more shard sources, for any modality.

Plain mode reads every shard once an epoch: shard ``i`` always belongs to rank ``i % W`` and,
within the rank, to worker ``j % N`` (its position in the rank's list), so each epoch is an
exact partition with known batch counts; only the order of a worker's shards and the sample
shuffle buffer change with the epoch. Resampled mode draws shards with replacement from
several weighted sources and mixes them per sample, for a fixed number of samples an epoch.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch.utils.data

from mmpt.datamodules.mixing import (
    BatchClock,
    MixPoint,
    ReplayConfig,
    ScheduledWeights,
    SourceTally,
    Tagged,
    WeightSchedule,
    as_dataclass,
    check_replay,
    check_schedule,
    check_weights,
    combined_items,
    default_names,
    interleave,
    resampled_mix,
    tag,
)
from mmpt.datamodules.stages import (
    SharedEpoch,
    SkipCounter,
    Slot,
    batched,
    map_skipping,
    read_shards,
    repeat_passes,
    shuffle,
    split_shards,
)
from mmpt.datamodules.urls import ResolvedSource, resolve_source

log = logging.getLogger("mmpt.data")

#: Offset of the replay streams' seed from the stream's seed (independent of the main draws).
REPLAY_SEED = 0x5EED


@dataclass
class StreamConfig:
    """Where a split's samples come from and how they are drawn.

    Attributes:
        urls: One source (folder, file, glob, brace pattern, ``pipe:`` or fsspec URL), or a list
            of sources (mixed by ``weights`` when resampled, concatenated otherwise).
        weights: One weight per source; needs ``resampled: true``.
        resampled: Draw shards with replacement (endless; needs ``epoch_samples``).
        epoch_samples: Samples per epoch over all ranks (resampled mode), replay included.
        shuffle_buffer: Sample shuffle buffer per worker (0: keep order); in resampled mode
            one per source (and one per replay source), so a schedule acts without delay.
        shuffle_shards: Shuffle each worker's shard order every epoch.
        names: One name per source for logs (``data/mix/<name>``); default: each source's
            folder name, made unique.
        weight_schedule: Weights that change over the run (:class:`MixPoint` list, increasing
            ``at``); ``weights`` (default: equal) hold before the first point. Needs
            ``resampled: true``.
        replay: A fixed fraction of every batch drawn from old data (:class:`ReplayConfig`).
    """

    urls: str | list[str]
    weights: list[float] | None = None
    resampled: bool = False
    epoch_samples: int | None = None
    shuffle_buffer: int = 1000
    shuffle_shards: bool = True
    names: list[str] | None = None
    weight_schedule: list[MixPoint] | None = None
    replay: ReplayConfig | None = None

    def __post_init__(self) -> None:
        if self.weight_schedule is not None:
            self.weight_schedule = [as_dataclass(p, MixPoint) for p in self.weight_schedule]
        self.replay = as_dataclass(self.replay, ReplayConfig)

    def specs(self) -> list[str]:
        """The source specs as a list."""
        return [self.urls] if isinstance(self.urls, str) else list(self.urls)

    def source_names(self) -> list[str]:
        """The log name of every source (``names``, else derived from the specs)."""
        return list(self.names) if self.names is not None else default_names(self.specs())

    def sources(self, field: str) -> list[ResolvedSource]:
        """Resolve and check every source, replay included (errors name ``field``)."""
        specs = self.specs()
        if not specs:
            raise ValueError(f"{field}.urls is empty: give at least one shard source")
        if self.weights is not None:
            check_weights(self.weights, len(specs), f"{field}.weights")
            if not self.resampled:
                raise ValueError(f"{field}.weights needs {field}.resampled: true")
        if self.resampled and not self.epoch_samples:
            raise ValueError(f"{field}.resampled: true needs {field}.epoch_samples (an epoch size)")
        if self.weight_schedule is not None:
            if not self.resampled:
                raise ValueError(f"{field}.weight_schedule needs {field}.resampled: true")
            check_schedule(self.weight_schedule, len(specs), field)
        names = self.source_names()
        if len(names) != len(specs) or len(set(names)) != len(names) or not all(names):
            raise ValueError(f"{field}.names must be {len(specs)} distinct non-empty names")
        if self.replay is not None:
            self.replay_sources(f"{field}.replay", names)
        urls_field = field if field.startswith("--") else f"{field}.urls"
        return [resolve_source(s, urls_field) for s in specs]

    def replay_sources(
        self, field: str = "replay", names: list[str] | None = None
    ) -> list[ResolvedSource]:
        """Check ``replay`` and resolve its sources (errors name ``field``, e.g. ``x.replay``)."""
        if self.replay is None:
            return []
        specs = check_replay(self.replay, field, names or self.source_names())
        return [resolve_source(s, f"{field}.urls") for s in specs]


class ShardStream(torch.utils.data.IterableDataset):
    """Yields collated batches; each batch carries the count of samples skipped before it.

    When the stream mixes (several sources, or replay), each batch also gets ``batch.mix``:
    ``{source name: items}`` (see :class:`~mmpt.datamodules.mixing.SourceTally` for what
    "items" means with a batcher). A ``weight_schedule`` is evaluated per item at the global
    batch index being filled (:class:`~mmpt.datamodules.mixing.BatchClock`); a schedule in
    fractions of the run needs :meth:`set_total_batches` before iteration.

    Args:
        sources: Resolved shard sources.
        config: How to draw from them.
        sample_fn: Raw sample dict -> decoded item; raising skips (and counts) the sample.
        collate_fn: List of items -> batch object with an int attribute ``skipped``.
        batch_size: Items per batch (per rank).
        partial: Keep a last short batch.
        seed: Base seed for every random choice.
        rank: Distributed rank of this process.
        world_size: Number of ranks.
        num_workers: DataLoader workers that will iterate this stream (for the length).
        batcher: Turns the stream of items into lists of items, e.g. packed rows
            (``mmpt.datamodules.vlm.PackedBatcher``); default ``batch_size`` items a batch.
            With a batcher the batch count is unknown in plain mode (one pass an epoch), and
            in resampled mode ``epoch_samples`` counts what the batcher batches (rows).
        batcher_exact: The batcher makes one batch of every ``batch_size`` items it takes
            (it may add rows, e.g. scene-aware partners), so batch counts and per-worker
            quotas are those of plain batching (dropping a last short batch).
    """

    def __init__(
        self,
        sources: list[ResolvedSource],
        config: StreamConfig,
        sample_fn: Callable[[dict[str, Any]], Any],
        collate_fn: Callable[[list[Any]], Any],
        batch_size: int,
        partial: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        batcher: Callable[[Iterator[Any]], Iterator[list[Any]]] | None = None,
        batcher_exact: bool = False,
    ) -> None:
        super().__init__()
        self.batcher = batcher
        self.counted = batcher is None or batcher_exact  # batch counts follow sample counts
        self.sources, self.config = sources, config
        self.sample_fn, self.collate_fn = sample_fn, collate_fn
        self.batch_size, self.partial, self.seed = batch_size, partial, seed
        self.rank, self.world_size = rank, world_size
        self.num_workers = max(1, num_workers)
        self.epoch = SharedEpoch()
        self.batch_offset = SharedEpoch()  # batches of the epoch done before a mid-epoch resume
        self.urls = [u for s in sources for u in s.urls]
        self.names = config.source_names()
        self.url_names = {u: n for s, n in zip(sources, self.names, strict=True) for u in s.urls}
        self.replay_sources = config.replay_sources()
        self.total_batches: int | None = None
        counts = [s.counts for s in sources]
        self.counts = None if any(c is None for c in counts) else [n for c in counts for n in c]

    def set_epoch(self, epoch: int, offset: int = 0) -> None:
        """Advance the epoch (changes shard order and shuffles; seen by persistent workers).

        Args:
            epoch: The epoch about to run.
            offset: Batches of it already done (a run resumed mid-epoch): the mixture
                schedule's batch clock starts there.
        """
        self.epoch.set(epoch)
        self.batch_offset.set(offset)

    def set_total_batches(self, n: int | None) -> None:
        """The run's training batches per rank, for a ``weight_schedule`` in fractions.

        ``ShardDataModule.train_dataloader`` calls it before building the loader, with
        ``trainer.max_steps * accumulate_grad_batches`` (or ``max_epochs * len(stream)``).
        """
        self.total_batches = n

    @property
    def mixes(self) -> bool:
        """Whether batches carry ``mix`` (several sources, or replay)."""
        return len(self.names) > 1 or self.config.replay is not None

    def shards_for(self, slot: Slot) -> list[int]:
        """Indices into ``self.urls`` that ``slot`` reads in plain mode (fixed over epochs)."""
        idx = list(range(len(self.urls)))
        return split_shards(idx, slot, seed=None, epoch=0)

    def _worker_batches(self, rank: int) -> list[int]:
        """Batches each worker of ``rank`` can make from its shards (plain mode, counts known)."""
        out = []
        for w in range(self.num_workers):
            slot = Slot(rank, self.world_size, w, self.num_workers)
            n = sum(self.counts[i] for i in self.shards_for(slot))
            if self.config.replay is not None:  # replay items come on top of the main ones
                n = combined_items(n, self.config.replay.fraction)
            out.append(math.ceil(n / self.batch_size) if self.partial else n // self.batch_size)
        return out

    def worker_quotas(self, rank: int) -> list[int] | None:
        """Batches each worker of ``rank`` yields in a training epoch (None: one plain pass).

        Under DDP every rank must take the same number of steps, or the ranks that finish
        first leave the others waiting in a collective. Every rank computes every rank's
        count from the index, so all agree on the smallest and trim to it (largest workers
        first); the samples left out are reported by :func:`make_loader`.
        """
        if self.config.resampled:
            per_worker = self.config.epoch_samples // (self.world_size * self.batch_size)
            return [max(1, per_worker // self.num_workers)] * self.num_workers
        if self.counts is None or self.partial or not self.counted:
            return None
        quotas = self._worker_batches(rank)
        target = min(sum(self._worker_batches(r)) for r in range(self.world_size))
        while sum(quotas) > target:
            quotas[quotas.index(max(quotas))] -= 1
        return quotas

    def batches_for(self, rank: int) -> int | None:
        """Batches rank ``rank`` yields in one epoch, when sample counts are known."""
        quotas = self.worker_quotas(rank)
        if quotas is not None:
            return sum(quotas)
        if self.counts is None or not self.counted:
            return None
        return sum(self._worker_batches(rank))

    def __len__(self) -> int:
        n = self.batches_for(self.rank)
        if n is None:
            raise TypeError("length unknown: the shards have no index.json with sample counts")
        return n

    def worker_quota(self, slot: Slot) -> int | None:
        """Exact batches worker ``slot.worker`` yields this epoch (None: read one pass)."""
        quotas = self.worker_quotas(self.rank)
        return None if quotas is None else quotas[slot.worker]

    def _main_weights(self, slot: Slot, epoch: int) -> tuple[Any, BatchClock | None]:
        """Main-source weights (a callable following the clock with a schedule) and the clock."""
        cfg = self.config
        base = cfg.weights or [1.0] * len(self.sources)
        if not cfg.weight_schedule:
            return base, None
        schedule = WeightSchedule(base, cfg.weight_schedule, self.total_batches)
        per_epoch = self.batches_for(self.rank) or 0
        clock = BatchClock(epoch, per_epoch, slot.worker, slot.num_workers, self.batch_offset.get())
        return ScheduledWeights(schedule, clock), clock

    def __iter__(self) -> Iterator[Any]:
        slot = Slot.current(self.rank, self.world_size)
        epoch = self.epoch.get()
        counter = SkipCounter()
        rng = random.Random(slot.seed(self.seed, epoch))
        cfg = self.config
        quota = self.worker_quota(slot)
        clock, buf = None, cfg.shuffle_buffer
        if cfg.resampled:
            weights, clock = self._main_weights(slot, epoch)
            samples = resampled_mix(self.sources, self.names, weights, buf, rng, counter)
        else:
            mine = [self.urls[i] for i in self.shards_for(slot)]
            if cfg.shuffle_shards:
                rng.shuffle(mine)
            # Training reads its shards once; only if corrupt samples left it short of its
            # quota does it top up from the start, so every rank runs the same number of steps.
            # Each pass is shuffled on its own: the buffer never pulls a top-up pass's samples
            # in ahead of the first pass's last ones.
            passes = 1 if quota is None else None
            samples = repeat_passes(lambda: shuffle(read_shards(mine, counter), buf, rng), passes)
            samples = tag(samples, self.url_names)
        pairs = map_skipping(samples, Tagged(self.sample_fn), counter)
        names = list(self.names)
        if cfg.replay is not None:
            replay, n = cfg.replay, len(self.replay_sources)
            replay_rng = random.Random(slot.seed(self.seed + REPLAY_SEED, epoch))
            weights = replay.weights or [1.0] * n
            names_r = [replay.name] * n
            old = resampled_mix(self.replay_sources, names_r, weights, buf, replay_rng, counter)
            replayed = map_skipping(old, Tagged(self.sample_fn), counter)
            pairs = interleave(pairs, replayed, cfg.replay.fraction)
            names.append(cfg.replay.name)
        tally = SourceTally(pairs, names)
        if self.batcher is not None:
            batches = self.batcher(iter(tally))
        else:
            batches = batched(tally, self.batch_size, self.partial)
        if quota is not None:
            batches = itertools.islice(batches, quota)
        # Hold each batch back by one, so skips after the last batch are still counted.
        # Added to what collate counted itself (e.g. VLMCollate's undecodable images).
        pending = None
        for items_batch in batches:
            mixed = tally.take()  # the batcher yields a batch as soon as it is complete
            if clock is not None:
                clock.tick()
            if pending is not None:
                pending.skipped += counter.take()
                yield pending
            pending = self.collate_fn(items_batch)
            if self.mixes:
                pending.mix = mixed
        if pending is not None:
            pending.skipped += counter.take()
            yield pending
        elif counter.total:
            log.warning(
                "a worker produced no batch: all %d of its samples were skipped", counter.total
            )


def make_loader(stream: ShardStream, num_workers: int, pin_memory: bool = False):
    """A DataLoader over a stream that yields whole batches (``batch_size=None``).

    In plain mode it never starts more workers than the rank has shards (idle workers would
    only cost memory), and the stream's length is computed for the worker count used.
    """
    if not stream.config.resampled:
        shards_here = len(stream.urls[stream.rank :: stream.world_size])
        num_workers = min(num_workers, shards_here)
    stream.num_workers = max(1, num_workers)
    _report_uneven_ranks(stream)
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers > 0 else None,
    )


def _report_uneven_ranks(stream: ShardStream) -> None:
    """Warn when plain-mode ranks hold unequal data, so equal step counts drop samples."""
    if stream.config.resampled or stream.partial or stream.counts is None or not stream.counted:
        return
    own = [sum(stream._worker_batches(r)) for r in range(stream.world_size)]
    if len(set(own)) > 1:
        dropped = (own[stream.rank] - stream.batches_for(stream.rank)) * stream.batch_size
        log.warning(
            "plain mode: ranks hold %d-%d batches of data; every rank runs %d steps so DDP "
            "stays in step, leaving ~%d samples of rank %d unused this epoch. Use a shard count "
            "divisible by world_size x num_workers with equal shards, or data.train.resampled.",
            min(own),
            max(own),
            min(own),
            dropped,
            stream.rank,
        )

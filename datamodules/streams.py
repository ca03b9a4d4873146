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

from mmpt.datamodules.stages import (
    SharedEpoch,
    SkipCounter,
    Slot,
    batched,
    map_skipping,
    mix,
    read_shards,
    repeat_passes,
    resampled_urls,
    shuffle,
    split_shards,
)
from mmpt.datamodules.urls import ResolvedSource, resolve_source

log = logging.getLogger("mmpt.data")


@dataclass
class StreamConfig:
    """Where a split's samples come from and how they are drawn.

    Attributes:
        urls: One source (folder, file, glob, brace pattern, ``pipe:`` or fsspec URL), or a list
            of sources (mixed by ``weights`` when resampled, concatenated otherwise).
        weights: One weight per source; needs ``resampled: true``.
        resampled: Draw shards with replacement (endless; needs ``epoch_samples``).
        epoch_samples: Samples per epoch over all ranks (resampled mode).
        shuffle_buffer: Sample shuffle buffer per worker (0: keep order).
        shuffle_shards: Shuffle each worker's shard order every epoch.
    """

    urls: str | list[str]
    weights: list[float] | None = None
    resampled: bool = False
    epoch_samples: int | None = None
    shuffle_buffer: int = 1000
    shuffle_shards: bool = True

    def sources(self, field: str) -> list[ResolvedSource]:
        """Resolve and check every source (errors name ``field``)."""
        specs = [self.urls] if isinstance(self.urls, str) else list(self.urls)
        if not specs:
            raise ValueError(f"{field}.urls is empty: give at least one shard source")
        if self.weights is not None:
            if len(self.weights) != len(specs):
                raise ValueError(
                    f"{field}.weights has {len(self.weights)} entries for {len(specs)} sources"
                )
            if not self.resampled:
                raise ValueError(f"{field}.weights needs {field}.resampled: true")
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ValueError(f"{field}.weights must be >= 0 with a positive sum")
        if self.resampled and not self.epoch_samples:
            raise ValueError(f"{field}.resampled: true needs {field}.epoch_samples (an epoch size)")
        urls_field = field if field.startswith("--") else f"{field}.urls"
        return [resolve_source(s, urls_field) for s in specs]


class ShardStream(torch.utils.data.IterableDataset):
    """Yields collated batches; each batch carries the count of samples skipped before it.

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
        self.urls = [u for s in sources for u in s.urls]
        counts = [s.counts for s in sources]
        self.counts = None if any(c is None for c in counts) else [n for c in counts for n in c]

    def set_epoch(self, epoch: int) -> None:
        """Advance the epoch (changes shard order and shuffles; seen by persistent workers)."""
        self.epoch.set(epoch)

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

    def __iter__(self) -> Iterator[Any]:
        slot = Slot.current(self.rank, self.world_size)
        epoch = self.epoch.get()
        counter = SkipCounter()
        rng = random.Random(slot.seed(self.seed, epoch))
        cfg = self.config
        quota = self.worker_quota(slot)
        if cfg.resampled:
            streams = [
                read_shards(resampled_urls(s.urls, random.Random(rng.random())), counter)
                for s in self.sources
            ]
            samples = mix(streams, cfg.weights or [1.0] * len(streams), rng)
        else:
            mine = [self.urls[i] for i in self.shards_for(slot)]
            if cfg.shuffle_shards:
                rng.shuffle(mine)
            # Training reads its shards once; only if corrupt samples left it short of its
            # quota does it top up from the start, so every rank runs the same number of steps.
            passes = 1 if quota is None else None
            samples = repeat_passes(lambda: read_shards(mine, counter), passes)
        samples = shuffle(samples, cfg.shuffle_buffer, rng)
        items = map_skipping(samples, self.sample_fn, counter)
        if self.batcher is not None:
            batches = self.batcher(items)
        else:
            batches = batched(items, self.batch_size, self.partial)
        if quota is not None:
            batches = itertools.islice(batches, quota)
        # Hold each batch back by one, so skips after the last batch are still counted.
        # Added to what collate counted itself (e.g. VLMCollate's undecodable images).
        pending = None
        for items_batch in batches:
            if pending is not None:
                pending.skipped += counter.take()
                yield pending
            pending = self.collate_fn(items_batch)
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

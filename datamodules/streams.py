"""A WebDataset stream over one or more shard sources, for any modality.

Plain mode reads every shard once an epoch: shard ``i`` always belongs to rank ``i % W`` and,
within the rank, to worker ``j % N`` (its position in the rank's list), so each epoch is an
exact partition with known batch counts; only the order of a worker's shards and the sample
shuffle buffer change with the epoch. Resampled mode draws shards with replacement from
several weighted sources and mixes them per sample, for a fixed number of samples an epoch.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Callable, Iterator
from typing import Any

import torch.utils.data

from mmpt.datamodules.draws import ForcedWeights
from mmpt.datamodules.mixing import (
    BatchClock,
    ScheduledWeights,
    SourceTally,
    Tagged,
    WeightSchedule,
    combined_items,
    interleave,
    resampled_mix,
    tag,
)
from mmpt.datamodules.quotas import batch_count, slot_samples, trim_largest_first
from mmpt.datamodules.resume import Held, WorkerPosition, WorkerTracker, fingerprint
from mmpt.datamodules.seeding import sample_seed
from mmpt.datamodules.shard_faults import MAX_SKIPPED_FRACTION, SkipBudget, SkipReport
from mmpt.datamodules.stages import (
    DataError,
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
from mmpt.datamodules.stream_config import StreamConfig
from mmpt.datamodules.urls import ResolvedSource

__all__ = ["ShardStream", "StreamConfig"]

#: Offset of the replay streams' seed from the stream's seed (independent of the main draws).
REPLAY_SEED = 0x5EED


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
            A batcher that puts some items in a batch without using them up (partner copies)
            names the keys it does use up with a ``taken_keys(items) -> keys`` method (exact
            resume reads the others again). A batcher whose ``reads_ahead`` is False makes
            its last batches from what it holds when its input ends (e.g. a partial length
            bucket), so an exact one is fed only ``quota x batch_size`` items: no clip is
            decoded past the epoch's quota.
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
        self.where = ""  # the split, for errors (e.g. "data.val (shards/val)")
        self.track = False  # attach each batch's position (the training stream; see resume.py)
        self.resume_epoch: int | None = None
        self.resume: dict[int, WorkerPosition] = {}
        self.resume_first = 0  # the slot the DataLoader's worker 0 takes in the resumed epoch
        counts = [s.counts for s in sources]
        self.counts = None if any(c is None for c in counts) else [n for c in counts for n in c]
        self.expected = {
            u: n
            for s in sources
            if s.counts is not None
            for u, n in zip(s.urls, s.counts, strict=True)
        }
        self.max_skipped_fraction = MAX_SKIPPED_FRACTION  # set by the datamodule
        self._batches_memo: tuple[tuple, list[list[int]], int, dict[int, list[int]]] | None = None

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

    def _slot_batches(self) -> tuple[list[list[int]], int]:
        """Batches of every (rank, worker) in plain mode, and the smallest rank's total.

        One pass over the shard counts, computed once per world size, worker count and batch
        settings (the loader may lower ``num_workers`` after construction).
        """
        replay = self.config.replay.fraction if self.config.replay is not None else None
        key = (self.world_size, self.num_workers, self.batch_size, self.partial, replay)
        if self._batches_memo is None or self._batches_memo[0] != key:
            table = []
            for per_rank in slot_samples(self.counts, self.world_size, self.num_workers):
                if replay is not None:  # replay items come on top of the main ones
                    per_rank = [combined_items(n, replay) for n in per_rank]
                table.append([batch_count(n, self.batch_size, self.partial) for n in per_rank])
            self._batches_memo = (key, table, min(sum(t) for t in table), {})
        return self._batches_memo[1], self._batches_memo[2]

    def _worker_batches(self, rank: int) -> list[int]:
        """Batches each worker of ``rank`` can make from its shards (plain mode, counts known)."""
        return list(self._slot_batches()[0][rank])

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
        table, target = self._slot_batches()
        trimmed = self._batches_memo[3]
        if rank not in trimmed:
            trimmed[rank] = trim_largest_first(table[rank], target)
        return list(trimmed[rank])

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

    def skip_budget(self) -> SkipBudget:
        """What this rank may lose to unreadable shards in an epoch (``max_skipped_fraction``).

        Plain mode: of the samples of the rank's shards when the index counts them, else of
        its shards. Resampled mode: of the shards it draws from (a bad shard's samples are
        replaced by other draws).
        """
        where = self.where or str(self.config.urls)
        if self.config.resampled:
            return SkipBudget(self.max_skipped_fraction, None, len(self.urls), where)
        mine = range(len(self.urls))[self.rank :: self.world_size]
        samples = None if self.counts is None else sum(self.counts[i] for i in mine)
        return SkipBudget(self.max_skipped_fraction, samples, len(mine), where)

    def worker_quota(self, slot: Slot) -> int | None:
        """Exact batches worker ``slot.worker`` yields this epoch (None: read one pass)."""
        quotas = self.worker_quotas(self.rank)
        return None if quotas is None else quotas[slot.worker]

    def resume_from(self, epoch: int, workers: dict[int, WorkerPosition], first: int = 0) -> None:
        """Take up epoch ``epoch`` where a checkpoint left each worker (before iterating).

        Workers of that epoch without a position start it from the beginning; later epochs
        are not affected.

        Args:
            epoch: The epoch to take up.
            workers: Each worker's position in it.
            first: The worker whose batch came next in the saved run. A DataLoader takes its
                workers' batches in turn starting at worker 0, so in this epoch DataLoader
                worker ``i`` plays the stream's worker ``(first + i) % num_workers``: the
                batches come in the uninterrupted run's order.
        """
        self.resume_epoch, self.resume, self.resume_first = epoch, dict(workers), first

    def fingerprint(self) -> str:
        """What a saved position depends on (shards, seed, batch size, stream settings)."""
        cfg = self.config
        replay = dataclasses.asdict(cfg.replay) if cfg.replay is not None else None
        return fingerprint(
            urls=self.urls, seed=self.seed, batch_size=self.batch_size, partial=self.partial,
            resampled=cfg.resampled, epoch_samples=cfg.epoch_samples, weights=cfg.weights,
            shuffle_buffer=cfg.shuffle_buffer, shuffle_shards=cfg.shuffle_shards, replay=replay,
        )  # fmt: skip

    def _main_weights(
        self, slot: Slot, epoch: int, tracker: WorkerTracker, start: WorkerPosition | None
    ) -> tuple[Any, Any]:
        """Main-source weights (a callable following the clock with a schedule) and the clock.

        A resumed worker's clock goes on from its batches done, and while the stream
        fast-forwards every old draw is forced to the source it had
        (:class:`~mmpt.datamodules.draws.ForcedWeights`).
        """
        cfg = self.config
        base = cfg.weights or [1.0] * len(self.sources)
        if not cfg.weight_schedule:
            return base, None
        schedule = WeightSchedule(base, cfg.weight_schedule, self.total_batches)
        per_epoch = self.batches_for(self.rank) or 0
        offset = self.batch_offset.get() if start is None else 0
        clock = BatchClock(epoch, per_epoch, slot.worker, slot.num_workers, offset)
        weights: Any = ScheduledWeights(schedule, clock)
        if start is not None:
            clock.made = start.batches
            cursor = tracker.main
            weights = ForcedWeights(weights, tracker.draws, lambda: cursor.forwarding)
        return weights, clock

    def _start(self, slot: Slot, epoch: int) -> WorkerPosition | None:
        """Where this worker takes up ``epoch`` (None: a fresh epoch, not a resumed one)."""
        if self.resume_epoch != epoch:
            return None
        return self.resume.get(slot.worker) or WorkerPosition(slot.worker, epoch)

    def _pairs(
        self, slot: Slot, epoch: int, counter: SkipCounter, tracker: WorkerTracker,
        start: WorkerPosition | None,
    ) -> tuple[Iterator[tuple[str, Any]], list[str], Any]:  # fmt: skip
        """The worker's decoded ``(source name, item)`` stream, its source names and clock."""
        cfg, buf = self.config, self.config.shuffle_buffer
        rng = random.Random(slot.seed(self.seed, epoch))
        clock = None
        if cfg.resampled:
            weights, clock = self._main_weights(slot, epoch, tracker, start)
            count = tracker.draws.counted if tracker.draws is not None else None
            samples = resampled_mix(self.sources, self.names, weights, buf, rng, counter, count)
        else:
            mine = [self.urls[i] for i in self.shards_for(slot)]
            if cfg.shuffle_shards:
                rng.shuffle(mine)
            # One pass, topped up from the start only if corrupt samples left it short of its
            # quota (equal steps on every rank); each pass is shuffled on its own.
            passes = 1 if self.worker_quota(slot) is None else None
            samples = repeat_passes(lambda: shuffle(read_shards(mine, counter), buf, rng), passes)
            samples = tag(samples, self.url_names)
        seed = sample_seed(self.seed, epoch, slot.rank, slot.worker)  # per-sample augmentations
        decode = Held(Tagged(self.sample_fn), tracker.ledger, "main", seed)
        pairs = map_skipping(tracker.main(samples), decode, counter)
        names = list(self.names)
        if cfg.replay is not None:
            replay, n = cfg.replay, len(self.replay_sources)
            replay_rng = random.Random(slot.seed(self.seed + REPLAY_SEED, epoch))
            weights = replay.weights or [1.0] * n
            names_r = [replay.name] * n
            old = resampled_mix(self.replay_sources, names_r, weights, buf, replay_rng, counter)
            decode_r = Held(Tagged(self.sample_fn), tracker.ledger, "replay", seed)
            replayed = map_skipping(tracker.replay(old), decode_r, counter)
            mixed = interleave(pairs, replayed, replay.fraction, start=tracker.mixed_start)
            pairs = tracker.count_mixed(mixed)
            names.append(replay.name)
        return pairs, names, clock

    def __iter__(self) -> Iterator[Any]:
        slot = Slot.current(self.rank, self.world_size)
        epoch = self.epoch.get()
        if epoch == self.resume_epoch and self.resume_first:  # see resume_from
            worker = (slot.worker + self.resume_first) % slot.num_workers
            slot = dataclasses.replace(slot, worker=worker)
        start = self._start(slot, epoch)
        scheduled = len(self.sources) if self.config.weight_schedule else 0
        tracker = WorkerTracker(slot.worker, epoch, start, scheduled)
        counter = SkipCounter(self.expected, self.skip_budget())
        quota = self.worker_quota(slot)
        if quota is not None and start is not None:
            quota = max(0, quota - start.batches)
        pairs, names, clock = self._pairs(slot, epoch, counter, tracker, start)
        tally = SourceTally(pairs, names)
        if self.batcher is not None:
            items: Iterator[Any] = iter(tally)
            bounded = self.counted and not getattr(self.batcher, "reads_ahead", True)
            if quota is not None and bounded:
                items = itertools.islice(items, quota * self.batch_size)  # decode no more
            batches = self.batcher(items)
        else:
            batches = batched(tally, self.batch_size, self.partial)
        if quota is not None:
            batches = itertools.islice(batches, quota)
        # Hold each batch back by one, so skips after the last batch are still counted.
        pending = None
        taken = getattr(self.batcher, "taken_keys", None)  # e.g. anchors, not partners
        for items_batch in batches:
            mixed = tally.take()  # the batcher yields a batch as soon as it is complete
            if clock is not None:
                clock.tick()
            if pending is not None:
                self._attach_skips(pending, counter)
                yield pending
            pending = self.collate_fn(items_batch)
            if self.mixes:
                pending.mix = mixed
            position = tracker.batch_made(taken(items_batch) if taken else pending.keys)
            if self.track:
                pending.stream_state = position
        if pending is not None:
            self._attach_skips(pending, counter)
            yield pending
        elif counter.total and self.partial and not counter.shards:  # no silent empty eval
            raise DataError(
                f"{self.where or self.config.urls}: all {counter.total} samples read"
                f"{' by one worker' if slot.num_workers > 1 else ''} were skipped, so it "
                f"gives no validation: {counter.summary()}"
            )
        elif counter.total:  # the loader adds these to the next batch (or reports them)
            yield SkipReport(counter.take(), counter.take_reasons(), counter.take_shards())

    @staticmethod
    def _attach_skips(batch: Any, counter: SkipCounter) -> None:
        """Add the skips since the previous batch to ``batch.skipped`` and ``skip_reasons``.

        Added to what collate counted itself (e.g. VLMCollate's undecodable images);
        ``skip_reasons`` (``{reason: [count, example]}``) and ``shard_faults`` (the shards
        found unreadable, :class:`~mmpt.datamodules.shard_faults.ShardFault`) are logged by the
        main process.
        """
        batch.skipped += counter.take()
        batch.skip_reasons = counter.take_reasons()
        batch.shard_faults = counter.take_shards()

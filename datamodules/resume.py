"""Exact mid-epoch resume: where every worker of every rank is in its epoch, in each checkpoint.

A worker's raw (not yet decoded) sample stream is a pure function of the seed, the epoch and
its (rank, worker) slot: shard order, shuffle buffer and resampled draws all come from one
seeded RNG. So a position in it is one number, the count of raw samples pulled, plus the few
pulled samples that no batch has taken yet (a packing batcher holds some back). Each batch
carries its worker's position as of that batch (``batch.stream_state``); the datamodule keeps
the latest one per worker of the batches the model actually trained on, and every checkpoint
gathers those of all ranks. A resumed worker rebuilds its raw stream and fast-forwards it,
reading but not decoding the samples before the position, so the plain mode goes on with
exactly the samples of the epoch not yet seen and the resampled mode continues the same
random stream (under a mixture schedule each earlier draw is forced to its source: ``draws``).

A fast-forwarded worker does not decode, so its random generators cannot be where the
uninterrupted worker's were. Decoding therefore never depends on them: python's ``random``,
numpy's and torch's CPU generator are seeded for each sample from (seed, epoch, rank, worker,
stream, position) (:mod:`mmpt.datamodules.seeding`), so a sample's random crop, flip or
caption choice is the same whenever and wherever it is decoded. A resumed epoch starts with
the worker whose batch came next (the DataLoader takes its workers' batches in turn).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch.distributed as dist
import torch.utils.data

from mmpt.datamodules.draws import Draws
from mmpt.datamodules.seeding import sample_seed, seeded

log = logging.getLogger("mmpt.data")

#: Raw-sample field carrying the sample's position in its worker's stream (metadata, like
#: ``__key__``; the sample function never sees it).
POS_KEY = "__pos__"

#: Format of the checkpointed state.
VERSION = 1


@dataclasses.dataclass
class WorkerPosition:
    """Where one DataLoader worker of one rank is in its epoch, as of one of its batches.

    Attributes:
        worker: The worker's index in the rank's DataLoader.
        epoch: The epoch.
        batches: Batches the worker had made this epoch, that one included.
        main: Raw samples pulled from the main stream (positions ``0 .. main - 1``).
        main_redo: Positions below ``main`` that no batch has taken yet (read again on resume).
        replay: Raw samples pulled from the replay stream.
        replay_redo: Its positions below ``replay`` not taken yet.
        mixed: Items the replay interleave had yielded (its pattern goes on from there).
        drawn: Main draws per source among positions ``0 .. main - 1``; kept only with a
            mixture schedule, whose weights depend on the batch being filled, so that a
            fast-forward forces each old draw's source (:mod:`~mmpt.datamodules.draws`).
        main_from: With a schedule, for each of ``main_redo``: ``[source, draws per source
            before it]``. The position's size is bounded by the items held, not the epoch.
    """

    worker: int
    epoch: int
    batches: int = 0
    main: int = 0
    main_redo: list[int] = dataclasses.field(default_factory=list)
    replay: int = 0
    replay_redo: list[int] = dataclasses.field(default_factory=list)
    mixed: int = 0
    drawn: list[int] | None = None
    main_from: list[list[int]] | None = None


class Cursor:
    """Numbers one raw stream's samples and skips those a resumed run already trained on.

    Args:
        done: Positions below this were pulled before (skipped unless in ``redo``).
        redo: Positions below ``done`` to pull again (no batch had taken them).
        draws: Under a mixture schedule, the stream's :class:`~mmpt.datamodules.draws.Draws`
            (told the position of each sample passed on).
    """

    def __init__(self, done: int = 0, redo: Iterable[int] = (), draws: Draws | None = None) -> None:
        self.done, self.redo, self.draws = done, set(redo), draws
        self.next = 0  # position of the next raw sample

    @property
    def forwarding(self) -> bool:
        """Whether the stream is still before the position it resumed from."""
        return self.next < self.done

    def __call__(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """The samples not yet trained on, each with :data:`POS_KEY` set."""
        for sample in samples:  # drawing it reads ``self.forwarding`` (a schedule's forcing)
            pos = self.next
            self.next += 1
            if pos < self.done:
                if pos not in self.redo:
                    continue
                self.redo.discard(pos)
            if self.draws is not None:
                self.draws.note(pos)
            sample[POS_KEY] = pos
            yield sample

    def state(self, held: Iterable[int]) -> tuple[int, list[int]]:
        """(positions pulled, sorted positions below that still to take), given ``held``."""
        return max(self.next, self.done), sorted(self.redo | set(held))


class Ledger:
    """Decoded items pulled but not yet in a batch: ``key -> FIFO of (stream, position)``."""

    def __init__(self) -> None:
        self._held: dict[str, collections.deque[tuple[str, int]]] = collections.defaultdict(
            collections.deque
        )

    def hold(self, stream: str, key: str, pos: int) -> None:
        """Item ``key`` of ``stream`` at ``pos`` decoded and went to the batcher."""
        self._held[key].append((stream, pos))

    def release(self, keys: Iterable[str]) -> None:
        """A batch took these items (unknown keys, e.g. a batcher's partner copies, are ignored)."""
        for key in keys:
            queue = self._held.get(key)
            if queue:
                queue.popleft()
                if not queue:
                    del self._held[key]

    def positions(self, stream: str) -> list[int]:
        """Positions of ``stream`` still held."""
        return [p for q in self._held.values() for s, p in q if s == stream]


class Held:
    """``sample -> fn(sample)`` that records the decoded sample in the ledger (else raises).

    A sample decodes under generators seeded from ``seed`` and its position (:func:`seeded`).

    Args:
        fn: Raw sample -> item (raising skips and counts the sample).
        ledger: Where decoded, not yet batched items are recorded.
        stream: ``main`` or ``replay``.
        seed: Seed of this worker's stream for the epoch (:func:`sample_seed` of seed, epoch,
            rank, worker); None decodes with the generators as they are.
    """

    def __init__(
        self, fn: Callable[[dict[str, Any]], Any], ledger: Ledger, stream: str,
        seed: int | None = None,
    ) -> None:  # fmt: skip
        self.fn, self.ledger, self.stream, self.seed = fn, ledger, stream, seed
        self.restore = torch.utils.data.get_worker_info() is None  # the training process

    def __call__(self, sample: dict[str, Any]) -> Any:
        """Decode, then record (key, position)."""
        pos = sample.pop(POS_KEY, None)
        if pos is None or self.seed is None:
            out = self.fn(sample)
        else:
            with seeded(sample_seed(self.seed, self.stream, pos), self.restore):
                out = self.fn(sample)
        if pos is not None:
            self.ledger.hold(self.stream, sample.get("__key__", ""), pos)
        return out


class WorkerTracker:
    """One worker's resume bookkeeping for one epoch.

    Args:
        worker: The worker's index.
        epoch: The epoch.
        start: Where a resumed run left this worker, or None (the epoch's start).
        scheduled: Main sources of a mixture schedule (count their draws); 0: no schedule.
    """

    def __init__(
        self, worker: int, epoch: int, start: WorkerPosition | None, scheduled: int = 0
    ) -> None:
        start = start or WorkerPosition(worker, epoch)
        self.worker, self.epoch, self.batches = worker, epoch, start.batches
        self.ledger = Ledger()
        self.draws = None
        if scheduled:
            held = dict(zip(start.main_redo, start.main_from or [], strict=False))
            self.draws = Draws(scheduled, start.drawn, held)
        self.main = Cursor(start.main, start.main_redo, self.draws)
        self.replay = Cursor(start.replay, start.replay_redo)
        self.mixed_start, self.mixed = start.mixed, start.mixed

    def count_mixed(self, items: Iterable[Any]) -> Iterator[Any]:
        """Pass items through, counting them (the replay interleave's position)."""
        for item in items:
            self.mixed += 1
            yield item

    def batch_made(self, keys: Iterable[str]) -> WorkerPosition:
        """A batch with these sample keys was made: the worker's position after it."""
        self.ledger.release(keys)
        self.batches += 1
        main, main_redo = self.main.state(self.ledger.positions("main"))
        replay, replay_redo = self.replay.state(self.ledger.positions("replay"))
        drawn = main_from = None
        if self.draws is not None:
            drawn, main_from = self.draws.state(self.main.forwarding, main_redo)
        return WorkerPosition(
            self.worker, self.epoch, self.batches, main, main_redo, replay, replay_redo,
            self.mixed, drawn, main_from,
        )  # fmt: skip


def fingerprint(**facts: Any) -> str:
    """A short hash of what makes positions meaningful (shards, seed, batch size ...)."""
    blob = json.dumps(facts, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:16]


class StreamPosition:
    """The training stream's position on this rank, as of the last batch the model took.

    The datamodule records every training batch (:meth:`record`), saves :meth:`state_dict`
    in each checkpoint (gathered from all ranks; every rank calls it while saving) and gives
    the loaded state back to the new stream (:meth:`apply`).
    """

    def __init__(self) -> None:
        self.epoch: int | None = None
        self.workers: dict[int, WorkerPosition] = {}
        self.loaded: dict[str, Any] | None = None
        self.previous: tuple[int, WorkerPosition | None] | None = None  # before the last batch
        self.next_worker = 0  # whose batch comes next, before any batch was recorded
        self.applied = False  # the training loader started (a later load comes too late)

    def record(self, batch: Any) -> None:
        """Note the position a training batch carries (batches without one are ignored)."""
        state: WorkerPosition | None = getattr(batch, "stream_state", None)
        if state is None:
            return
        if state.epoch != self.epoch:
            self.epoch, self.workers = state.epoch, {}
        self.previous = (state.worker, self.workers.get(state.worker))
        self.workers[state.worker] = state

    def state_dict(
        self,
        stream: Any,
        rank: int,
        world_size: int,
        epoch_done: bool = False,
        in_flight: bool = False,
    ) -> dict[str, Any]:
        """Every rank's position (a collective under DDP/FSDP: all ranks call it).

        Args:
            stream: The training stream.
            rank: This rank.
            world_size: Ranks.
            epoch_done: The epoch's last batch was trained on: a resume starts the next one.
            in_flight: The last batch recorded did not finish its step (a checkpoint saved on
                an exception): its worker's position before it is saved, so it comes again.
        """
        workers, next_worker = dict(self.workers), self.next_worker
        if self.previous is not None:  # the DataLoader takes its workers' batches in turn
            worker, before = self.previous
            next_worker = (worker + 1) % (stream.num_workers if stream is not None else 1)
            if in_flight:
                next_worker = worker
                if before is None:
                    workers.pop(worker, None)
                else:
                    workers[worker] = before
        mine = {
            "epoch": self.epoch,
            "workers": {w: dataclasses.asdict(p) for w, p in sorted(workers.items())},
            "next_worker": next_worker,
        }
        ranks = [mine]
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            ranks = [None] * world_size
            dist.all_gather_object(ranks, mine)
        return {
            "version": VERSION,
            "fingerprint": stream.fingerprint() if stream is not None else None,
            "world_size": world_size,
            "num_workers": stream.num_workers if stream is not None else None,
            "epoch_done": bool(epoch_done),
            "ranks": ranks,
        }

    def new_loader(self) -> None:
        """A new training loader was built: a checkpoint loaded from now on is still in time."""
        self.applied = False

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Keep a checkpoint's state until the training stream starts (:meth:`apply`)."""
        if state and self.applied:
            log.warning(
                "the checkpoint's data position came after the training loader had started: "
                "this epoch's data starts over (samples already trained on come again)"
            )
        self.loaded = dict(state) if state else None

    def apply(self, stream: Any, rank: int, world_size: int) -> None:
        """Give the loaded position of this rank to ``stream`` (once), if it fits the run.

        Called just before the training workers start. It sets the stream's epoch: the saved
        one, or the next when the saved epoch was done; mid-epoch, the worker whose batch
        came next in the saved run comes first again, so batches keep their order. A run
        saved with other shards, seed or batch size, or another number of ranks or workers,
        cannot take up the same streams: it is told so and starts the epoch over.
        """
        state, self.loaded = self.loaded, None
        self.applied = True
        if not state:
            return
        why = _mismatch(state, stream, world_size)
        if why:
            log.warning(
                "the checkpoint's data position does not fit this run (%s): the epoch's data "
                "starts over, so samples of it already trained on come again",
                why,
            )
            return
        mine = state["ranks"][rank]
        if mine.get("epoch") is None:
            return
        if state.get("epoch_done"):
            stream.set_epoch(int(mine["epoch"]) + 1)
            return
        scheduled = bool(getattr(getattr(stream, "config", None), "weight_schedule", None))
        workers = _positions(mine["workers"], scheduled)
        if workers is None:
            log.warning(
                "the checkpoint's data position was saved with another mixture schedule "
                "setting or by an older mmpt: the epoch's data starts over, so samples of it "
                "already trained on come again"
            )
            return
        self.next_worker = int(mine.get("next_worker", 0))
        stream.set_epoch(int(mine["epoch"]))  # each worker's clock goes on from its batches
        stream.resume_from(int(mine["epoch"]), workers, self.next_worker)
        self.epoch, self.workers, self.previous = int(mine["epoch"]), dict(workers), None
        done = sum(p.batches for p in workers.values())
        log.info("data: resuming epoch %d after %d batches on rank %d", self.epoch, done, rank)


def epoch_done(trainer: Any) -> bool:
    """Whether the trainer has trained on the last batch of its current epoch."""
    progress = trainer.fit_loop.epoch_loop.batch_progress
    if batch_in_flight(trainer):
        return False
    return bool(progress.is_last_batch) or progress.current.ready >= trainer.num_training_batches


def batch_in_flight(trainer: Any) -> bool:
    """Whether the current training batch was handed over but has not finished its step."""
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    return progress.ready > progress.processed


def _mismatch(state: dict[str, Any], stream: Any, world_size: int) -> str | None:
    """Why a saved position cannot be used by ``stream`` (None: it can)."""
    if state.get("version") != VERSION:
        return f"state format {state.get('version')}, expected {VERSION}"
    if state.get("fingerprint") != stream.fingerprint():
        return "other shards, seed, batch size or stream settings"
    if state.get("world_size") != world_size:
        return f"saved with {state.get('world_size')} ranks, now {world_size}"
    if state.get("num_workers") != stream.num_workers:
        return f"saved with {state.get('num_workers')} workers a rank, now {stream.num_workers}"
    return None


def _positions(
    saved: dict[Any, dict[str, Any]], scheduled: bool
) -> dict[int, WorkerPosition] | None:
    """The saved workers' positions; None when they cannot continue this stream's draws.

    A scheduled stream needs each worker's draws per source (``drawn``); an older format's
    ``ends`` (every batch end of the epoch) is not read any more.
    """
    out = {}
    for w, p in saved.items():
        p = dict(p)
        if p.pop("ends", None) is not None:
            return None
        if p.get("main") and (p.get("drawn") is not None) != scheduled:
            return None
        out[int(w)] = WorkerPosition(**p)
    return out

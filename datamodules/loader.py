"""DataLoaders over shard streams, and how many training batches a run takes from one."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import lightning as L
import torch.utils.data

from mmpt.datamodules.seeding import sample_seed
from mmpt.datamodules.shard_faults import SkipReport

if TYPE_CHECKING:
    from mmpt.datamodules.streams import ShardStream

log = logging.getLogger("mmpt.data")


#: Called with the stream and the skips a loader could not add to a batch (the epoch's last).
OnReport = Callable[["ShardStream", SkipReport], None]


def fold_reports(
    items: Iterator[Any], stream: ShardStream, on_report: OnReport | None
) -> Iterator[Any]:
    """The stream's batches, with each :class:`SkipReport` added to the batch after it.

    A report after the last batch goes to ``on_report`` (else it is logged as a warning).
    """
    carry: SkipReport | None = None
    for item in items:
        if isinstance(item, SkipReport):
            carry = item if carry is None else carry.add_to(item)
            continue
        if carry is not None:
            item, carry = carry.add_to(item), None
        yield item
    if carry is None:
        return
    if on_report is not None:
        on_report(stream, carry)
    else:
        log.warning(
            "%d samples skipped or lost after the last batch: %s",
            carry.skipped,
            "; ".join(
                [f"{n} x {r}" for r, (n, _) in carry.skip_reasons.items()]
                + [f.describe() for f in carry.shard_faults]
            ),
        )


class ShardLoader(torch.utils.data.DataLoader):
    """A DataLoader over a :class:`ShardStream` that folds the workers' skip reports.

    Args:
        *args: As for :class:`torch.utils.data.DataLoader`.
        on_report: Takes the skips left after the last batch (see :func:`fold_reports`).
        **kwargs: As for :class:`torch.utils.data.DataLoader`.
    """

    def __init__(self, *args: Any, on_report: OnReport | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_report = on_report

    def __iter__(self) -> Iterator[Any]:
        return fold_reports(super().__iter__(), self.dataset, self.on_report)


class DeferredLoader(ShardLoader):
    """A DataLoader whose iterator starts (and forks its workers) at the first ``next()``.

    Lightning creates the training iterator while it sets up, before it restores a
    checkpoint's loops (and, with strategies that restore after setup, before the datamodule's
    state). ``before_iter`` runs just before the real iterator is made, when the trainer has
    restored everything, so the workers start from the right epoch and position.

    It follows Lightning's resumable-loader protocol (``state_dict`` / ``load_state_dict``),
    so a mid-epoch resume is not reported as unreliable; the position itself is saved and
    restored by the datamodule (:class:`~mmpt.datamodules.resume.StreamPosition`, every
    worker of every rank), which hands it to the stream in ``before_iter``.

    Args:
        *args: As for :class:`torch.utils.data.DataLoader`.
        before_iter: Called before each real iterator is made.
        **kwargs: As for :class:`torch.utils.data.DataLoader`.
    """

    def __init__(self, *args: Any, before_iter: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.before_iter = before_iter

    def __iter__(self) -> Iterator[Any]:
        return _Deferred(self)

    def state_dict(self) -> dict[str, Any]:
        """Nothing: the datamodule's checkpoint entry holds the stream position."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to load: the datamodule restores the stream position (see the class)."""


class _Deferred:
    """Iterator that makes its loader's real iterator at the first ``next()``."""

    def __init__(self, loader: DeferredLoader) -> None:
        self.loader, self.it = loader, None

    def __iter__(self) -> _Deferred:
        return self

    def __next__(self) -> Any:
        if self.it is None:
            self.loader.before_iter()
            loader = self.loader
            batches = torch.utils.data.DataLoader.__iter__(loader)
            self.it = fold_reports(batches, loader.dataset, loader.on_report)
        return next(self.it)

    def __len__(self) -> int:
        return len(self.loader)


def make_loader(
    stream: ShardStream,
    num_workers: int,
    pin_memory: bool = False,
    before_iter: Callable[[], None] | None = None,
    on_report: OnReport | None = None,
) -> torch.utils.data.DataLoader:
    """A DataLoader over a stream that yields whole batches (``batch_size=None``).

    In plain mode it never starts more workers than the rank has shards (idle workers would
    only cost memory), and the stream's length is computed for the worker count used.
    With ``before_iter`` it is a :class:`DeferredLoader` (the training loader). Skips of
    workers that made no batch are added to the next batch; those after the last one go to
    ``on_report`` (:func:`fold_reports`).

    The loader has its own generator, seeded from the stream's seed, for its workers' base
    seed: making an iterator never draws from torch's global generator, whose training draws
    (dropout, masks) a resumed run restores (:mod:`mmpt.models.rng_state`).
    """
    if not stream.config.resampled:
        shards_here = len(stream.urls[stream.rank :: stream.world_size])
        num_workers = min(num_workers, shards_here)
    stream.num_workers = max(1, num_workers)
    _report_uneven_ranks(stream)
    options: dict[str, Any] = {
        "batch_size": None,
        "num_workers": num_workers,
        "persistent_workers": num_workers > 0,
        "pin_memory": pin_memory,
        "prefetch_factor": 4 if num_workers > 0 else None,
        "generator": torch.Generator().manual_seed(sample_seed(stream.seed, "loader")),
    }
    if before_iter is not None:
        return DeferredLoader(stream, before_iter=before_iter, on_report=on_report, **options)
    return ShardLoader(stream, on_report=on_report, **options)


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


def training_batches(trainer: L.Trainer, stream: ShardStream) -> int | None:
    """Training batches of the run per rank: the first of max_steps and max_epochs to stop it.

    Args:
        trainer: The trainer (``max_steps``, ``max_epochs``, ``limit_train_batches``,
            ``accumulate_grad_batches``).
        stream: The training stream (its per-epoch batch count, when known).

    Returns:
        Batches, or None when the run has no known length.
    """
    limits = []
    if trainer.max_steps and trainer.max_steps > 0:
        limits.append(trainer.max_steps * trainer.accumulate_grad_batches)
    try:
        per_epoch = len(stream)
    except TypeError:  # a packed stream in plain mode: its batch count is unknown
        per_epoch = None
    limit = trainer.limit_train_batches
    if per_epoch is not None and limit is not None:
        per_epoch = min(per_epoch, limit if isinstance(limit, int) else int(per_epoch * limit))
    if per_epoch is not None and trainer.max_epochs and trainer.max_epochs > 0:
        limits.append(trainer.max_epochs * per_epoch)
    return min(limits) if limits else None

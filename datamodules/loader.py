"""DataLoaders over shard streams, and how many training batches a run takes from one."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import lightning as L
import torch.utils.data

if TYPE_CHECKING:
    from mmpt.datamodules.streams import ShardStream

log = logging.getLogger("mmpt.data")


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

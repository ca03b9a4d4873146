"""Log skipped and clamped samples and unreadable shards in the main process, once an epoch."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from mmpt.datamodules.shard_faults import ShardFault, SkipBudget
from mmpt.datamodules.stages import DataError

log = logging.getLogger("mmpt.data")

CLAMPED = "clamped"  # the tally key of clip windows moved or cut to fit their video


class SkipLog:
    """Tallies each batch's ``skip_reasons`` (and ``clamped``) per stage and epoch.

    The first time a reason is seen in the run it is logged at once with an example; the
    counts of an epoch are logged, one line per reason, when a later epoch starts or at
    :meth:`flush` (end of the run). The exact counts are also logged as metrics
    (``data/skipped``, ``data/clamped``) by the models.

    A batch's ``shard_faults`` (shards its worker could not read) are kept once per shard per
    stage and epoch, whichever workers report them: each is logged when first seen in the run,
    and the epoch's list in its summary.
    """

    def __init__(self) -> None:
        self._open: dict[tuple[str, int], Counter] = {}
        self._seen: set[str] = set()
        self._shards: dict[tuple[str, int], dict[str, ShardFault]] = {}

    def record(
        self, stage: str, epoch: int, batch: Any, budget: SkipBudget | None = None
    ) -> list[ShardFault]:
        """Count one batch's skips (``batch.skip_reasons``), clamped clips and bad shards.

        Args:
            stage: ``train``, ``validate`` ...
            epoch: The epoch.
            batch: The batch (``skip_reasons``, ``clamped``, ``shard_faults``).
            budget: The stream's ``max_skipped_fraction``, checked on the epoch's bad shards.

        Returns:
            The batch's bad shards not yet seen this stage and epoch.

        Raises:
            DataError: The epoch's bad shards pass the budget (the message lists them).
        """
        for key in [k for k in set(self._open) | set(self._shards) if k[1] < epoch]:
            self._flush(key)
        new = self._record_shards((stage, epoch), getattr(batch, "shard_faults", None) or [])
        known = list(self._shards.get((stage, epoch), {}).values())
        if new and budget is not None and (message := budget.excess(known)):
            raise DataError(message)
        tally = self._open.setdefault((stage, epoch), Counter())
        for reason, (count, example) in (getattr(batch, "skip_reasons", None) or {}).items():
            if reason not in self._seen:
                self._seen.add(reason)
                log.warning(
                    "skipping samples: %s (first: %s); counted in data/skipped, and logged "
                    "once per epoch with its count",
                    reason,
                    example,
                )
            tally[reason] += count
        clamped = int(getattr(batch, CLAMPED, 0) or 0)
        if clamped:
            tally[CLAMPED] += clamped
        return new

    def _record_shards(self, key: tuple[str, int], faults: list[ShardFault]) -> list[ShardFault]:
        """Keep the shards not yet seen under ``key``; announce those new to the run."""
        known = self._shards.setdefault(key, {}) if faults else self._shards.get(key, {})
        new = [f for f in faults if f.url not in known]
        for fault in new:
            known[fault.url] = fault
            if fault.url not in self._seen:
                self._seen.add(fault.url)
                log.warning(
                    "unreadable shard %s; counted in data/skipped_shards and data/lost_samples, "
                    "and listed once per epoch",
                    fault.describe(),
                )
        return new

    def flush(self) -> None:
        """Log every open epoch's counts (end of a run or an evaluation)."""
        for key in set(self._open) | set(self._shards):
            self._flush(key)

    def _flush(self, key: tuple[str, int]) -> None:
        stage, epoch = key
        faults = list(self._shards.pop(key, {}).values())
        if faults:
            lost = sum(f.lost or 0 for f in faults)
            log.warning(
                "%s epoch %d: %d shards unreadable, %d samples lost: %s",
                stage,
                epoch,
                len(faults),
                lost,
                "; ".join(f.describe() for f in faults),
            )
        for reason, count in sorted(self._open.pop(key, {}).items()):
            if reason == CLAMPED:
                log.warning(
                    "%s epoch %d: %d clip windows ran past their video and were clamped (kept)",
                    stage,
                    epoch,
                    count,
                )
            else:
                log.warning("%s epoch %d: %d samples skipped: %s", stage, epoch, count, reason)

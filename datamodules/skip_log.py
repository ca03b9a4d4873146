"""Log skipped and clamped samples in the main process: once per reason per epoch, with counts."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

log = logging.getLogger("mmpt.data")

CLAMPED = "clamped"  # the tally key of clip windows moved or cut to fit their video


class SkipLog:
    """Tallies each batch's ``skip_reasons`` (and ``clamped``) per stage and epoch.

    The first time a reason is seen in the run it is logged at once with an example; the
    counts of an epoch are logged, one line per reason, when a later epoch starts or at
    :meth:`flush` (end of the run). The exact counts are also logged as metrics
    (``data/skipped``, ``data/clamped``) by the models.
    """

    def __init__(self) -> None:
        self._open: dict[tuple[str, int], Counter] = {}
        self._seen: set[str] = set()

    def record(self, stage: str, epoch: int, batch: Any) -> None:
        """Count one batch's skips (``batch.skip_reasons``) and clamped clips."""
        for key in [k for k in self._open if k[1] < epoch]:
            self._flush(key)
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

    def flush(self) -> None:
        """Log every open epoch's counts (end of a run or an evaluation)."""
        for key in list(self._open):
            self._flush(key)

    def _flush(self, key: tuple[str, int]) -> None:
        stage, epoch = key
        for reason, count in sorted(self._open.pop(key).items()):
            if reason == CLAMPED:
                log.warning(
                    "%s epoch %d: %d clip windows ran past their video and were clamped (kept)",
                    stage,
                    epoch,
                    count,
                )
            else:
                log.warning("%s epoch %d: %d samples skipped: %s", stage, epoch, count, reason)

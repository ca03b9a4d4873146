"""Learning-rate schedules as config pieces: a factor of the peak LR at each optimizer step."""

from __future__ import annotations

import math


class Schedule:
    """Base class: ``factor(step, total_steps)`` multiplies the optimizer's peak LR."""

    #: Whether the schedule's shape depends on the run's total length.
    needs_total: bool = False

    def factor(self, step: int, total_steps: int) -> float:
        """LR multiplier at ``step`` (0-based) of ``total_steps``."""
        return 1.0

    def warmup_for(self, total_steps: int) -> int:
        """Warmup steps for a run of ``total_steps``."""
        return 0


class Constant(Schedule):
    """Linear warmup, then the peak LR forever.

    Args:
        warmup_steps: Steps of linear warmup from 0.
        warmup_ratio: Warmup as a fraction of the run (used when ``warmup_steps`` is 0).
    """

    def __init__(self, warmup_steps: int = 0, warmup_ratio: float = 0.0) -> None:
        self.warmup_steps, self.warmup_ratio = warmup_steps, warmup_ratio
        self.needs_total = warmup_ratio > 0 and warmup_steps == 0

    def warmup_for(self, total_steps: int) -> int:  # noqa: D102
        return self.warmup_steps or int(round(self.warmup_ratio * total_steps))

    def factor(self, step: int, total_steps: int) -> float:  # noqa: D102
        w = self.warmup_for(total_steps)
        return (step + 1) / w if step < w else 1.0


class WarmupCosine(Constant):
    """Linear warmup, then cosine decay to ``min_ratio`` x peak at the last step.

    Args:
        warmup_steps: Steps of linear warmup from 0.
        warmup_ratio: Warmup as a fraction of the run (used when ``warmup_steps`` is 0).
        min_ratio: Final LR as a fraction of the peak.
    """

    def __init__(self, warmup_steps: int = 0, warmup_ratio: float = 0.0, min_ratio: float = 0.0):
        super().__init__(warmup_steps, warmup_ratio)
        self.min_ratio = min_ratio
        self.needs_total = True

    def factor(self, step: int, total_steps: int) -> float:  # noqa: D102
        w = self.warmup_for(total_steps)
        if step < w:
            return (step + 1) / w
        progress = min(1.0, (step - w) / max(1, total_steps - w))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

"""Momentum (EMA) teacher for self-distillation: a frozen copy updated from the student."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def cosine_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """Teacher momentum at optimizer ``step``: ``base`` rising to ``final`` on a half cosine.

    ``m = final - (final - base) * (cos(pi * step / total_steps) + 1) / 2`` (DINO's and
    MoCo v3's schedule); steps past ``total_steps`` keep ``final``.

    Args:
        step: 0-based optimizer step.
        total_steps: Steps of the whole run (> 0).
        base: Momentum at step 0, in [0, 1].
        final: Momentum at the last step (1.0: the teacher stops moving).

    Raises:
        ValueError: ``total_steps`` < 1 or a momentum outside [0, 1].
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not (0.0 <= base <= 1.0 and 0.0 <= final <= 1.0):
        raise ValueError(f"momentum must be in [0, 1], got base={base}, final={final}")
    progress = min(max(step, 0), total_steps) / total_steps
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


class EMATeacher(nn.Module):
    """A frozen deep copy of a student module, moved towards it by exponential averaging.

    ``update(student, m)`` sets every teacher parameter to ``m * teacher + (1 - m) * student``
    (``torch._foreach_lerp_``) and copies buffers (batch-norm statistics, fixed tables) from
    the student. The teacher never takes gradients; its parameters are in ``state_dict`` (and
    so in checkpoints, resumed with the run) but never in the optimizer.

    Attributes:
        module: The teacher copy, in the student's structure.
    """

    def __init__(self, student: nn.Module) -> None:
        """Copy ``student`` (weights included) and freeze the copy.

        Args:
            student: The module the teacher follows (e.g. backbone + projection head).
        """
        super().__init__()
        self.module = copy.deepcopy(student)
        self.module.requires_grad_(False)

    def forward(self, *args: object, **kwargs: object) -> object:
        """Run the teacher copy (no gradients flow into it)."""
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float) -> None:
        """One EMA step: ``teacher = momentum * teacher + (1 - momentum) * student``.

        Args:
            student: Module of the same structure as the teacher.
            momentum: Weight of the old teacher, in [0, 1].

        Raises:
            ValueError: Momentum outside [0, 1] or a student of another structure.
        """
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        t_params = list(self.module.parameters())
        s_params = list(student.parameters())
        if len(t_params) != len(s_params):
            raise ValueError("the student does not have the teacher's structure")
        if t_params and momentum < 1.0:
            torch._foreach_lerp_(t_params, [p.detach() for p in s_params], 1.0 - momentum)
        for t_buf, s_buf in zip(self.module.buffers(), student.buffers(), strict=True):
            t_buf.copy_(s_buf)


__all__ = ["EMATeacher", "cosine_momentum"]

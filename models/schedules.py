"""Learning-rate schedules as config pieces: a factor of the peak LR at each optimizer step.

Constant, WarmupCosine, WarmupStableDecay, TriStage (wav2vec 2.0 fine-tuning) and Rewarm
(continual pretraining) are named by
``class_path`` under ``model.init_args.lr_schedule``; ``mmpt schedule -c CONFIG`` plots one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal


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

    def decay_start(self, total_steps: int) -> int:
        """First step below the peak after warmup (``total_steps``: never; for plots)."""
        return total_steps

    def bind(self, peak_lr: float) -> Schedule:
        """Tell the schedule the optimizer's peak LR (used by :class:`Rewarm`); returns self."""
        return self


class Constant(Schedule):
    """Linear warmup, then the peak LR forever.

    With ``w`` warmup steps::

        factor(s) = (s + 1) / w        s < w
                  = 1                  s >= w

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

    With ``w`` warmup steps, ``m = min_ratio`` and ``T`` steps::

        factor(s) = (s + 1) / w                                  s < w
                  = m + (1 - m) * (1 + cos(pi p)) / 2,           s >= w
                    p = min(1, (s - w) / max(1, T - w))

    Args:
        warmup_steps: Steps of linear warmup from 0.
        warmup_ratio: Warmup as a fraction of the run (used when ``warmup_steps`` is 0).
        min_ratio: Final LR as a fraction of the peak.
    """

    def __init__(self, warmup_steps: int = 0, warmup_ratio: float = 0.0, min_ratio: float = 0.0):
        super().__init__(warmup_steps, warmup_ratio)
        self.min_ratio = min_ratio
        self.needs_total = True

    def decay_start(self, total_steps: int) -> int:  # noqa: D102
        return self.warmup_for(total_steps)

    def factor(self, step: int, total_steps: int) -> float:  # noqa: D102
        w = self.warmup_for(total_steps)
        if step < w:
            return (step + 1) / w
        progress = min(1.0, (step - w) / max(1, total_steps - w))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


FIELD = "model.lr_schedule.init_args"
DECAY_SHAPES = ("linear", "cosine", "sqrt")


class WarmupStableDecay(Constant):
    """Warmup-stable-decay (WSD): linear warmup, the peak LR, then a short decay at the end.

    With ``w`` warmup steps, ``d`` decay steps and decay start ``D = T - d`` in a run of ``T``
    steps::

        factor(s) = (s + 1) / w                                  s < w
                  = 1                                            w <= s < D
                  = m + (1 - m) * shape(p),  p = (s - D + 1) / d  s >= D

    so the last step reaches ``m = min_ratio`` exactly, with ``shape(p)`` one of
    ``linear: 1 - p``, ``cosine: (1 + cos(pi p)) / 2``, ``sqrt: 1 - sqrt(p)``. The stable phase
    can be continued from any of its checkpoints, which a cosine's cannot (continual
    pretraining: WSD beats a second cosine).

    Args:
        warmup_steps: Steps of linear warmup from 0.
        warmup_ratio: Warmup as a fraction of the run (used when ``warmup_steps`` is 0).
        decay_ratio: Decay as a fraction of the run (used when ``decay_steps`` is 0).
        decay_steps: Steps of decay at the end of the run.
        decay_shape: ``"linear"``, ``"cosine"`` or ``"sqrt"``.
        min_ratio: Final LR as a fraction of the peak.

    Raises:
        ValueError: An argument out of range (names its ``model.lr_schedule`` field).
    """

    def __init__(
        self,
        warmup_steps: int = 0,
        warmup_ratio: float = 0.0,
        decay_ratio: float = 0.1,
        decay_steps: int = 0,
        decay_shape: Literal["linear", "cosine", "sqrt"] = "linear",
        min_ratio: float = 0.0,
    ) -> None:
        _check(warmup_steps >= 0, "warmup_steps", warmup_steps, "must be >= 0")
        _check(0 <= warmup_ratio < 1, "warmup_ratio", warmup_ratio, "must be in [0, 1)")
        _check(0 <= decay_ratio <= 1, "decay_ratio", decay_ratio, "must be in [0, 1]")
        _check(decay_steps >= 0, "decay_steps", decay_steps, "must be >= 0")
        _check(decay_shape in DECAY_SHAPES, "decay_shape", decay_shape, f"not in {DECAY_SHAPES}")
        _check(0 <= min_ratio <= 1, "min_ratio", min_ratio, "must be in [0, 1]")
        if warmup_steps == 0 and decay_steps == 0:
            _check(
                warmup_ratio + decay_ratio <= 1,
                "decay_ratio",
                decay_ratio,
                f"plus warmup_ratio={warmup_ratio} exceeds the run",
            )
        super().__init__(warmup_steps, warmup_ratio)
        self.decay_ratio, self.decay_steps = decay_ratio, decay_steps
        self.decay_shape, self.min_ratio = decay_shape, min_ratio
        self.needs_total = self.needs_total or decay_steps > 0 or decay_ratio > 0

    def decay_for(self, total_steps: int) -> int:
        """Decay steps for a run of ``total_steps``."""
        return self.decay_steps or int(round(self.decay_ratio * total_steps))

    def decay_start(self, total_steps: int) -> int:  # noqa: D102
        return total_steps - self.decay_for(total_steps)

    def factor(self, step: int, total_steps: int) -> float:  # noqa: D102
        w, d = self.warmup_for(total_steps), self.decay_for(total_steps)
        if d and w + d > total_steps:
            raise ValueError(
                f"{FIELD}: {w} warmup + {d} decay steps exceed the run's {total_steps} steps "
                "(lower warmup_steps/decay_steps, or lengthen trainer.max_steps)"
            )
        if step < w:
            return (step + 1) / w
        start = total_steps - d
        if step < start:
            return 1.0
        p = min(1.0, (step - start + 1) / d)
        if self.decay_shape == "linear":
            shape = 1 - p
        elif self.decay_shape == "cosine":
            shape = 0.5 * (1 + math.cos(math.pi * p))
        else:
            shape = 1 - math.sqrt(p)
        return self.min_ratio + (1 - self.min_ratio) * shape


class TriStage(Schedule):
    """fairseq's tri-stage schedule of wav2vec 2.0 fine-tuning: warm up, hold, decay.

    With phase lengths ``w, h, d`` (``phase_ratio`` x ``T``), start ``a = init_scale`` and
    end ``b = final_scale``::

        factor(s) = a + (1 - a) * s / w                  s < w
                  = 1                                    w <= s < w + h
                  = exp(ln(b) * (s - w - h) / d)         w + h <= s < w + h + d
                  = b                                    after

    Args:
        phase_ratio: Warmup, hold and decay as fractions of the run (wav2vec 2.0: 0.1, 0.4,
            0.5); they sum to at most 1.
        init_scale: LR at step 0 as a fraction of the peak (0.01).
        final_scale: LR at the end of the decay as a fraction of the peak (0.05).

    Raises:
        ValueError: An argument out of range (names its ``model.lr_schedule`` field).
    """

    needs_total = True

    def __init__(
        self,
        phase_ratio: tuple[float, float, float] = (0.1, 0.4, 0.5),
        init_scale: float = 0.01,
        final_scale: float = 0.05,
    ) -> None:
        ratios = tuple(float(r) for r in phase_ratio)
        _check(len(ratios) == 3 and min(ratios) >= 0, "phase_ratio", phase_ratio, "needs 3 >= 0")
        _check(sum(ratios) <= 1 + 1e-9, "phase_ratio", phase_ratio, "must sum to at most 1")
        _check(0 <= init_scale <= 1, "init_scale", init_scale, "must be in [0, 1]")
        _check(0 < final_scale <= 1, "final_scale", final_scale, "must be in (0, 1]")
        self.phase_ratio, self.init_scale, self.final_scale = ratios, init_scale, final_scale

    def _phases(self, total_steps: int) -> tuple[int, int, int]:
        return tuple(int(round(r * total_steps)) for r in self.phase_ratio)  # type: ignore[return-value]

    def warmup_for(self, total_steps: int) -> int:  # noqa: D102
        return self._phases(total_steps)[0]

    def decay_start(self, total_steps: int) -> int:  # noqa: D102
        w, h, _ = self._phases(total_steps)
        return w + h

    def factor(self, step: int, total_steps: int) -> float:  # noqa: D102
        w, h, d = self._phases(total_steps)
        if step < w:
            return self.init_scale + (1 - self.init_scale) * step / w
        if step < w + h:
            return 1.0
        if step < w + h + d:
            return math.exp(math.log(self.final_scale) * (step - w - h) / d)
        return self.final_scale


class Rewarm(Schedule):
    """Re-warm a continued run from the old run's last LR to a new peak, then follow ``then``.

    With ``w`` warmup steps, start ``r`` (the old LR / the new peak) and ``T`` steps::

        factor(s) = r + (1 - r) * (s + 1) / w          s < w
                  = then.factor(s - w, T - w)          s >= w   (then: Constant() by default)

    With ``r = 0`` this is the warmup of :class:`Constant`. Give ``then`` its own warmup 0.
    Re-warming opens a stability gap (loss rises, then recovers): a short warmup from the old
    LR keeps it small.

    Args:
        start_ratio: LR at the start as a fraction of the new peak (e.g. old final LR / new
            peak). Ignored when ``from_checkpoint`` is given.
        from_checkpoint: A Lightning ``.ckpt`` of the old run: its last LR / the new peak is
            the start. The new peak is the optimizer's LR, given by :meth:`bind` or ``peak_lr``.
        warmup_steps: Steps of linear re-warmup.
        warmup_ratio: Re-warmup as a fraction of the run (used when ``warmup_steps`` is 0).
        then: Schedule of the remaining steps (e.g. a :class:`WarmupStableDecay`).
        peak_lr: The new peak LR (``model.init_args.optimizer.init_args.lr``), needed with
            ``from_checkpoint`` until :meth:`bind` gives it.

    Raises:
        ValueError: An argument out of range, ``then`` with a warmup of its own, or a
            checkpoint without an LR.
        FileNotFoundError: ``from_checkpoint`` names no file.
    """

    def __init__(
        self,
        start_ratio: float = 0.0,
        from_checkpoint: str | None = None,
        warmup_steps: int = 0,
        warmup_ratio: float = 0.0,
        then: Schedule | None = None,
        peak_lr: float | None = None,
    ) -> None:
        _check(start_ratio >= 0, "start_ratio", start_ratio, "must be >= 0")
        _check(warmup_steps >= 0, "warmup_steps", warmup_steps, "must be >= 0")
        _check(0 <= warmup_ratio < 1, "warmup_ratio", warmup_ratio, "must be in [0, 1)")
        _check(peak_lr is None or peak_lr > 0, "peak_lr", peak_lr, "must be > 0")
        _check(
            from_checkpoint is None or start_ratio == 0,
            "start_ratio",
            start_ratio,
            "and from_checkpoint both give the start: keep one",
        )
        if then is not None and (
            getattr(then, "warmup_steps", 0) or getattr(then, "warmup_ratio", 0)
        ):
            raise ValueError(
                f"{FIELD}.then: {type(then).__name__} has a warmup of its own, which would "
                "drop the LR to 0 after the re-warmup: set its warmup_steps and warmup_ratio to 0"
            )
        self.start_ratio, self.from_checkpoint = start_ratio, from_checkpoint
        self.warmup_steps, self.warmup_ratio = warmup_steps, warmup_ratio
        self.then = then if then is not None else Constant()
        self.peak_lr = peak_lr
        self.old_lr = last_lr(from_checkpoint) if from_checkpoint is not None else None
        self.needs_total = (warmup_ratio > 0 and warmup_steps == 0) or self.then.needs_total

    def bind(self, peak_lr: float) -> Rewarm:
        """Give the new peak LR (the optimizer's), which turns ``from_checkpoint`` into a ratio.

        Raises:
            ValueError: ``peak_lr`` was also given in the config, with another value.
        """
        if self.peak_lr is not None and not math.isclose(self.peak_lr, peak_lr, rel_tol=1e-9):
            raise ValueError(
                f"{FIELD}.peak_lr={self.peak_lr} differs from the optimizer's lr={peak_lr}: "
                "drop peak_lr (the optimizer's lr is the new peak)"
            )
        self.peak_lr = peak_lr
        self.then.bind(peak_lr)
        return self

    def start(self) -> float:
        """The LR factor the re-warmup starts from (``old_lr / peak_lr`` from a checkpoint)."""
        if self.old_lr is None:
            return self.start_ratio
        if self.peak_lr is None:
            raise ValueError(
                f"{FIELD}.from_checkpoint needs the new peak LR: set {FIELD}.peak_lr to "
                "model.init_args.optimizer.init_args.lr (the new peak)"
            )
        return self.old_lr / self.peak_lr

    def warmup_for(self, total_steps: int) -> int:  # noqa: D102
        return self.warmup_steps or int(round(self.warmup_ratio * total_steps))

    def decay_start(self, total_steps: int) -> int:  # noqa: D102
        w = self.warmup_for(total_steps)
        return w + self.then.decay_start(total_steps - w)

    def factor(self, step: int, total_steps: int) -> float:  # noqa: D102
        w = self.warmup_for(total_steps)
        if step < w:
            r = self.start()
            return r + (1 - r) * (step + 1) / w
        return self.then.factor(step - w, max(1, total_steps - w))


def last_lr(path: str, field: str = f"{FIELD}.from_checkpoint") -> float:
    """The LR of the last optimizer step saved in a Lightning checkpoint.

    Read from ``optimizer_states[0]["param_groups"][0]["lr"]``, else from
    ``lr_schedulers[0]["_last_lr"][0]``.

    Raises:
        FileNotFoundError: No such file (names ``field``).
        ValueError: The checkpoint holds neither.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"{field}: no checkpoint at {path!r}")
    from mmpt.safe_load import load_torch_file

    ckpt = load_torch_file(path)
    try:
        return float(ckpt["optimizer_states"][0]["param_groups"][0]["lr"])
    except (KeyError, IndexError, TypeError):
        pass
    try:
        return float(ckpt["lr_schedulers"][0]["_last_lr"][0])
    except (KeyError, IndexError, TypeError):
        raise ValueError(
            f"{field}={path!r} holds no optimizer or LR scheduler state (a weights-only file?): "
            f"give {FIELD}.start_ratio instead"
        ) from None


def _check(ok: bool, name: str, value: object, why: str) -> None:
    if not ok:
        raise ValueError(f"{FIELD}.{name}={value!r} {why}")

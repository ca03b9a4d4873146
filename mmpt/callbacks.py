"""Run-level callbacks: run summary (outputs, metrics) and EMA of the trained weights."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import WeightAveraging
from rich.console import Console
from rich.table import Table
from torch.optim.swa_utils import get_ema_multi_avg_fn

from mmpt.eval.callback import ZeroShotEvalCallback

#: The pointer, beside a run's ``version_N`` folder, to the latest finished run.
LAST_RUN = "last"
_VERSION = re.compile(r"^version_\d+$")


def point_last_run(log_dir: str | Path) -> Path | None:
    """Point ``<parent>/last`` at ``log_dir`` (a ``version_N`` folder), atomically.

    A symlink is made under a temporary name and renamed over the old pointer, so a reader sees
    the previous run or this one, never a missing path. Two runs of one recipe keep their own
    ``version_N/checkpoints/last.ckpt``; ``<parent>/last/checkpoints/last.ckpt`` is the latest.

    Args:
        log_dir: The finished run's folder.

    Returns:
        The pointer, or None when ``log_dir`` is not a ``version_N`` folder (a fixed
        ``version`` names its own folder) or the file system has no symlinks.
    """
    log_dir = Path(log_dir)
    if not _VERSION.match(log_dir.name):
        return None
    link = log_dir.parent / LAST_RUN
    tmp = log_dir.parent / f".{LAST_RUN}.{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(log_dir.name, target_is_directory=True)
        os.replace(tmp, link)
    except OSError:  # no symlinks here (some Windows setups), or `last` is a real folder
        tmp.unlink(missing_ok=True)
        return None
    return link


class RunSummary(L.Callback):
    """Prints where a finished run put its outputs, and its final validation metrics.

    Rank 0 only: checkpoint, metrics.csv, resolved config, evaluation reports and plots. The
    run's folder ``<root>/version_N`` becomes the latest run, ``<root>/last``
    (:func:`point_last_run`), and the checkpoint is also printed by that stable path.
    """

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Print the output paths (plain lines, easy to copy) and a table of metrics."""
        if not trainer.is_global_zero:
            return
        paths: list[tuple[str, str]] = []
        ckpt = trainer.checkpoint_callback
        path = ""
        if ckpt is not None:
            path = getattr(ckpt, "last_model_path", "") or getattr(ckpt, "best_model_path", "")
            if path:
                paths.append(("checkpoint", path))
        if trainer.logger is not None and trainer.logger.log_dir:
            log_dir = Path(trainer.logger.log_dir)
            link = point_last_run(log_dir)
            real, run = Path(path).resolve(), log_dir.resolve()
            if link is not None and path and real.is_relative_to(run):
                paths.append(("latest run", str(link / real.relative_to(run))))
            metrics = log_dir / "metrics.csv"
            paths.append(("metrics", str(metrics) if metrics.exists() else str(log_dir)))
            if (log_dir / "config.yaml").exists():
                paths.append(("config", str(log_dir / "config.yaml")))
        for cb in trainer.callbacks:
            if isinstance(cb, ZeroShotEvalCallback):
                paths.extend((f"eval {k}", str(v)) for k, v in cb.last_report.items())
        console = Console()
        console.rule("mmpt run outputs")
        for name, path in paths:
            console.print(f"{name}: {path}", soft_wrap=True, highlight=False)
        table = Table(title="final validation metrics", show_header=False)
        for name, value in sorted(trainer.callback_metrics.items()):
            if name.startswith("val/"):
                table.add_row(name, f"{float(value):.4f}")
        if table.row_count:
            console.print(table)


class EMA(WeightAveraging):
    """Exponential moving average of the trainable weights, on Lightning's ``WeightAveraging``.

    After optimizer step ``start_step + k * every_n_steps`` (0-based, ``k >= 0``) the average
    is updated: the first update copies the weights, later ones apply
    ``ema = decay * ema + (1 - decay) * weights``. Everything else is Lightning's
    :class:`~lightning.pytorch.callbacks.WeightAveraging`:

    - validation runs on the EMA weights (swapped in and out around each validation epoch);
    - after ``fit`` the module holds the EMA weights;
    - every checkpoint (``last.ckpt`` included) has the EMA weights in ``state_dict``, so
      ``mmpt eval --ckpt``, ``model.init_from`` and ``mmpt merge`` use them; the live training
      weights are in ``current_model_state`` and the update count in ``averaging_state``;
      resuming with this callback restores both.

    Differences from Lightning's ``EMAWeightAveraging`` (why this class exists):

    - the update is ``torch._foreach_lerp_`` (``get_ema_multi_avg_fn``), which leaves frozen
      parameters (``model.freeze`` / ``model.trainable``) bit-identical to the model; the
      ``decay * ema + (1 - decay) * w`` form moves about 15% of frozen float32 values by an ulp
      per update;
    - buffers (int ids, norm statistics, fixed tables) are copied from the model at each
      update instead of averaged (``use_buffers=False``): averaging int buffers in float
      arithmetic is not meaningful;
    - until the first update (``start_step``) the average follows the model, so validation,
      checkpoints and the end of ``fit`` see the trained weights; Lightning would use the
      weights from the start of ``fit`` there;
    - arguments are checked, and the ``configure_model`` sharding warning is not raised for
      :class:`~mmpt.models.module.MMPTModule`, whose hook only loads weights and freezes.

    The average is a full copy of the module on ``device`` (default: the model's), frozen
    parameters included: use ``device: cpu`` when memory is short. Keep fp32 master weights
    (``precision: bf16-mixed``, not ``bf16-true``): a 0.999 EMA does not move in bf16.
    Sharded strategies (FSDP) are not supported (Lightning's limitation).

    YAML::

        trainer:
          callbacks:
            - class_path: mmpt.callbacks.EMA
              init_args: {decay: 0.999, start_step: 1000, every_n_steps: 1}

    Args:
        decay: Weight of the old average, in (0, 1).
        start_step: 0-based optimizer step of the first update (it copies the weights).
        every_n_steps: Update after every n-th optimizer step from ``start_step`` on.
        device: Where the average lives (e.g. ``"cpu"``); default the model's device.
    """

    def __init__(
        self,
        decay: float = 0.999,
        start_step: int = 0,
        every_n_steps: int = 1,
        device: str | None = None,
    ) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        if start_step < 0:
            raise ValueError(f"EMA start_step must be >= 0, got {start_step}")
        if every_n_steps < 1:
            raise ValueError(f"EMA every_n_steps must be >= 1, got {every_n_steps}")
        super().__init__(device=device, use_buffers=False, multi_avg_fn=get_ema_multi_avg_fn(decay))
        self.decay = decay
        self.start_step = start_step
        self.every_n_steps = every_n_steps

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Whether to update after 0-based optimizer step ``step_idx`` (never at epoch ends)."""
        if step_idx is None or step_idx < self.start_step:
            return False
        return (step_idx - self.start_step) % self.every_n_steps == 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Create the average (Lightning), quietly for mmpt's idempotent ``configure_model``."""
        from mmpt.models.module import MMPTModule

        with warnings.catch_warnings():
            if type(pl_module).configure_model is MMPTModule.configure_model:
                warnings.filterwarnings("ignore", message=".*WeightAveraging doesn't support")
            super().setup(trainer, pl_module, stage)

    def _follow_until_first_update(self, pl_module: L.LightningModule) -> None:
        """Before the first update, set the average to the model's current weights."""
        avg = self._average_model
        if avg is not None and int(avg.n_averaged) == 0:
            avg.module.load_state_dict(pl_module.state_dict())

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Swap the EMA weights in for validation (the model's own before the first update)."""
        self._follow_until_first_update(pl_module)
        super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Keep the EMA weights in until :meth:`on_validation_end`.

        Callbacks listed after this one still evaluate at the epoch end (e.g.
        ``ZeroShotEvalCallback`` encodes its class prompts there): they must see the same weights
        as the validation batches did.
        """

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Swap the live weights back (before ``ModelCheckpoint``, which Lightning runs last)."""
        if self._average_model is not None:
            self._swap_models(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Leave the EMA weights in the module (the model's own if EMA never started)."""
        self._follow_until_first_update(pl_module)
        super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict
    ) -> None:
        """EMA weights to ``state_dict``, live ones to ``current_model_state`` (Lightning)."""
        self._follow_until_first_update(pl_module)
        super().on_save_checkpoint(trainer, pl_module, checkpoint)

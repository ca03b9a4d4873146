"""Loggers for recipes: their folder follows ``trainer.default_root_dir`` unless set."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor


class MergingWriter(ExperimentWriter):
    """Lightning's ``metrics.csv`` writer with one row per step.

    Lightning logs a step's values in several calls (``LearningRateMonitor`` at the batch start,
    the module's ``self.log`` values at its end, validation and epoch-end values later), and its
    writer turns each call into a row of its own. Here a call for the same step as the newest
    row fills that row, unless it would overwrite one of its values with a different one (then
    it starts a new row). The newest row is held back at a periodic flush, since more values of
    its step may follow; :meth:`save` with ``flush_all`` (the logger's ``finalize``) writes it.
    """

    def log_metrics(self, metrics_dict: dict[str, Any], step: int | None = None) -> None:
        """Record metrics of ``step`` (merged into the newest row when it has that step)."""
        if step is None:
            return super().log_metrics(metrics_dict, step)
        row = {k: v.item() if isinstance(v, Tensor) else v for k, v in metrics_dict.items()}
        row["step"] = step
        last = self.metrics[-1] if self.metrics else None
        if (
            last is not None
            and last["step"] == step
            and all(last.get(k, v) == v for k, v in row.items())
        ):
            last.update(row)
        else:
            self.metrics.append(row)

    def save(self, flush_all: bool = False) -> None:
        """Write the recorded rows; the newest stays in memory unless ``flush_all``."""
        held = [] if flush_all else self.metrics[-1:]
        self.metrics = self.metrics[: len(self.metrics) - len(held)]
        super().save()
        self.metrics = held


class CSVLogger(_LightningCSVLogger):
    """Lightning's CSV logger with an optional ``save_dir`` and one ``metrics.csv`` row per step.

    ``mmpt fit`` fills a missing ``save_dir`` with ``trainer.default_root_dir`` before it builds
    the logger (:func:`mmpt.run_config.fill_logger_dirs`), so ``--trainer.default_root_dir``
    moves the metrics, the saved ``config.yaml`` and the checkpoints of a ``ModelCheckpoint``
    without ``dirpath`` into ``<default_root_dir>/<name>/version_N/``; each run gets the next
    free ``version_N``.

    The values of one step (training metrics, the learning rates of ``LearningRateMonitor``,
    validation metrics at that step) share one row of ``metrics.csv`` (:class:`MergingWriter`),
    where Lightning's logger writes a row per logging call.

    Args:
        save_dir: Root folder; None: ``trainer.default_root_dir`` (the current folder when the
            logger is built outside mmpt's CLI).
        name: Sub-folder of ``save_dir`` ("" for none).
        version: Run folder (``version_N`` when None: the next free one).
        prefix: Prefix of every metric name.
        flush_logs_every_n_steps: How often ``metrics.csv`` is written.
    """

    def __init__(
        self,
        save_dir: str | None = None,
        name: str = "",
        version: int | str | None = None,
        prefix: str = "",
        flush_logs_every_n_steps: int = 100,
    ) -> None:
        super().__init__(
            save_dir if save_dir is not None else ".",
            name=name,
            version=version,
            prefix=prefix,
            flush_logs_every_n_steps=flush_logs_every_n_steps,
        )

    @property
    @rank_zero_experiment
    def experiment(self) -> MergingWriter:
        """The writer of ``metrics.csv`` and ``hparams.yaml`` (created on first use)."""
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = MergingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Write every pending row (the held-back newest one included)."""
        if self._experiment is not None:
            self._experiment.save(flush_all=True)

"""Loggers for recipes: their folder follows ``trainer.default_root_dir`` unless set."""

from __future__ import annotations

import csv
import os
from typing import IO, Any

from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from mmpt.io import atomic_write


class MergingWriter(ExperimentWriter):
    """Lightning's ``metrics.csv`` writer with one row per step.

    Lightning logs a step's values in several calls (``LearningRateMonitor`` at the batch start,
    the module's ``self.log`` values at its end, validation and epoch-end values later), and its
    writer turns each call into a row of its own. Here a call for the same step as the newest
    row fills that row, unless it would overwrite one of its values with a different one (then
    it starts a new row). The newest row is held back at a periodic flush, since more values of
    its step may follow; :meth:`save` with ``flush_all`` (the logger's ``finalize``) writes it.

    A resumed fit writes into its own run folder again (:mod:`mmpt.runs`): where Lightning's
    writer deletes the folder's ``metrics.csv``, this one keeps the rows logged before the
    checkpoint and, at its first save, drops those of the steps it logs again (the steps lost with
    the interruption).
    """

    def _check_log_dir_exists(self) -> None:
        self._kept: list[dict[str, str]] | None = None
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                reader = csv.DictReader(f)
                self._kept = list(reader)
                self.metrics_keys = sorted(reader.fieldnames or [])

    def _continue_file(self) -> None:
        """Rewrite the kept rows of the steps before the first one recorded now."""
        first = min(int(m["step"]) for m in self.metrics)
        rows = [r for r in self._kept or [] if r.get("step", "") == "" or int(r["step"]) < first]
        self._record_new_keys()

        def write(f: IO[str]) -> None:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)

        atomic_write(self.metrics_file_path, write, binary=False)
        self._kept = None

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
        if getattr(self, "_kept", None) is not None and self.metrics:
            self._continue_file()
        held = [] if flush_all else self.metrics[-1:]
        self.metrics = self.metrics[: len(self.metrics) - len(held)]
        super().save()
        self.metrics = held


class CSVLogger(_LightningCSVLogger):
    """Lightning's CSV logger with an optional ``save_dir`` and one ``metrics.csv`` row per step.

    ``mmpt fit`` fills a missing ``save_dir`` with ``trainer.default_root_dir`` before it builds
    the logger (:func:`mmpt.run_config.fill_logger_dirs`), so ``--trainer.default_root_dir``
    moves the metrics, the saved ``config.yaml`` and the checkpoints of a ``ModelCheckpoint``
    without ``dirpath`` into ``<default_root_dir>/<name>/version_N/``; each new run gets the next
    free ``version_N``, and ``--ckpt_path last`` continues the run it resumes in its folder
    (:mod:`mmpt.runs`), appending to its ``metrics.csv`` (Lightning's logger would delete it).
    Pending rows are also written with every checkpoint, so a killed run's ``metrics.csv`` holds
    the steps its newest checkpoint has.

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

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        """Write the rows logged so far with each checkpoint (a crash keeps them)."""
        self.save()

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

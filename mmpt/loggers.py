"""Loggers for recipes: their folder follows ``trainer.default_root_dir`` unless set."""

from __future__ import annotations

import csv
import os
from typing import IO, Any

from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter as _PLExperimentWriter

from mmpt.io import atomic_write


class _ResumingWriter(_PLExperimentWriter):
    """Lightning's CSV writer, but a resumed run continues its ``metrics.csv``.

    Lightning's writer deletes ``metrics.csv`` of a folder that is not empty. A resumed fit
    writes into its own run folder again (:mod:`mmpt.runs`), so this one keeps the rows logged
    before the checkpoint and drops those of steps at or after the first step logged now (steps
    lost with the interruption, which the resumed run logs again).
    """

    def _check_log_dir_exists(self) -> None:
        self._kept: list[dict[str, str]] | None = None
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                reader = csv.DictReader(f)
                self._kept = list(reader)
                self.metrics_keys = sorted(reader.fieldnames or [])

    def save(self) -> None:
        """Write the recorded metrics; the first time, trim the old rows at the new steps."""
        kept = getattr(self, "_kept", None)
        if kept is not None and self.metrics:
            first = min(int(m["step"]) for m in self.metrics)
            rows = [r for r in kept if r.get("step", "") == "" or int(r["step"]) < first]
            self._record_new_keys()

            def write(f: IO[str]) -> None:
                writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(rows)

            atomic_write(self.metrics_file_path, write, binary=False)
            self._kept = None
        super().save()


class CSVLogger(_LightningCSVLogger):
    """Lightning's CSV logger with an optional ``save_dir``, continued by a resumed run.

    ``mmpt fit`` fills a missing ``save_dir`` with ``trainer.default_root_dir`` before it builds
    the logger (:func:`mmpt.run_config.fill_logger_dirs`), so ``--trainer.default_root_dir``
    moves the metrics, the saved ``config.yaml`` and the checkpoints of a ``ModelCheckpoint``
    without ``dirpath`` into ``<default_root_dir>/<name>/version_N/``; each new run gets the next
    free ``version_N``, and ``--ckpt_path last`` continues the run it resumes in its folder
    (:mod:`mmpt.runs`), appending to its ``metrics.csv`` (Lightning's logger would delete it).
    Pending rows are also written with every checkpoint, so a killed run's ``metrics.csv`` holds
    the steps its newest checkpoint has.

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
        """Write the metrics logged so far with each checkpoint (a crash keeps them)."""
        self.save()

    @property
    @rank_zero_experiment
    def experiment(self) -> _ExperimentWriter:
        """The writer (created on first use) that continues an existing ``metrics.csv``."""
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumingWriter(log_dir=self.log_dir)
        return self._experiment

"""Loggers for recipes: their folder follows ``trainer.default_root_dir`` unless set."""

from __future__ import annotations

from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger


class CSVLogger(_LightningCSVLogger):
    """Lightning's CSV logger with an optional ``save_dir``.

    ``mmpt fit`` fills a missing ``save_dir`` with ``trainer.default_root_dir`` before it builds
    the logger (:func:`mmpt.run_config.fill_logger_dirs`), so ``--trainer.default_root_dir``
    moves the metrics, the saved ``config.yaml`` and the checkpoints of a ``ModelCheckpoint``
    without ``dirpath`` into ``<default_root_dir>/<name>/version_N/``; each run gets the next
    free ``version_N``.

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

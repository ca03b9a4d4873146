"""Run-level callbacks: where a finished run put its checkpoint, metrics and plots."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from rich.console import Console
from rich.table import Table

from mmpt.eval.callback import ZeroShotEvalCallback


class RunSummary(L.Callback):
    """Prints where a finished run put its outputs, and its final validation metrics.

    Rank 0 only: checkpoint, metrics.csv, resolved config, evaluation reports and plots.
    """

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Print the table."""
        if not trainer.is_global_zero:
            return
        rows: list[tuple[str, str]] = []
        ckpt = trainer.checkpoint_callback
        if ckpt is not None:
            path = getattr(ckpt, "last_model_path", "") or getattr(ckpt, "best_model_path", "")
            if path:
                rows.append(("checkpoint", path))
        if trainer.logger is not None and trainer.logger.log_dir:
            metrics = Path(trainer.logger.log_dir) / "metrics.csv"
            rows.append(("metrics", str(metrics) if metrics.exists() else trainer.logger.log_dir))
            config = Path(trainer.logger.log_dir) / "config.yaml"
            if config.exists():
                rows.append(("config", str(config)))
        for cb in trainer.callbacks:
            if isinstance(cb, ZeroShotEvalCallback):
                rows.extend((f"eval {k}", str(v)) for k, v in cb.last_report.items())
        for name, value in sorted(trainer.callback_metrics.items()):
            if name.startswith("val/"):
                rows.append((name, f"{float(value):.4f}"))
        table = Table(title="mmpt run outputs", show_header=False)
        for k, v in rows:
            table.add_row(k, v)
        Console().print(table)

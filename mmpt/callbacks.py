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
        """Print the output paths (plain lines, easy to copy) and a table of metrics."""
        if not trainer.is_global_zero:
            return
        paths: list[tuple[str, str]] = []
        ckpt = trainer.checkpoint_callback
        if ckpt is not None:
            path = getattr(ckpt, "last_model_path", "") or getattr(ckpt, "best_model_path", "")
            if path:
                paths.append(("checkpoint", path))
        if trainer.logger is not None and trainer.logger.log_dir:
            log_dir = Path(trainer.logger.log_dir)
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

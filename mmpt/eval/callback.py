"""Zero-shot retrieval/classification on the validation set at every validation, during fit."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist

from mmpt.eval.embed import EmbeddingAccumulator, Embeddings, EvalResult, evaluate
from mmpt.eval.report import plot_confusion_matrix, plot_recall_curves, write_json

log = logging.getLogger("mmpt.eval")


class ZeroShotEvalCallback(L.Callback):
    """Collects validation embeddings, computes zero-shot metrics and logs them.

    The model's ``validation_step`` returns ``image_emb``, ``text_emb``, ``text_to_image``
    and ``labels``; class names and prompt templates come from the validation shards'
    ``index.json`` (``meta.zeroshot``). Under DDP every rank's embeddings are gathered first,
    so the metrics are over the whole validation set. After each validation a JSON report and
    PNG plots are written to ``<log_dir>/eval/``.

    Args:
        retrieval: Compute retrieval recall@k and ranks.
        classification: Compute zero-shot classification when labels and class names exist.
        ks: Recall cut-offs.
        write_reports: Write JSON + PNG after each validation (rank 0).
    """

    def __init__(
        self,
        retrieval: bool = True,
        classification: bool = True,
        ks: list[int] | None = None,
        write_reports: bool = True,
    ) -> None:
        self.retrieval, self.classification = retrieval, classification
        self.ks = tuple(ks or (1, 5, 10))
        self.write_reports = write_reports
        self._acc = EmbeddingAccumulator()
        self.last_report: dict[str, Path] = {}

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start a fresh accumulator."""
        self._acc = EmbeddingAccumulator()

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any, **kw: Any
    ) -> None:
        """Keep the batch's embeddings."""
        if isinstance(outputs, dict) and "image_emb" in outputs:
            self._acc.add(outputs)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Gather over ranks, compute, log and write the reports."""
        if not trainer.sanity_checking:
            self._finish(trainer, pl_module, "val")

    on_test_epoch_start = on_validation_epoch_start
    on_test_batch_end = on_validation_batch_end

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """As for validation, logged under ``test/``."""
        self._finish(trainer, pl_module, "test")

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if len(self._acc) == 0:
            return
        emb = gather_embeddings(self._acc.result())
        meta = getattr(trainer.datamodule, "val_meta", {}) if trainer.datamodule else {}
        zeroshot = meta.get("zeroshot") if self.classification else None
        tokenizer = pl_module.preprocess.tokenizer

        def encode_text(prompts: list[str]) -> torch.Tensor:
            return pl_module.encode_text(tokenizer(prompts).to(pl_module.device)).float().cpu()

        with torch.no_grad():
            result = evaluate(emb, encode_text, zeroshot, retrieval=self.retrieval, ks=self.ks)
        for name, value in result.metrics.items():
            pl_module.log(f"{stage}/{name}", value, rank_zero_only=True)
        if self.write_reports and trainer.is_global_zero:
            self.last_report = write_reports(
                result,
                Path(trainer.log_dir or trainer.default_root_dir) / "eval",
                f"{stage}_step{trainer.global_step}",
                num_images=emb.image.shape[0],
                num_texts=emb.text.shape[0],
                step=trainer.global_step,
            )


def write_reports(result: EvalResult, out_dir: Path, name: str, **context: Any) -> dict[str, Path]:
    """JSON report plus recall-curve (and confusion-matrix) PNGs; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": write_json(out_dir / f"{name}.json", result.metrics, **context)}
    if result.t2i_ranks is not None:
        paths["recall_plot"] = plot_recall_curves(
            result.t2i_ranks, result.i2t_ranks, out_dir / f"{name}_recall.png", title=name
        )
    if result.confusion is not None:
        paths["confusion_plot"] = plot_confusion_matrix(
            result.confusion, result.classnames, out_dir / f"{name}_confusion.png"
        )
    return paths


def gather_embeddings(emb: Embeddings) -> Embeddings:
    """Concatenate every rank's embeddings (ranks may hold different counts)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return emb
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, emb)
    offset, t2i = 0, []
    for p in parts:
        t2i.append(p.text_to_image + offset)
        offset += p.image.shape[0]
    return Embeddings(
        torch.cat([p.image for p in parts]),
        torch.cat([p.text for p in parts]),
        torch.cat(t2i),
        torch.cat([p.labels for p in parts]),
    )

"""Zero-shot retrieval/classification on each validation set at every validation, during fit."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist

from mmpt.eval.embed import EmbeddingAccumulator, Embeddings, EvalResult, evaluate
from mmpt.eval.forgetting import PLOT_METRICS, ForgettingHistory, eval_prefix, val_set_names
from mmpt.eval.modality import item_counts, media_of
from mmpt.eval.probe import knn_top1_loo
from mmpt.eval.report import plot_confusion_matrix, plot_recall_curves, write_json

log = logging.getLogger("mmpt.eval")


class ZeroShotEvalCallback(L.Callback):
    """Collects validation embeddings, computes zero-shot metrics and logs them, per set.

    The model's ``validation_step`` returns ``image_emb``, ``text_emb``, ``text_to_image``
    and ``labels``; class names and prompt templates come from each validation set's
    ``index.json`` (``meta.zeroshot``, the datamodule's ``val_metas``). Under DDP every rank's
    embeddings are gathered first, so the metrics are over the whole set. After each validation
    a JSON report and PNG plots are written to ``<log_dir>/eval/`` (one validation set) or
    ``<log_dir>/eval/<set>/`` (several, ``data.eval_sets``), whose metrics are logged as
    ``val/<set>/...``.

    With ``knn`` each set whose labels (>= 0) span at least two classes also gets
    ``knn/top1``: leave-one-out cosine kNN top-1 on the image (item) embeddings, a frozen-feature
    probe that needs no text. A model without text (e.g. MAE) may return only ``image_emb`` (or
    ``features``) and ``labels``: such a set gets the kNN metric only.

    Every validation metric of every set (the model's losses too) is kept with the global
    step; at the end of fit ``<log_dir>/eval/forgetting.json`` (history, and per set and metric
    the drop from its best value to its last) and ``forgetting.png`` are written (rank 0), by
    default only when there are several validation sets.

    Args:
        retrieval: Compute retrieval recall@k and ranks.
        classification: Compute zero-shot classification when labels and class names exist.
        ks: Recall cut-offs.
        write_reports: Write JSON + PNG after each validation (rank 0).
        track_forgetting: Keep the metric history and write the forgetting report: None (the
            default) with several validation sets only, True always, False never.
        plot_metrics: Metrics drawn in ``forgetting.png`` (default
            :data:`~mmpt.eval.forgetting.PLOT_METRICS`), those logged by the run.
        knn: Log the leave-one-out kNN probe ``knn/top1`` of labelled sets.
        knn_k: Neighbours of the kNN probe.
    """

    def __init__(
        self,
        retrieval: bool = True,
        classification: bool = True,
        ks: list[int] | None = None,
        write_reports: bool = True,
        track_forgetting: bool | None = None,
        plot_metrics: list[str] | None = None,
        knn: bool = True,
        knn_k: int = 5,
    ) -> None:
        self.retrieval, self.classification = retrieval, classification
        self.ks = tuple(ks or (1, 5, 10))
        self.write_reports = write_reports
        self.track_forgetting = track_forgetting
        self.plot_metrics = tuple(plot_metrics or PLOT_METRICS)
        self.knn, self.knn_k = knn, knn_k
        self._accs: dict[int, EmbeddingAccumulator] = {}
        self.history = ForgettingHistory()
        self.last_report: dict[str, Path] = {}

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start fresh accumulators (one per dataloader)."""
        self._accs = {}

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Keep the batch's embeddings, in its dataloader's accumulator."""
        outputs = embedding_outputs(outputs)
        if outputs is not None:
            self._accs.setdefault(dataloader_idx, EmbeddingAccumulator()).add(outputs)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Gather over ranks, compute, log and write the reports, per set."""
        if not trainer.sanity_checking:
            self._finish(trainer, pl_module, "val")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Record this validation's metrics (losses included: aggregated by now) per set."""
        names = val_set_names(trainer)
        track = len(names) > 1 if self.track_forgetting is None else self.track_forgetting
        if track and not trainer.sanity_checking and trainer.is_global_zero:
            self.history.record(trainer.global_step, dict(trainer.callback_metrics), names)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write ``forgetting.json`` and ``forgetting.png`` (rank 0, after any validation)."""
        out_dir = self._out_dir(trainer)  # log_dir: every rank must call it
        if trainer.is_global_zero and len(self.history):
            self.last_report |= self.history.write(out_dir, self.plot_metrics)

    on_test_epoch_start = on_validation_epoch_start
    on_test_batch_end = on_validation_batch_end

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """As for validation, logged under ``test/``."""
        self._finish(trainer, pl_module, "test")

    @staticmethod
    def _out_dir(trainer: L.Trainer) -> Path:
        return Path(trainer.log_dir or trainer.default_root_dir) / "eval"

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Evaluate every set in dataloader order (the same order and count on every rank)."""
        num_sets = len(trainer.num_val_batches if stage == "val" else trainer.num_test_batches)
        dm = trainer.datamodule
        metas = list(getattr(dm, "val_metas", []) or []) if stage == "val" else []
        if not metas:  # one set (or no per-set metas): the datamodule's val_meta, as before
            metas = [getattr(dm, "val_meta", {}) if dm is not None else {}]
        names = val_set_names(trainer) if stage == "val" else [stage]
        out_dir = self._out_dir(trainer)  # log_dir: every rank must call it
        for idx in range(max(num_sets, 1)):
            acc = self._accs.get(idx, EmbeddingAccumulator())
            emb = gather_optional(acc.result() if len(acc) else None)
            if emb is None:
                continue
            meta = metas[idx] if idx < len(metas) else {}
            prefix = eval_prefix(trainer, stage, idx)
            several = prefix != stage
            result = self._evaluate(pl_module, emb, meta)
            if self.knn:
                top1 = knn_top1_loo(emb.image, emb.labels, self.knn_k)
                if math.isfinite(top1):
                    result.metrics["knn/top1"] = top1
            for name, value in result.metrics.items():
                pl_module.log(
                    f"{prefix}/{name}", value, rank_zero_only=True, add_dataloader_idx=False
                )
            if self.write_reports and trainer.is_global_zero:
                self.last_report = write_reports(
                    result,
                    out_dir / names[idx] if several else out_dir,
                    f"{stage}_step{trainer.global_step}",
                    **item_counts(result.media, emb.image.shape[0], emb.text.shape[0]),
                    step=trainer.global_step,
                    **({"set": names[idx]} if several else {}),
                )

    def _evaluate(self, pl_module: L.LightningModule, emb: Embeddings, meta: dict) -> EvalResult:
        """Retrieval and zero-shot classification of one set's gathered embeddings."""
        if emb.text.shape[0] == 0 and emb.text_to_image.shape[0] == 0:  # no text: kNN only
            return EvalResult(metrics={})
        zeroshot = meta.get("zeroshot") if self.classification else None
        tokenizer = pl_module.preprocess.tokenizer

        def encode_text(prompts: list[str]) -> torch.Tensor:
            return pl_module.encode_text(tokenizer(prompts).to(pl_module.device)).float().cpu()

        with torch.no_grad():
            return evaluate(
                emb,
                encode_text,
                zeroshot,
                retrieval=self.retrieval,
                ks=self.ks,
                media=media_of(pl_module),
            )


def embedding_outputs(outputs: Any) -> dict[str, torch.Tensor] | None:
    """A validation step's outputs as :class:`EmbeddingAccumulator` input, or None.

    Image-text outputs (``image_emb``, ``text_emb``, ``text_to_image``, ``labels``) pass as
    they are. Outputs without ``text_emb`` need ``image_emb`` (or ``features``) (B, D) and
    ``labels`` (B,): they get an empty (0, D) text set, so only the kNN probe applies.
    """
    if not isinstance(outputs, dict):
        return None
    image = outputs.get("image_emb", outputs.get("features"))
    if image is None:
        return None
    if "text_emb" in outputs:
        return {**outputs, "image_emb": image}
    if "labels" not in outputs:
        return None
    return {
        "image_emb": image,
        "text_emb": image.new_zeros(0, image.shape[-1]),
        "text_to_image": torch.zeros(0, dtype=torch.long, device=image.device),
        "labels": outputs["labels"],
    }


def write_reports(result: EvalResult, out_dir: Path, name: str, **context: Any) -> dict[str, Path]:
    """JSON report plus recall-curve (and confusion-matrix) PNGs; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": write_json(out_dir / f"{name}.json", result.metrics, **context)}
    if result.t2i_ranks is not None:
        paths["recall_plot"] = plot_recall_curves(
            result.t2i_ranks,
            result.i2t_ranks,
            out_dir / f"{name}_recall.png",
            title=name,
            media=result.media,
        )
    if result.confusion is not None:
        paths["confusion_plot"] = plot_confusion_matrix(
            result.confusion, result.classnames, out_dir / f"{name}_confusion.png"
        )
    return paths


def gather_optional(emb: Embeddings | None) -> Embeddings | None:
    """Concatenate every rank's embeddings; a rank with none passes None (collective).

    Returns:
        The whole set (captions re-indexed onto the concatenated images), or None when no
        rank had any.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return emb
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, emb)
    parts = [p for p in gathered if p is not None]
    if not parts:
        return None
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


def gather_embeddings(emb: Embeddings) -> Embeddings:
    """Concatenate every rank's embeddings (ranks may hold different counts)."""
    out = gather_optional(emb)
    assert out is not None  # this rank gave some
    return out

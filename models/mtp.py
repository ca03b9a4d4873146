"""Multi-task pretraining (MTP, Wang et al. 2024): one backbone, dense task heads, one step.

A shared image tower feeds a ViTDet simple feature pyramid; a UPerNet head (semantic
segmentation), Mask R-CNN heads (instance segmentation) and an oriented-box head (rotated
detection) each take the pyramid. A mixed batch (per-task shard sources mixed by weight, see
:mod:`mmpt.datamodules.dense`) gives each task's loss on the samples holding its annotation;
their weighted sum makes one backward pass and one optimizer step, so every task's gradient
reaches the backbone at every step. The same class with one head fine-tunes a single task from
an MTP checkpoint (``init_from``).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from mmpt.batch import DenseBatch
from mmpt.eval.dense_metrics import DenseEvaluator
from mmpt.models.adapters import AdapterSpec
from mmpt.models.dense.instance import MaskRCNNHead
from mmpt.models.dense.pyramid import pyramid_features, tower_pyramid
from mmpt.models.dense.rotated import RotatedFCOSHead
from mmpt.models.dense.semseg import UPerNetHead
from mmpt.models.module import MMPTModule
from mmpt.models.schedules import Schedule
from mmpt.preprocess import Preprocess

TASKS = ("semseg", "instance", "rotated")


def _rows(features: list[torch.Tensor], idx: torch.Tensor) -> list[torch.Tensor]:
    return [f[idx] for f in features]


class MultiTaskModule(MMPTModule):
    """Shared backbone + any of the three dense heads, trained together.

    Args:
        vision: Image tower with patch tokens (``TimmVisionTower`` of a ViT, ...); use
            ``embed_dim: 0`` and ``feature_layer: -1``.
        semseg: UPerNet head, or None.
        instance: Mask R-CNN head, or None.
        rotated: Oriented-box head, or None.
        pyramid_channels: Channels of every pyramid level (each head's ``in_channels``).
        strides: Pyramid strides in pixels, finest first.
        loss_weights: Weight of each task's loss (``semseg``, ``instance``, ``rotated``;
            default 1: MTP sums the losses unweighted); weights of tasks without a head are
            unused (a single-task overlay of a multi-task recipe keeps them).
        optimizer, lr_schedule, freeze, trainable, init_from, init_from_strict, adapters:
            See :class:`~mmpt.models.module.MMPTModule`.

    Raises:
        ValueError: No head, a head whose ``in_channels`` is not ``pyramid_channels``, or a
            loss weight for an unknown task.
    """

    def __init__(
        self,
        vision: nn.Module,
        semseg: UPerNetHead | None = None,
        instance: MaskRCNNHead | None = None,
        rotated: RotatedFCOSHead | None = None,
        pyramid_channels: int = 256,
        strides: list[int] | None = None,
        loss_weights: dict[str, float] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: Schedule | None = None,
        freeze: list[str] | None = None,
        trainable: list[str] | None = None,
        init_from: str | list[str] | None = None,
        init_from_strict: bool = True,
        adapters: list[AdapterSpec] | None = None,
    ) -> None:
        super().__init__(
            optimizer, lr_schedule, freeze, trainable, init_from, init_from_strict, adapters
        )
        heads = {"semseg": semseg, "instance": instance, "rotated": rotated}
        self.tasks = [t for t, h in heads.items() if h is not None]
        if not self.tasks:
            raise ValueError("MultiTaskModule needs at least one of semseg, instance, rotated")
        for task in self.tasks:
            if heads[task].in_channels != pyramid_channels:
                raise ValueError(
                    f"model.{task}.in_channels={heads[task].in_channels} but the pyramid gives "
                    f"{pyramid_channels} channels (model.pyramid_channels): set them equal"
                )
        weights = dict(loss_weights or {})
        if unknown := sorted(set(weights) - set(TASKS)):
            raise ValueError(f"model.loss_weights: unknown tasks {unknown}; known: {TASKS}")
        self.loss_weights = {t: float(weights.get(t, 1.0)) for t in self.tasks}
        self.vision = vision
        self.pyramid = tower_pyramid(vision, pyramid_channels, strides or [4, 8, 16, 32])
        self.semseg, self.instance, self.rotated = semseg, instance, rotated
        self._evaluator: DenseEvaluator | None = None

    @property
    def preprocess(self) -> Preprocess:
        """Image preprocessing of the tower (no text)."""
        return Preprocess(image=self.vision.image_preprocess, tokenizer=None)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Pyramid maps (B, C, H / s, W / s) of (B, 3, H, W) normalised images."""
        return pyramid_features(self.vision, self.pyramid, images)

    def task_losses(self, batch: DenseBatch) -> dict[str, torch.Tensor]:
        """Each task's loss and its parts, on the samples that hold the task's annotation.

        A task without samples in the batch gives a zero loss.

        Returns:
            ``{task: loss}`` plus ``{task/part: value}`` for the heads' loss parts.
        """
        feats = self.features(batch.images)
        size = tuple(batch.images.shape[-2:])
        out: dict[str, torch.Tensor] = {}
        parts: dict[str, torch.Tensor] = {}
        if self.semseg is not None:
            idx = batch.has_mask.nonzero()[:, 0]
            if idx.numel():
                logits = self.semseg(_rows(feats, idx), size)
                out["semseg"] = self.semseg.loss(logits, batch.masks[idx])
        if self.instance is not None:
            sel = [i for i, t in enumerate(batch.instances) if t is not None]
            if sel:
                idx = torch.tensor(sel, device=batch.images.device)
                targets = [batch.instances[i] for i in sel]
                losses = self.instance(_rows(feats, idx), size, targets)
                parts |= {f"instance/{k}": v for k, v in losses.items()}
                out["instance"] = sum(losses.values())
        if self.rotated is not None:
            sel = [i for i, t in enumerate(batch.obbs) if t is not None]
            if sel:
                idx = torch.tensor(sel, device=batch.images.device)
                losses = self.rotated.loss(
                    self.rotated(_rows(feats, idx)), [batch.obbs[i] for i in sel]
                )
                parts |= {f"rotated/{k}": v for k, v in losses.items()}
                out["rotated"] = sum(losses.values())
        for task in self.tasks:  # absent from this batch: no loss (logged as 0)
            out.setdefault(task, batch.images.new_zeros(()))
        return out | parts

    def training_step(self, batch: DenseBatch, batch_idx: int = 0) -> torch.Tensor:
        """Weighted sum of the task losses (one backward, one optimizer step)."""
        losses = self.task_losses(batch)
        total = sum(self.loss_weights[t] * losses[t] for t in self.tasks)
        # every trainable parameter gets a gradient each step (zero for a head without samples
        # in this batch, or tower weights after the feature layer), as DDP expects
        total = total + 0.0 * sum(p.sum() for p in self.parameters() if p.requires_grad)
        b = len(batch)
        self.log("train/loss", total, prog_bar=True, batch_size=b)
        for name, value in losses.items():
            self.log(f"train/{name}", value, batch_size=b)
        if hasattr(batch, "skipped"):
            self.log_data_counts(batch, ("skipped",), b)
        return total

    @torch.no_grad()
    def predict_dense(self, images: torch.Tensor) -> dict[str, Any]:
        """Every head's predictions for (B, 3, H, W) normalised images (eval mode).

        Returns:
            ``semseg`` (B, H, W) class maps; ``instance`` per image ``boxes`` (N, 4),
            ``labels``, ``scores``, ``masks`` (N, H, W) probabilities; ``rotated`` per image
            ``boxes`` (N, 5), ``labels``, ``scores``. Only the tasks with a head.
        """
        feats = self.features(images)
        size = tuple(images.shape[-2:])
        out: dict[str, Any] = {}
        if self.semseg is not None:
            out["semseg"] = self.semseg(feats, size).argmax(1)
        if self.instance is not None:
            out["instance"] = self.instance(feats, size)
        if self.rotated is not None:
            out["rotated"] = self.rotated.predict(self.rotated(feats))
        return out

    def evaluator(self) -> DenseEvaluator:
        """A :class:`~mmpt.eval.dense_metrics.DenseEvaluator` for this model's heads."""
        return DenseEvaluator(
            self.semseg.num_classes if self.semseg is not None else 0,
            self.instance.num_classes if self.instance is not None else 0,
            self.rotated.num_classes if self.rotated is not None else 0,
        )

    def on_validation_epoch_start(self) -> None:
        """Start accumulating this epoch's predictions."""
        self._evaluator = self.evaluator()

    def validation_step(self, batch: DenseBatch, batch_idx: int = 0) -> None:
        """Accumulate predictions for the epoch's mIoU, mask AP and rotated mAP."""
        if self._evaluator is None:
            self._evaluator = self.evaluator()
        self._evaluator.update(batch, self.predict_dense(batch.images))

    def on_validation_epoch_end(self) -> None:
        """Log ``val/miou``, ``val/mask_ap``, ``val/mask_ap50``, ``val/rotated_map`` (per rank)."""
        if self._evaluator is None:
            return
        metrics = self._evaluator.compute()
        for name in ("miou", "acc", "mask_ap", "mask_ap50", "rotated_map"):
            if name in metrics:
                self.log(f"val/{name}", float(metrics[name]), prog_bar=name == "miou")
        self._evaluator = None


__all__ = ["MultiTaskModule", "TASKS"]

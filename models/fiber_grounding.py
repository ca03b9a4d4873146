"""FIBER fine-grained stage: phrase grounding with a box head on the fused image features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from mmpt.batch import GroundingBatch
from mmpt.eval.grounding import centre_boxes, grounding_metrics
from mmpt.models.adapters import AdapterSpec
from mmpt.models.backbone_fusion import BackboneFusion
from mmpt.models.encoders.hf_text import HFTextTower
from mmpt.models.fusion_towers import vision_stack
from mmpt.models.losses.grounding import GroundingLoss, alignment_probs
from mmpt.models.module import MMPTModule
from mmpt.models.schedules import Schedule
from mmpt.preprocess import Preprocess

#: Boxes kept per phrase for R@k at evaluation.
TOP_BOXES = 5


class FiberGroundingModule(MMPTModule):
    """FIBER (Dou et al. 2022), fine-grained stage: boxes for the phrases of a caption.

    The image and text towers run fused (:class:`~mmpt.models.backbone_fusion.BackboneFusion`;
    parameter names as :class:`~mmpt.models.fiber.FiberModule`, so ``init_from`` a coarse-stage
    checkpoint loads towers and fusion). Every patch token of the final fused image grid is a
    box query (a DETR-style prediction anchored at its patch):

    - box: ``MLP(token) -> (dx, dy, w, h)``, centre ``sigmoid(dx + logit(patch centre))``, size
      ``sigmoid(w), sigmoid(h)``;
    - token alignment: ``<norm(P_v token), norm(P_t word)> / align_temperature`` over the
      caption's tokens (padding masked) plus a no-object logit.

    Predictions are matched to the phrases' boxes by the Hungarian algorithm (scipy) and
    trained with L1 + GIoU + soft-token alignment (:class:`~mmpt.models.losses.grounding.
    GroundingLoss`). A phrase's boxes at inference are the queries ranked by the alignment
    probability mass on the phrase's tokens. Validation logs ``val/grounding/R@1``, ``R@5``,
    ``accuracy`` (referent phrase, IoU >= 0.5) and the centre-box baseline's (``centre_...``).

    Args:
        vision: :class:`~mmpt.models.encoders.TimmVisionTower` (ViT or Swin).
        text: BERT/RoBERTa :class:`~mmpt.models.encoders.HFTextTower`.
        loss: The grounding loss (weights of L1, GIoU, alignment and no-object).
        optimizer: See :class:`~mmpt.models.module.MMPTModule`.
        lr_schedule: See :class:`~mmpt.models.module.MMPTModule`.
        freeze: Patterns to freeze.
        trainable: Patterns that alone train.
        init_from: Checkpoint to initialise from (the coarse stage's).
        fusion_layers: K, fused top layers of each tower.
        fusion_ff_mult: Feed-forward multiple of the fusion blocks.
        align_dim: Width of the alignment projections.
        align_temperature: Temperature of the alignment logits.
        init_from_strict: Refuse a checkpoint of which too little loads.
        adapters: peft LoRA/DoRA/(IA)^3 adapters by module pattern (see :class:`MMPTModule`).

    """

    def __init__(
        self,
        vision: nn.Module,
        text: HFTextTower,
        loss: GroundingLoss | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: Schedule | None = None,
        freeze: list[str] | None = None,
        trainable: list[str] | None = None,
        init_from: str | list[str] | None = None,
        fusion_layers: int = 6,
        fusion_ff_mult: int = 4,
        align_dim: int = 64,
        align_temperature: float = 0.07,
        init_from_strict: bool = True,
        adapters: list[AdapterSpec] | None = None,
    ) -> None:
        super().__init__(
            optimizer, lr_schedule, freeze, trainable, init_from, init_from_strict, adapters
        )
        self.vision, self.text = vision, text
        self.loss = loss if loss is not None else GroundingLoss()
        self.fusion = BackboneFusion(vision, text, fusion_layers, fusion_ff_mult)
        stack = vision_stack(vision)
        dv, dt = stack.width(stack.depth - 1), int(text.model.config.hidden_size)
        self.box_head = nn.Sequential(nn.Linear(dv, dv), nn.GELU(), nn.Linear(dv, 4))
        self.vision_align = nn.Linear(dv, align_dim)
        self.text_align = nn.Linear(dt, align_dim)
        self.no_object = nn.Linear(dv, 1)
        self.align_temperature = align_temperature
        self._eval: list[dict[str, torch.Tensor]] = []

    @property
    def preprocess(self) -> Preprocess:
        """The image tower's preprocessing and the text tower's tokenizer."""
        return Preprocess(image=self.vision.image_preprocess, tokenizer=self.text.tokenizer)

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes and alignment logits of every query.

        Args:
            images: (B, C, H, W) normalised pixels.
            tokens: (B, L) caption ids.

        Returns:
            (B, Q, 4) normalised xyxy boxes and (B, Q, L + 1) alignment logits (padding at
            -inf, the last column no-object), Q = the final grid's h * w.

        """
        state = self.fusion.vision_bottom(self.vision, images)
        stream = self.fusion.text_bottom(self.text, tokens)
        final, hidden = self.fusion.top(self.vision, self.text, state, stream, fuse=True)
        grid = vision_stack(self.vision).grid(final)  # (B, h, w, D_v)
        b, h, w, _ = grid.shape
        queries = grid.flatten(1, 2)
        ys, xs = torch.meshgrid(
            (torch.arange(h, device=grid.device) + 0.5) / h,
            (torch.arange(w, device=grid.device) + 0.5) / w,
            indexing="ij",
        )
        anchors = torch.logit(torch.stack([xs, ys], -1).flatten(0, 1))  # (Q, 2)
        raw = self.box_head(queries).float()
        centre = torch.sigmoid(raw[..., :2] + anchors)
        size = torch.sigmoid(raw[..., 2:])
        boxes = torch.cat([centre - size / 2, centre + size / 2], -1).clamp(0, 1)
        q = F.normalize(self.vision_align(queries), dim=-1)
        t = F.normalize(self.text_align(hidden), dim=-1)
        logits = (q @ t.transpose(1, 2)).float() / self.align_temperature  # (B, Q, L)
        logits = logits.masked_fill(~stream.mask[:, None, :], float("-inf"))
        return boxes, torch.cat([logits, self.no_object(queries).float()], -1)

    def training_step(self, batch: GroundingBatch, batch_idx: int) -> torch.Tensor:
        """Matching + L1 + GIoU + token alignment; logs each term."""
        boxes, logits = self(batch.images, batch.text_tokens)
        terms = self.loss(boxes, logits, batch.boxes, batch.box_mask, batch.box_tokens())
        bs = len(batch)
        self.log("train/loss", terms["loss"], prog_bar=True, batch_size=bs)
        for name in ("l1", "giou", "align"):
            self.log(f"train/{name}", terms[name], batch_size=bs)
        self.log_data_counts(batch, ("skipped",), bs)
        return terms["loss"]

    @torch.no_grad()
    def ground(
        self, boxes: torch.Tensor, logits: torch.Tensor, phrase_tokens: torch.Tensor, k: int
    ) -> torch.Tensor:
        """Top-``k`` boxes per phrase: (B, Q, 4), (B, Q, L + 1), (B, P, L) -> (B, P, k, 4).

        A query's score for a phrase is its alignment probability mass on the phrase's tokens.
        """
        scores = alignment_probs(logits)[..., :-1] @ phrase_tokens.float().transpose(1, 2)
        top = scores.topk(min(k, scores.shape[1]), dim=1).indices.transpose(1, 2)  # (B, P, k)
        per_phrase = boxes[:, None].expand(-1, top.shape[1], -1, -1)  # (B, P, Q, 4)
        return torch.gather(per_phrase, 2, top[..., None].expand(-1, -1, -1, 4))

    def _eval_step(self, batch: GroundingBatch, stage: str) -> None:
        boxes, logits = self(batch.images, batch.text_tokens)
        terms = self.loss(boxes, logits, batch.boxes, batch.box_mask, batch.box_tokens())
        self.log(f"{stage}/loss", terms["loss"], batch_size=len(batch))
        ranked = self.ground(boxes, logits, batch.phrase_tokens, TOP_BOXES)  # (B, P, k, 4)
        real = batch.phrase_mask
        targets = batch.boxes[:, None].expand(-1, real.shape[1], -1, -1)  # (B, P, G, 4)
        first = torch.zeros_like(real)
        first[:, 0] = True
        self._eval.append(
            {
                "ranked": ranked[real].cpu(),
                "targets": targets[real].cpu(),
                "target_mask": batch.phrase_boxes[real].cpu(),
                "referent": first[real].cpu(),
            }
        )

    def grounding_metrics(self) -> dict[str, float]:
        """R@1/5 and accuracy of the model and of the centre box over the phrases seen."""
        if not self._eval:
            return {}
        cat = {k: _pad_cat([p[k] for p in self._eval]) for k in self._eval[0]}
        out = grounding_metrics(cat["ranked"], cat["targets"], cat["target_mask"], cat["referent"])
        centre = centre_boxes(cat["targets"], cat["target_mask"])
        base = grounding_metrics(
            centre, cat["targets"], cat["target_mask"], cat["referent"], ks=(1,)
        )
        return out | {f"centre_{k}": v for k, v in base.items()}

    def _log_grounding(self, stage: str) -> None:
        for name, value in self.grounding_metrics().items():
            self.log(f"{stage}/grounding/{name}", value)
        self._eval = []

    def validation_step(self, batch: GroundingBatch, batch_idx: int) -> None:
        """Loss and grounding predictions of one batch (metrics at the epoch end)."""
        self._eval_step(batch, "val")

    def test_step(self, batch: GroundingBatch, batch_idx: int) -> None:
        """As :meth:`validation_step`, under ``test/``."""
        self._eval_step(batch, "test")

    def on_validation_epoch_start(self) -> None:
        """Start a fresh evaluation set."""
        self._eval = []

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_epoch_end(self) -> None:
        """Log the grounding metrics (not during the sanity check)."""
        if self.trainer.sanity_checking:
            self._eval = []
            return
        self._log_grounding("val")

    def on_test_epoch_end(self) -> None:
        """As for validation, under ``test/``."""
        self._log_grounding("test")


def _pad_cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate (N_i, G_i, ...) tensors along dim 0, zero-padding dim 1 to the largest G."""
    if parts[0].ndim == 1:
        return torch.cat(parts)
    width = max(p.shape[1] for p in parts)
    pads = [(0, 0) * (p.ndim - 2) + (0, width - p.shape[1]) for p in parts]
    return torch.cat([F.pad(p, pad) for p, pad in zip(parts, pads, strict=True)])

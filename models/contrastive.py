"""CLIP-style dual-encoder pretraining (InfoNCE or SigLIP) of an image tower and a text tower."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from mmpt.batch import ImageTextBatch
from mmpt.models.losses import ClipLoss
from mmpt.models.module import MMPTModule
from mmpt.models.schedules import Schedule
from mmpt.preprocess import Preprocess


def first_text_per_item(text_to_video: torch.Tensor, num_items: int) -> torch.Tensor:
    """Index of the first caption of every image or clip.

    Args:
        text_to_video: Long tensor (M,), the item of each caption.
        num_items: Number of items N; each needs at least one caption.

    Returns:
        Long tensor (N,), indices into the M captions.

    Raises:
        ValueError: An item has no caption.
    """
    m = text_to_video.shape[0]
    idx = torch.arange(m, device=text_to_video.device)
    first = torch.full((num_items,), m, dtype=torch.long, device=text_to_video.device)
    first.scatter_reduce_(0, text_to_video.long(), idx, "amin")
    if bool((first == m).any()):
        raise ValueError("every image or clip of a batch needs at least one caption")
    return first


class ContrastiveModule(MMPTModule):
    """A vision tower and a text tower trained to agree on matching pairs.

    Args:
        vision: Image tower: ``(B, C, H, W) -> (B, D)``, with ``image_preprocess``.
        text: Text tower: ``(B, L) -> (B, D)``, with ``tokenizer``.
        loss: ``ClipLoss`` (default) or ``SigLipLoss``; owns the logit scale (and bias).
        optimizer: See :class:`~mmpt.models.module.MMPTModule`.
        lr_schedule: See :class:`~mmpt.models.module.MMPTModule`.
        freeze: Patterns to freeze, e.g. ``["vision.*"]`` for LiT (locked image tuning).
        trainable: Patterns that alone train.
        init_from: Checkpoint to initialise from.
    """

    def __init__(
        self,
        vision: nn.Module,
        text: nn.Module,
        loss: nn.Module | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: Schedule | None = None,
        freeze: list[str] | None = None,
        trainable: list[str] | None = None,
        init_from: str | None = None,
    ) -> None:
        super().__init__(optimizer, lr_schedule, freeze, trainable, init_from)
        self.vision, self.text = vision, text
        self.loss = loss if loss is not None else ClipLoss()
        if vision.output_dim != text.output_dim:
            raise ValueError(
                f"vision tower embeds to {vision.output_dim} but text tower to "
                f"{text.output_dim}: set the same embed_dim on both"
            )

    @property
    def preprocess(self) -> Preprocess:
        """Image preprocessing of the vision tower and the text tower's tokenizer."""
        return Preprocess(image=self.vision.image_preprocess, tokenizer=self.text.tokenizer)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings: (B, C, H, W) -> (B, D)."""
        return F.normalize(self.vision(images), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings: (M, L) -> (M, D)."""
        return F.normalize(self.text(tokens), dim=-1)

    def forward(self, batch: ImageTextBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of the batch's images (B, D) and captions (M, D)."""
        return self.encode_image(batch.images), self.encode_text(batch.text_tokens)

    def _pair_loss(
        self, img: torch.Tensor, txt: torch.Tensor, batch: ImageTextBatch, gather: bool = True
    ) -> torch.Tensor:
        if txt.shape[0] != img.shape[0]:  # several captions per item: use each one's first
            txt = txt[first_text_per_item(batch.text_to_image, img.shape[0])]
        return self.loss(img, txt, gather=gather)

    def training_step(self, batch: ImageTextBatch, batch_idx: int) -> torch.Tensor:
        """Contrastive loss on one batch; logs loss, logit scale and skipped samples."""
        img, txt = self(batch)
        loss = self._pair_loss(img, txt, batch)
        bs = len(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/logit_scale", self.loss.scale, batch_size=bs)
        self.log_data_counts(batch, ("skipped",), bs)  # samples dropped as corrupt
        return loss

    def on_train_batch_end(self, *args, **kwargs) -> None:
        """Clamp the logit scale after every optimizer step (CLIP: at most ln 100)."""
        self.loss.clamp_()

    def validation_step(self, batch: ImageTextBatch, batch_idx: int) -> dict[str, torch.Tensor]:
        """Rank-local validation loss; returns embeddings for the zero-shot callback.

        No collective here: ranks may hold different validation batch sizes and counts.
        """
        return self._eval_step(batch, "val")

    def test_step(self, batch: ImageTextBatch, batch_idx: int) -> dict[str, torch.Tensor]:
        """As :meth:`validation_step`, logged under ``test/``."""
        return self._eval_step(batch, "test")

    def predict_step(self, batch: ImageTextBatch, batch_idx: int) -> dict:
        """Normalised embeddings with the sample keys, for export."""
        img, txt = self(batch)
        return {
            "keys": batch.keys,
            "image_emb": img,
            "text_emb": txt,
            "text_to_image": batch.text_to_image,
        }

    def _eval_step(self, batch: ImageTextBatch, stage: str) -> dict[str, torch.Tensor]:
        img, txt = self(batch)
        loss = self._pair_loss(img, txt, batch, gather=False)
        self.log(f"{stage}/loss", loss, batch_size=len(batch), sync_dist=True)
        return {
            "image_emb": img.detach(),
            "text_emb": txt.detach(),
            "text_to_image": batch.text_to_image,
            "labels": batch.labels if batch.labels is not None else torch.full((len(batch),), -1),
        }

"""EgoVLP-style video-text dual encoder: EgoNCE pretraining and video-text retrieval validation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from mmpt.batch import VideoTextBatch
from mmpt.eval.callback import gather_optional
from mmpt.eval.embed import EmbeddingAccumulator
from mmpt.eval.forgetting import eval_prefix
from mmpt.eval.video_metrics import video_text_retrieval_metrics
from mmpt.models.adapters import AdapterSpec
from mmpt.models.contrastive import ContrastiveModule, first_text_per_item
from mmpt.models.grad_cache import GradCache
from mmpt.models.losses import EgoNCELoss
from mmpt.models.schedules import Schedule

#: Batch counters summed over the epoch (and ranks) and logged under ``data/``.
DATA_COUNTERS = ("skipped", "clamped", "no_neighbour")
RETRIEVAL_KS = (1, 5, 10)


class VideoTextModule(ContrastiveModule):
    """A video tower and a text tower trained with EgoNCE (EgoVLP dual encoder).

    Training batches hold 2B ordinary pairs (anchors, then their same-video neighbours as
    scene-aware negatives, see :class:`~mmpt.batch.VideoTextBatch`); the loss sees all of
    them. Validation and test log the rank-local loss (on each clip's first narration) and,
    at the epoch end, video-text retrieval over the whole split (all ranks gathered):
    ``val/retrieval/t2v/R@1`` ... ``val/retrieval/v2t/median_rank``, with several
    narrations per clip counted as in CLIP_benchmark. With several validation sets
    (``data.eval_sets``) each set's loss and retrieval are logged under ``val/<set>/``.

    Args:
        vision: Video tower ``(N, T, C, H, W) -> (N, D)`` with ``image_preprocess``
            (e.g. :class:`~mmpt.models.encoders.VideoViTTower`).
        text: Text tower ``(M, L) -> (M, D)`` with ``tokenizer``.
        loss: :class:`~mmpt.models.losses.EgoNCELoss` (default, uses the batch's noun/verb
            tags); ``ClipLoss`` or ``SigLipLoss`` also work and ignore the tags.
        optimizer: See :class:`~mmpt.models.module.MMPTModule`.
        lr_schedule: See :class:`~mmpt.models.module.MMPTModule`.
        freeze: Patterns to freeze, e.g. ``["vision.model.*"]`` to train only temporal parts.
        trainable: Patterns that alone train.
        init_from: Checkpoint to initialise from (e.g. an image CLIP run: the tower names match).
        init_from_strict: Refuse a checkpoint of which too little loads (see :class:`MMPTModule`).
        grad_cache: Gradient caching ``{chunk_size: N}`` of the contrastive loss (see
            :class:`~mmpt.models.contrastive.ContrastiveModule`).
        adapters: peft LoRA/DoRA/(IA)^3 adapters by module pattern (see :class:`MMPTModule`).
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
        init_from: str | list[str] | None = None,
        init_from_strict: bool = True,
        grad_cache: GradCache | None = None,
        adapters: list[AdapterSpec] | None = None,
    ) -> None:
        super().__init__(
            vision,
            text,
            loss if loss is not None else EgoNCELoss(),
            optimizer,
            lr_schedule,
            freeze,
            trainable,
            init_from,
            init_from_strict=init_from_strict,
            grad_cache=grad_cache,
            adapters=adapters,
        )
        self._retrieval: dict[str, EmbeddingAccumulator] = {}  # metric prefix -> its clips

    def encode_video(self, videos: torch.Tensor) -> torch.Tensor:
        """L2-normalised clip embeddings: (N, T, C, H, W) normalised frames -> (N, D)."""
        return F.normalize(self.vision(videos), dim=-1)

    def forward(self, batch: VideoTextBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of the batch's clips (N, D) and narrations (M, D)."""
        return self.encode_video(batch.videos), self.encode_text(batch.text_tokens)

    def encode_media_rows(self, batch: VideoTextBatch, rows: slice) -> torch.Tensor:
        """L2-normalised embeddings (R, D) of the batch's clips ``rows``."""
        return self.encode_video(batch.videos[rows])

    def _pair_loss(
        self, vid: torch.Tensor, txt: torch.Tensor, batch: VideoTextBatch, gather: bool = True
    ) -> torch.Tensor:
        """Loss of (N, D) clips against their first narrations, tags used by EgoNCE."""
        if txt.shape[0] != vid.shape[0]:  # several narrations per clip: each clip's first
            txt = txt[first_text_per_item(batch.text_to_video.to(txt.device), vid.shape[0])]
        if isinstance(self.loss, EgoNCELoss):
            return self.loss(vid, txt, batch.nouns, batch.verbs, gather=gather)
        return self.loss(vid, txt, gather=gather)

    def training_step(self, batch: VideoTextBatch, batch_idx: int) -> torch.Tensor:
        """Loss on one batch; logs it, the logit scale and the data counters."""
        vid, txt = self.train_embeddings(batch)
        loss = self._pair_loss(vid, txt, batch)
        bs = len(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/logit_scale", self.loss.scale.to(loss.device), batch_size=bs)
        self.log_data_counts(batch, DATA_COUNTERS, bs)
        return loss

    def predict_step(self, batch: VideoTextBatch, batch_idx: int) -> dict:
        """Normalised embeddings with the clip keys, for export."""
        vid, txt = self(batch)
        return {
            "keys": batch.keys,
            "video_emb": vid,
            "text_emb": txt,
            "text_to_video": batch.text_to_video,
        }

    def _eval_step(self, batch: VideoTextBatch, stage: str) -> dict[str, torch.Tensor]:
        """Rank-local loss; keeps the embeddings for retrieval at the epoch end.

        ``stage`` is the metric prefix: ``val``, ``val/<set>`` or ``test``.
        """
        vid, txt = self(batch)
        loss = self._pair_loss(vid, txt, batch, gather=False)
        self.log(
            f"{stage}/loss", loss, batch_size=len(batch), sync_dist=True, add_dataloader_idx=False
        )
        out = {"video_emb": vid.detach(), "text_emb": txt.detach()}
        self._retrieval.setdefault(stage, EmbeddingAccumulator()).add(
            {
                "image_emb": out["video_emb"],
                "text_emb": out["text_emb"],
                "text_to_image": batch.text_to_video,
                "labels": torch.full((len(batch),), -1, dtype=torch.long),
            }
        )
        return out | {"text_to_video": batch.text_to_video}

    def retrieval_metrics(self, prefix: str = "val") -> dict[str, float]:
        """Video-text retrieval over one set's clips validated since the epoch start (all ranks).

        A collective under DDP: every rank calls it, for the same prefixes in the same order.

        Args:
            prefix: The set's metric prefix (``val``, ``val/<set>`` or ``test``).

        Returns:
            ``t2v/R@{1,5,10}``, ``v2t/R@{1,5,10}``, ``{t2v,v2t}/{mean,median}_rank``; empty
            when no rank saw a clip.
        """
        acc = self._retrieval.get(prefix)
        emb = gather_optional(acc.result() if acc is not None and len(acc) else None)
        if emb is None:
            return {}
        return video_text_retrieval_metrics(emb.image, emb.text, emb.text_to_image, ks=RETRIEVAL_KS)

    def _log_retrieval(self, stage: str) -> None:
        # Every rank holds the same gathered set, so the values agree without a sync.
        trainer = self._trainer
        count = 1
        if trainer is not None:
            count = len(trainer.num_val_batches if stage == "val" else trainer.num_test_batches)
        for prefix in dict.fromkeys(eval_prefix(trainer, stage, i) for i in range(max(count, 1))):
            for name, value in self.retrieval_metrics(prefix).items():
                self.log(f"{prefix}/retrieval/{name}", value, add_dataloader_idx=False)
        self._retrieval = {}

    def on_validation_epoch_start(self) -> None:
        """Start fresh embedding sets."""
        self._retrieval = {}

    def on_validation_epoch_end(self) -> None:
        """Log retrieval metrics (not during the sanity check: too few clips to mean much)."""
        if self.trainer.sanity_checking:
            self._retrieval = {}
            return
        self._log_retrieval("val")

    on_test_epoch_start = on_validation_epoch_start

    def on_test_epoch_end(self) -> None:
        """As for validation, logged under ``test/``."""
        self._log_retrieval("test")

"""EgoVLPv2: EgoNCE dual encoder + video-text matching + MLM through fusion in the backbone."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from mmpt.batch import VideoTextBatch
from mmpt.models.adapters import AdapterSpec
from mmpt.models.backbone_fusion import (
    BackboneFusion,
    TextStream,
)
from mmpt.models.contrastive import first_text_per_item
from mmpt.models.encoders.hf_text import HFTextTower
from mmpt.models.encoders.video_vit import VideoViTTower
from mmpt.models.fused_objectives import (
    mask_tokens,
    masked_lm_loss,
    matching_pairs,
    mlm_token_sets,
    sample_hard_negatives,
)
from mmpt.models.fused_objectives import mlm_head as build_mlm_head
from mmpt.models.grad_cache import GradCache
from mmpt.models.losses import EgoNCELoss
from mmpt.models.schedules import Schedule
from mmpt.models.video_text import DATA_COUNTERS, VideoTextModule

__all__ = ["EgoVLPv2Module", "mask_tokens", "sample_hard_negatives"]


class EgoVLPv2Module(VideoTextModule):
    """EgoVLP dual encoder + backbone fusion (EgoVLPv2): EgoNCE + VTM + MLM.

    Dual mode (fusion off) is the :class:`VideoTextModule` dual encoder, used for EgoNCE,
    validation retrieval and export (``forward(batch)``). Fused mode runs the top
    ``fusion_layers`` layers of both towers with gated cross-attention
    (:class:`~mmpt.models.backbone_fusion.BackboneFusion`) for two more training objectives:

    - VTM: a binary head on the concatenated fused [CLS] states (video: the frame mean of the
      class token after the final norm; text: the first token) of the N pairs, of each video
      with a hard negative text and of each text with a hard negative video, drawn from the
      softmax of the dual-encoder similarities (``1 / negative_temperature`` scale) with all
      positives excluded (the pair itself, identical narrations and, with EgoNCE, pairs sharing
      a noun and a verb).
    - MLM: BERT masking of the narrations, predicted from the fused text stream.

    ``train/loss = egonce_weight * EgoNCE + vtm_weight * VTM + mlm_weight * MLM``; each term is
    logged (``train/egonce``, ``train/vtm``, ``train/mlm``). The bottom layers run once per batch
    and are shared by the dual and the fused passes (the MLM pass reruns the text bottom).
    Hard negatives are drawn among the rank's own pairs. Checkpoints of a
    :class:`VideoTextModule` load by name (``init_from``); the fusion blocks and heads are new.

    Args:
        vision: :class:`~mmpt.models.encoders.VideoViTTower`.
        text: BERT/RoBERTa :class:`~mmpt.models.encoders.HFTextTower` whose tokenizer has a mask
            token.
        loss: Contrastive loss of the dual mode (default EgoNCE).
        optimizer: See :class:`~mmpt.models.module.MMPTModule`.
        lr_schedule: See :class:`~mmpt.models.module.MMPTModule`.
        freeze: Patterns to freeze.
        trainable: Patterns that alone train.
        init_from: Checkpoint to initialise from.
        init_from_strict: Refuse a checkpoint of which too little loads (see :class:`MMPTModule`).
        adapters: peft LoRA/DoRA/(IA)^3 adapters by module pattern (see :class:`MMPTModule`).
        fusion_layers: K, fused top layers of each tower (6 in EgoVLPv2).
        fusion_ff_mult: Feed-forward multiple of the fusion blocks.
        egonce_weight: Weight of the contrastive loss.
        vtm_weight: Weight of video-text matching.
        mlm_weight: Weight of masked language modelling.
        mlm_probability: Share of non-special tokens masked.
        mlm_head: "auto": the checkpoint's ``AutoModelForMaskedLM`` head (falls back to "small").
        negative_temperature: Temperature of the hard-negative sampling softmax.
        grad_cache: Gradient caching ``{chunk_size: N}`` of the dual (EgoNCE) pass: its
            towers run N pairs at a time (:mod:`mmpt.models.grad_cache`), the loss sees the
            whole batch. The fused VTM and MLM passes still run on the whole batch at once.

    """

    def __init__(
        self,
        vision: VideoViTTower,
        text: HFTextTower,
        loss: nn.Module | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: Schedule | None = None,
        freeze: list[str] | None = None,
        trainable: list[str] | None = None,
        init_from: str | list[str] | None = None,
        fusion_layers: int = 6,
        fusion_ff_mult: int = 4,
        egonce_weight: float = 1.0,
        vtm_weight: float = 1.0,
        mlm_weight: float = 1.0,
        mlm_probability: float = 0.15,
        mlm_head: Literal["auto", "small"] = "auto",
        negative_temperature: float = 0.05,
        init_from_strict: bool = True,
        grad_cache: GradCache | None = None,
        adapters: list[AdapterSpec] | None = None,
    ) -> None:
        super().__init__(
            vision,
            text,
            loss,
            optimizer,
            lr_schedule,
            freeze,
            trainable,
            init_from,
            init_from_strict=init_from_strict,
            grad_cache=grad_cache,
            adapters=adapters,
        )
        self.fusion = BackboneFusion(vision, text, fusion_layers, fusion_ff_mult)
        dv, dt = int(vision.model.embed_dim), int(text.model.config.hidden_size)
        self.vtm_head = nn.Sequential(nn.Linear(dv + dt, dt), nn.GELU(), nn.Linear(dt, 2))
        self.mlm_head = build_mlm_head(text, mlm_head)
        self.mask_token_id, special, replacement = mlm_token_sets(text)
        self.register_buffer("special_ids", special, persistent=False)
        self.register_buffer("replacement_ids", replacement, persistent=False)
        self.loss_weights = {"egonce": egonce_weight, "vtm": vtm_weight, "mlm": mlm_weight}
        self.mlm_probability = mlm_probability
        self.negative_temperature = negative_temperature

    def forward(
        self, batch: VideoTextBatch, fuse: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised embeddings, dual (default) or fused.

        Args:
            batch: Clips (N, ...) and narrations (M, L).
            fuse: False: the dual encoder, clips (N, D) and narrations (M, D). True: each
                narration with its clip through the fused towers, (M, D) and (M, D).

        Returns:
            Video and text embeddings, L2-normalised.
        """
        if not fuse:
            return super().forward(batch)
        videos = batch.videos[batch.text_to_video.to(batch.videos.device)]
        vid, txt, _ = self.encode_pairs(videos, batch.text_tokens, fuse=True)
        return F.normalize(vid, dim=-1), F.normalize(txt, dim=-1)

    def encode_pairs(
        self, videos: torch.Tensor, tokens: torch.Tensor, fuse: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run paired clips and narrations through both towers, fused or not.

        Args:
            videos: (B, T, C, H, W) normalised frames.
            tokens: (B, L) token ids, the narration of each clip.
            fuse: Exchange information in the top ``fusion_layers`` layers.

        Returns:
            Video (B, E) and text (B, E) tower outputs (not normalised) and the (B, D_v + D_t)
            [CLS] pair states (frame-mean video class token, text pooled as its tower pools:
            the first token for ``cls``) for VTM.
        """
        video = self.fusion.vision_bottom(self.vision, videos)
        stream = self.fusion.text_bottom(self.text, tokens)
        return self._top(video, stream, fuse)

    def _top(
        self, video: torch.Tensor, stream: TextStream, fuse: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top layers from bottom states: video (B, E), text (B, E), [CLS] pair (B, D_v + D_t)."""
        return self.fusion.pair_outputs(self.vision, self.text, video, stream, fuse=fuse)

    def _positives(self, batch: VideoTextBatch, tokens: torch.Tensor) -> torch.Tensor:
        """(N, N) pairs never drawn as negatives: diagonal, same narration, EgoNCE positives."""
        same = (tokens[:, None] == tokens[None]).all(-1)
        if isinstance(self.loss, EgoNCELoss):
            same = same | self.loss.positive_mask(batch.nouns, batch.verbs).to(same.device)
        return same | torch.eye(len(tokens), dtype=torch.bool, device=tokens.device)

    def training_step(self, batch: VideoTextBatch, batch_idx: int) -> torch.Tensor:
        """EgoNCE + VTM + MLM on one batch; logs the total, each term and the data counters."""
        tokens = batch.text_tokens
        if tokens.shape[0] != len(batch):  # several narrations per clip: each clip's first
            tokens = tokens[first_text_per_item(batch.text_to_video.to(tokens.device), len(batch))]
        video = self.fusion.vision_bottom(self.vision, batch.videos)
        stream = self.fusion.text_bottom(self.text, tokens)
        if self.grad_cache is None:
            vid, txt, _ = self._top(video, stream, fuse=False)
            vid, txt = F.normalize(vid, dim=-1), F.normalize(txt, dim=-1)
        else:  # the dual towers alone, in chunks (equal to the shared-bottom pass above)
            vid, txt = self.train_embeddings(batch)
        terms = {"egonce": self._pair_loss(vid, txt, batch)}

        logits = vid @ txt.T / self.negative_temperature
        neg_txt, neg_vid = sample_hard_negatives(logits, self._positives(batch, tokens))
        vi, ti, labels = matching_pairs(neg_txt, neg_vid)
        *_, cls = self._top(video[vi], stream.select(ti), fuse=True)
        vtm_logits = self.vtm_head(cls)
        terms["vtm"] = F.cross_entropy(vtm_logits, labels)

        inputs, mlm_labels = mask_tokens(
            tokens, self.mask_token_id, self.special_ids, self.replacement_ids, self.mlm_probability
        )
        masked = self.fusion.text_bottom(self.text, inputs, mask=stream.mask)
        _, hidden = self.fusion.top(self.vision, self.text, video, masked, fuse=True)
        terms["mlm"] = masked_lm_loss(self.mlm_head, hidden, mlm_labels)

        loss = sum(self.loss_weights[k] * v for k, v in terms.items())
        bs = len(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for name, value in terms.items():
            self.log(f"train/{name}", value, batch_size=bs)
        vtm_acc = (vtm_logits.argmax(-1) == labels).float().mean()
        self.log("train/vtm_acc", vtm_acc, batch_size=bs)
        self.log_data_counts(batch, DATA_COUNTERS, bs)
        return loss

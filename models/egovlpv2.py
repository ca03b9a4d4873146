"""EgoVLPv2: EgoNCE dual encoder + video-text matching + MLM through fusion in the backbone."""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import nn
from transformers import AutoModelForMaskedLM, AutoTokenizer

from mmpt.batch import VideoTextBatch
from mmpt.models.adapters import AdapterSpec
from mmpt.models.contrastive import first_text_per_item
from mmpt.models.encoders.hf_text import HFTextTower
from mmpt.models.encoders.video_vit import VideoViTTower
from mmpt.models.losses import EgoNCELoss
from mmpt.models.schedules import Schedule
from mmpt.models.video_fusion import (
    BackboneFusion,
    TextStream,
    text_embedding,
    video_embedding,
)
from mmpt.models.video_text import DATA_COUNTERS, VideoTextModule

log = logging.getLogger(__name__)


def sample_hard_negatives(
    logits: torch.Tensor, positives: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one hard negative per row and per column from the softmax of a similarity matrix.

    As ALBEF/EgoVLPv2: for video i a text j ~ softmax_j(logits[i, j]) over its negatives, for
    text j a video i ~ softmax_i(logits[i, j]); positives get probability exactly 0.

    Args:
        logits: (N, N) video-text similarities (already divided by a temperature).
        positives: (N, N) bool, True for pairs that must never be drawn (the diagonal at least).
        generator: Optional RNG (on the logits' device).

    Returns:
        Long (N,) negative text of each video and long (N,) negative video of each text; -1 for
        a row or column without any negative.

    """

    def draw(lg: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        has_neg = (~pos).any(1)
        lg = lg.float().masked_fill(pos, float("-inf"))
        lg = torch.where(has_neg[:, None], lg, 0.0)  # rows without negatives: drawn, then dropped
        idx = torch.multinomial(lg.softmax(-1), 1, generator=generator).squeeze(1)
        return torch.where(has_neg, idx, -1)

    logits, positives = logits.detach(), positives.bool()
    return draw(logits, positives), draw(logits.T, positives.T)


def mask_tokens(
    tokens: torch.Tensor,
    mask_token_id: int,
    special_ids: torch.Tensor,
    replacement_ids: torch.Tensor,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: 80% mask token, 10% random token, 10% unchanged.

    A ``probability`` share of the non-special tokens is picked; special tokens never are.

    Args:
        tokens: (B, L) long ids.
        mask_token_id: Id of the mask token.
        special_ids: (S,) ids never picked (CLS, SEP, PAD ...).
        replacement_ids: (R,) ids random replacements are drawn from (no special ids, so that
            no padding or separator appears).
        probability: Chance that a non-special token is picked.
        generator: Optional RNG (on the tokens' device).

    Returns:
        (B, L) inputs and (B, L) labels: the original id where picked, -100 elsewhere.

    """

    def rand() -> torch.Tensor:
        return torch.rand(tokens.shape, device=tokens.device, generator=generator)

    picked = (rand() < probability) & ~torch.isin(tokens, special_ids)
    labels = torch.where(picked, tokens, -100)
    action = rand()
    drawn = torch.randint(
        len(replacement_ids), tokens.shape, device=tokens.device, generator=generator
    )
    inputs = torch.where(picked & (action < 0.8), mask_token_id, tokens)
    random = picked & (action >= 0.8) & (action < 0.9)
    return torch.where(random, replacement_ids[drawn], inputs), labels


def _mlm_head(text: HFTextTower, kind: str) -> nn.Module:
    """MLM head (K, D_t) -> (K, vocab), decoder tied to the tower's input embeddings.

    "auto": the head of ``AutoModelForMaskedLM`` loaded from the tower's folder (pretrained
    transform weights when the checkpoint has them); "small", or when that fails:
    Linear-GELU-LayerNorm-decoder.
    """
    emb = text.model.get_input_embeddings()
    head: nn.Module | None = None
    if kind == "auto":
        try:
            mlm = AutoModelForMaskedLM.from_pretrained(text.tokenizer.path, local_files_only=True)
            base = getattr(mlm, mlm.base_model_prefix)
            heads = [m for _, m in mlm.named_children() if m is not base]
            out = mlm.get_output_embeddings()
            if len(heads) == 1 and out is not None and out.weight.shape == emb.weight.shape:
                head, out.weight = heads[0], emb.weight
        except (ValueError, OSError, KeyError) as err:
            log.warning(
                "no masked-LM head for %s (%s): using a small one", text.tokenizer.path, err
            )
    if head is None:
        hidden = emb.weight.shape[1]
        decoder = nn.Linear(hidden, emb.weight.shape[0])
        decoder.weight = emb.weight
        head = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden), decoder)
    return head


class EgoVLPv2Module(VideoTextModule):
    """EgoVLP dual encoder + backbone fusion (EgoVLPv2): EgoNCE + VTM + MLM.

    Dual mode (fusion off) is the :class:`VideoTextModule` dual encoder, used for EgoNCE,
    validation retrieval and export (``forward(batch)``). Fused mode runs the top
    ``fusion_layers`` layers of both towers with gated cross-attention
    (:class:`~mmpt.models.video_fusion.BackboneFusion`) for two more training objectives:

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
            adapters=adapters,
        )
        self.fusion = BackboneFusion(vision, text, fusion_layers, fusion_ff_mult)
        dv, dt = int(vision.model.embed_dim), int(text.model.config.hidden_size)
        self.vtm_head = nn.Sequential(nn.Linear(dv + dt, dt), nn.GELU(), nn.Linear(dt, 2))
        self.mlm_head = _mlm_head(text, mlm_head)
        tok = AutoTokenizer.from_pretrained(text.tokenizer.path, local_files_only=True)
        if tok.mask_token_id is None:
            raise ValueError(f"the tokenizer in {text.tokenizer.path} has no mask token for MLM")
        vocab = text.model.get_input_embeddings().weight.shape[0]
        special = torch.tensor(sorted(set(tok.all_special_ids)), dtype=torch.long)
        ids = torch.arange(vocab)
        self.mask_token_id = int(tok.mask_token_id)
        self.register_buffer("special_ids", special, persistent=False)
        self.register_buffer("replacement_ids", ids[~torch.isin(ids, special)], persistent=False)
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
            [CLS] pair states (frame-mean video class token, first text token) for VTM.
        """
        video = self.fusion.video_bottom(self.vision, videos)
        stream = self.fusion.text_bottom(self.text, tokens)
        return self._top(video, stream, fuse)

    def _top(
        self, video: torch.Tensor, stream: TextStream, fuse: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top layers from bottom states: video (B, E), text (B, E), [CLS] pair (B, D_v + D_t)."""
        v_tok, t_hid = self.fusion.top(self.vision, self.text, video, stream, fuse=fuse)
        cls = torch.cat([v_tok[:, :, 0].mean(1), t_hid[:, 0]], dim=-1)
        vid = video_embedding(self.vision, v_tok)
        return vid, text_embedding(self.text, t_hid, stream.mask), cls

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
        video = self.fusion.video_bottom(self.vision, batch.videos)
        stream = self.fusion.text_bottom(self.text, tokens)
        vid, txt, _ = self._top(video, stream, fuse=False)
        vid, txt = F.normalize(vid, dim=-1), F.normalize(txt, dim=-1)
        terms = {"egonce": self._pair_loss(vid, txt, batch)}

        logits = vid @ txt.T / self.negative_temperature
        neg_txt, neg_vid = sample_hard_negatives(logits, self._positives(batch, tokens))
        n, rows = len(batch), torch.arange(len(batch), device=vid.device)
        has_t, has_v = neg_txt >= 0, neg_vid >= 0
        vi = torch.cat([rows, rows[has_t], neg_vid[has_v]])
        ti = torch.cat([rows, neg_txt[has_t], rows[has_v]])
        labels = (torch.arange(len(vi), device=vi.device) < n).long()
        *_, cls = self._top(video[vi], stream.select(ti), fuse=True)
        vtm_logits = self.vtm_head(cls)
        terms["vtm"] = F.cross_entropy(vtm_logits, labels)

        inputs, mlm_labels = mask_tokens(
            tokens, self.mask_token_id, self.special_ids, self.replacement_ids, self.mlm_probability
        )
        masked = self.fusion.text_bottom(self.text, inputs, mask=stream.mask)
        _, hidden = self.fusion.top(self.vision, self.text, video, masked, fuse=True)
        picked = mlm_labels != -100
        mlm_logits = self.mlm_head(hidden[picked])  # (K, vocab)
        if picked.any():
            terms["mlm"] = F.cross_entropy(mlm_logits.float(), mlm_labels[picked])
        else:  # nothing masked (tiny batch): zero, still in the graph
            terms["mlm"] = mlm_logits.sum() * 0.0 + hidden.sum() * 0.0

        loss = sum(self.loss_weights[k] * v for k, v in terms.items())
        bs = len(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for name, value in terms.items():
            self.log(f"train/{name}", value, batch_size=bs)
        vtm_acc = (vtm_logits.argmax(-1) == labels).float().mean()
        self.log("train/vtm_acc", vtm_acc, batch_size=bs)
        self.log_data_counts(batch, DATA_COUNTERS, bs)
        return loss

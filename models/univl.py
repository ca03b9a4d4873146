"""UniVL (Luo et al. 2020): video-language pretraining for understanding and generation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import nn
from transformers import AutoTokenizer

from mmpt.batch import VideoFeatureBatch, VideoTextBatch
from mmpt.models.adapters import AdapterSpec
from mmpt.models.contrastive import first_text_per_item
from mmpt.models.encoders.hf_text import HFTextTower
from mmpt.models.fused_objectives import mask_tokens, mlm_token_sets
from mmpt.models.fused_objectives import mlm_head as build_mlm_head
from mmpt.models.losses import MILNCELoss
from mmpt.models.module import MMPTModule
from mmpt.models.schedules import Schedule
from mmpt.models.univl_decode import decode_captions
from mmpt.models.univl_losses import (
    IGNORE,
    alignment_nce,
    mask_frames,
    mask_whole_text,
    masked_frame_nce,
    shift_caption,
)
from mmpt.models.univl_parts import CaptionDecoder, CrossEncoder, FrameFeatureEncoder
from mmpt.preprocess import Preprocess

if TYPE_CHECKING:
    from mmpt.generate import Decoding

OBJECTIVES = ("joint", "mlm", "mfm", "align", "decoder")
Batch = VideoFeatureBatch | VideoTextBatch


class UniVLModule(MMPTModule):
    """UniVL: text encoder, video encoder, cross encoder and caption decoder, five objectives.

    - joint: MIL-NCE (:class:`~mmpt.models.losses.MILNCELoss`) between the video encoder's
      mean state and the text encoder's pooled state of each clip's candidate captions.
    - mlm: conditioned masked language modelling (BERT masking of the clip's first caption,
      predicted from the cross encoder's text positions).
    - mfm: conditioned masked frame modelling (:func:`masked_frame_nce`, masked frames are
      zeroed; their cross encoder states reconstruct the features, negatives from the batch).
    - align: video-text alignment (:func:`alignment_nce`): a linear score on the cross
      encoder's first token for every text-video pair of the batch (B^2 cross passes), or
      for each text's own video and its ``align_negatives`` hardest others.
    - decoder: language reconstruction, the decoder's cross-entropy on the clean caption
      from the cross encoder states of the masked inputs.

    ``train/loss`` is the weighted sum (weights in YAML); each term is logged as
    ``train/<name>``. StagedP: ``stage: 1`` trains the text and video encoders with the joint
    loss alone (cross encoder, decoder and heads frozen); ``stage: 2`` trains everything
    (``init_from`` the stage-1 checkpoint). EnhancedV (``enhanced_v``): each caption is masked
    whole with ``enhanced_v_probability``, so the decoder must read the video.

    Video input is either feature shards (:class:`~mmpt.batch.VideoFeatureBatch`) or raw clips
    (:class:`~mmpt.batch.VideoTextBatch`) through ``vision``, any mmpt image tower applied to
    every frame ((N*T, C, H, W) -> (N*T, D)).

    Args:
        text: BERT-family :class:`~mmpt.models.encoders.HFTextTower` with a mask token; its
            hidden size H is the width of every other part.
        video_dim: Input feature width (1024 for S3D); ignored with ``vision``.
        vision: Per-frame image tower for raw clips; None reads feature shards.
        video_layers: Video encoder layers.
        cross_layers: Cross encoder layers.
        decoder_layers: Decoder layers.
        num_heads: Attention heads of the new parts.
        ff_mult: Feed-forward multiple of the new parts.
        max_frames: Longest feature sequence.
        max_caption_len: Longest decoder sequence (caption tokens).
        dropout: Dropout of the new parts.
        stage: 1 (joint only) or 2 (all objectives).
        enhanced_v: Mask whole captions (EnhancedV).
        enhanced_v_probability: Share of captions masked whole.
        joint_weight: Weight of the joint MIL-NCE loss.
        mlm_weight: Weight of conditioned MLM.
        mfm_weight: Weight of conditioned MFM.
        align_weight: Weight of the alignment NCE.
        decoder_weight: Weight of language reconstruction.
        mlm_probability: Share of tokens masked for MLM.
        mfm_probability: Share of frames masked for MFM.
        mlm_head: "auto": the checkpoint's masked-LM head when it has one; "small": new.
        align_negatives: Negatives per text for the alignment NCE: the most similar other
            videos under the joint embedding; None: every video of the batch (UniVL), B^2
            cross encoder passes.
        joint_loss: The joint loss (default :class:`MILNCELoss`).
        optimizer: See :class:`~mmpt.models.module.MMPTModule`.
        lr_schedule: See :class:`~mmpt.models.module.MMPTModule`.
        freeze: Patterns to freeze.
        trainable: Patterns that alone train.
        init_from: Checkpoint to initialise from (stage 2: the stage-1 run).
        init_from_strict: Refuse a checkpoint of which too little loads.
        adapters: peft LoRA/DoRA/(IA)^3 adapters by module pattern (see :class:`MMPTModule`).
    """

    def __init__(
        self,
        text: HFTextTower,
        video_dim: int = 1024,
        vision: nn.Module | None = None,
        video_layers: int = 6,
        cross_layers: int = 2,
        decoder_layers: int = 3,
        num_heads: int = 12,
        ff_mult: int = 4,
        max_frames: int = 48,
        max_caption_len: int = 48,
        dropout: float = 0.1,
        stage: Literal[1, 2] = 2,
        enhanced_v: bool = False,
        enhanced_v_probability: float = 0.15,
        joint_weight: float = 1.0,
        mlm_weight: float = 1.0,
        mfm_weight: float = 1.0,
        align_weight: float = 1.0,
        decoder_weight: float = 1.0,
        mlm_probability: float = 0.15,
        mfm_probability: float = 0.15,
        mlm_head: Literal["auto", "small"] = "auto",
        align_negatives: int | None = None,
        joint_loss: MILNCELoss | None = None,
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
        if stage not in (1, 2):
            raise ValueError(f"model.stage must be 1 or 2, got {stage}")
        self.text, self.vision, self.stage = text, vision, stage
        hidden = int(text.model.config.hidden_size)
        if hidden % num_heads:
            raise ValueError(f"model.num_heads={num_heads} must divide the text width {hidden}")
        in_dim = int(vision.output_dim) if vision is not None else video_dim
        self.video = FrameFeatureEncoder(
            in_dim, hidden, video_layers, num_heads, ff_mult, max_frames, dropout
        )
        self.video_proj = nn.Linear(hidden, text.output_dim)
        self.cross = CrossEncoder(hidden, cross_layers, num_heads, ff_mult, dropout)
        words = text.model.get_input_embeddings()
        self.decoder = CaptionDecoder(words, decoder_layers, num_heads, ff_mult, max_caption_len,
                                      dropout)  # fmt: skip
        self.mlm_head = build_mlm_head(text, mlm_head)
        self.mfm_head = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden),
                                      nn.Linear(hidden, in_dim))  # fmt: skip
        self.align_head = nn.Linear(hidden, 1)
        self.joint_loss = joint_loss if joint_loss is not None else MILNCELoss()
        tok = AutoTokenizer.from_pretrained(text.tokenizer.path, local_files_only=True)
        ids = {n: getattr(tok, f"{n}_token_id") for n in ("mask", "cls", "sep")}
        if None in ids.values():
            missing = [n for n, i in ids.items() if i is None]
            raise ValueError(
                f"the tokenizer in {text.tokenizer.path} has no {'/'.join(missing)} token: "
                "UniVL needs a BERT-style tokenizer ([CLS] text [SEP], [MASK])"
            )
        self.mask_token_id, self.bos_id, self.eos_id = ids["mask"], ids["cls"], ids["sep"]
        _, special, replacements = mlm_token_sets(text)
        self.register_buffer("special_ids", special, persistent=False)
        self.register_buffer("replacement_ids", replacements, persistent=False)
        self.weights = dict(zip(OBJECTIVES, (joint_weight, mlm_weight, mfm_weight, align_weight,
                                             decoder_weight), strict=True))  # fmt: skip
        self.enhanced_v, self.enhanced_v_probability = enhanced_v, enhanced_v_probability
        self.mlm_probability, self.mfm_probability = mlm_probability, mfm_probability
        if align_negatives is not None and align_negatives < 1:
            raise ValueError(f"model.align_negatives must be >= 1 or null, got {align_negatives}")
        self.align_negatives = align_negatives
        if stage == 1:  # the joint loss alone: the fusion parts neither train nor run
            shared = {id(p) for p in text.parameters()}
            for part in (self.cross, self.decoder, self.mlm_head, self.mfm_head, self.align_head):
                for p in part.parameters():
                    if id(p) not in shared:  # tied word embeddings stay with the encoder
                        p.requires_grad_(False)

    @property
    def preprocess(self) -> Preprocess:
        """The text tokenizer, and the frame tower's image preprocessing (raw clips)."""
        image = self.vision.image_preprocess if self.vision is not None else None
        return Preprocess(image=image, tokenizer=self.text.tokenizer)

    # ----- encoders -------------------------------------------------------------------------

    def video_inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame features (N, T, D_in) and the (N, T) bool mask of real frames of a batch."""
        if isinstance(batch, VideoFeatureBatch):
            return batch.features, batch.frame_mask
        if self.vision is None:
            raise ValueError(
                "raw clips need model.vision (a per-frame image tower); without one UniVL "
                "reads feature shards (data: mmpt.datamodules.video_features)"
            )
        n, t = batch.videos.shape[:2]
        feats = self.vision(batch.videos.flatten(0, 1)).view(n, t, -1)
        return feats, torch.ones(n, t, dtype=torch.bool, device=feats.device)

    def video_embedding(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised joint-space clip embedding: masked mean of (N, T, H) -> (N, E)."""
        w = mask.unsqueeze(-1).to(states.dtype)
        return F.normalize(self.video_proj((states * w).sum(1) / w.sum(1).clamp(min=1)), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised joint-space caption embeddings: (M, L) ids -> (M, E)."""
        return F.normalize(self.text(tokens), dim=-1)

    def fuse(
        self, tokens: torch.Tensor, video: torch.Tensor, video_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross encoder over paired (B, L) tokens and (B, T, H) video states: (B, L+T, H), mask."""
        hidden, text_mask = self.text.hidden_states(tokens)
        return self.cross(hidden, text_mask, video, video_mask)

    def alignment_scores(
        self,
        text: tuple[torch.Tensor, torch.Tensor],
        video: torch.Tensor,
        video_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Alignment score of each text with its paired video.

        Args:
            text: Text encoder states (B, L, H) and their (B, L) mask
                (``self.text.hidden_states(tokens)``).
            video: (B, T, H) video encoder states; ``video_mask`` (B, T) real frames.

        Returns:
            (B,) scores.
        """
        fused, _ = self.cross(*text, video, video_mask)
        return self.align_head(fused[:, 0]).squeeze(-1)

    # ----- objectives -----------------------------------------------------------------------

    def losses(self, batch: Batch, generator: torch.Generator | None = None) -> dict:
        """The stage's objective terms on one batch (unweighted), see the class docstring."""
        feats, fmask = self.video_inputs(batch)
        n = feats.shape[0]
        owner = batch.text_to_video.to(feats.device)
        states = self.video(feats, fmask)
        text_emb = self.encode_text(batch.text_tokens)
        video_emb = self.video_embedding(states, fmask)
        terms = {"joint": self.joint_loss(video_emb, text_emb, owner)}
        if self.stage == 1:
            return terms
        first = first_text_per_item(owner, n)
        caption = batch.text_tokens[first]  # (N, L), the clip's own
        inputs, labels = mask_tokens(
            caption, self.mask_token_id, self.special_ids, self.replacement_ids,
            self.mlm_probability, generator,
        )  # fmt: skip
        if self.enhanced_v:
            whole = torch.rand(n, device=feats.device, generator=generator)
            whole = whole < self.enhanced_v_probability
            w_in, w_lab = mask_whole_text(caption, self.mask_token_id, self.special_ids)
            inputs = torch.where(whole[:, None], w_in, inputs)
            labels = torch.where(whole[:, None], w_lab, labels)
        frames = mask_frames(fmask, self.mfm_probability, generator)
        masked_video = self.video(feats.masked_fill(frames.unsqueeze(-1), 0.0), fmask)
        fused, fused_mask = self.fuse(inputs, masked_video, fmask)
        length = caption.shape[1]
        picked = labels != IGNORE
        mlm_logits = self.mlm_head(fused[:, :length][picked])
        terms["mlm"] = (
            F.cross_entropy(mlm_logits.float(), labels[picked])
            if picked.any()
            else fused.sum() * 0.0
        )
        recon = self.mfm_head(fused[:, length:])
        terms["mfm"] = masked_frame_nce(recon, feats, fmask, frames)
        sim = text_emb[first] @ video_emb.T  # (N, N) joint similarities: hard negatives
        terms["align"] = self._alignment(caption, states, fmask, sim)
        dec_in, dec_target = shift_caption(caption, self.text.pad_id)
        logits = self.decoder(dec_in, fused, fused_mask)
        terms["decoder"] = F.cross_entropy(logits.flatten(0, 1).float(), dec_target.flatten())
        return terms

    def pair_scores(
        self,
        tokens: torch.Tensor,
        states: torch.Tensor,
        mask: torch.Tensor,
        candidates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Alignment scores of every text i with its candidate videos.

        Args:
            tokens: (B, L) caption of each clip.
            states: (B, T, H) video encoder states; ``mask`` (B, T) real frames.
            candidates: Long (B, C) videos scored for each text; None: all B.

        Returns:
            (B, C) scores (B, B when ``candidates`` is None).
        """
        b = tokens.shape[0]
        if candidates is None:
            candidates = torch.arange(b, device=tokens.device).expand(b, b)
        c = candidates.shape[1]
        hidden, text_mask = self.text.hidden_states(tokens)
        ti = torch.arange(b, device=tokens.device).repeat_interleave(c)
        vi = candidates.reshape(-1)
        scores = self.alignment_scores((hidden[ti], text_mask[ti]), states[vi], mask[vi])
        return scores.view(b, c)

    def _alignment(
        self, caption: torch.Tensor, states: torch.Tensor, mask: torch.Tensor, sim: torch.Tensor
    ) -> torch.Tensor:
        """Alignment NCE: all videos, or the own video + the hardest ``align_negatives``."""
        b = caption.shape[0]
        k = self.align_negatives
        if k is None or k >= b - 1:
            return alignment_nce(self.pair_scores(caption, states, mask))
        own = torch.arange(b, device=sim.device)
        hard = sim.detach().clone()
        hard[own, own] = float("-inf")
        candidates = torch.cat([own[:, None], hard.topk(k, dim=1).indices], dim=1)
        target = torch.zeros(b, dtype=torch.long, device=sim.device)
        return alignment_nce(self.pair_scores(caption, states, mask, candidates), target)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        """Weighted sum of the stage's objectives; logs it, each term and ``data/skipped``."""
        terms = self.losses(batch)
        loss = sum(self.weights[k] * v for k, v in terms.items())
        bs = len(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for name, value in terms.items():
            self.log(f"train/{name}", value, batch_size=bs)
        self.log_data_counts(batch, ("skipped",), bs)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """Rank-local objective terms on a validation batch, logged as ``val/<name>``."""
        terms = self.losses(batch)
        bs = len(batch)
        loss = sum(self.weights[k] * v for k, v in terms.items())
        self.log("val/loss", loss, batch_size=bs, sync_dist=True)
        for name, value in terms.items():
            self.log(f"val/{name}", value, batch_size=bs, sync_dist=True)

    def on_train_batch_end(self, *args, **kwargs) -> None:
        """Clamp the joint loss's logit scale after the step."""
        self.joint_loss.clamp_()

    # ----- generation -----------------------------------------------------------------------

    @torch.no_grad()
    def generate_captions(
        self,
        features: torch.Tensor,
        mask: torch.Tensor,
        decoding: Decoding | None = None,
    ) -> list[str]:
        """Captions of (N, T, D_in) clips (``mask`` (N, T) real frames), greedy or beam search.

        The cross encoder sees an empty text ([CLS] [SEP]) with the clip, and the decoder
        writes from its states. Of ``decoding`` (:class:`~mmpt.generate.Decoding`),
        ``max_new_tokens`` and ``num_beams`` apply; sampling is refused.
        """
        max_new, beams = (decoding.max_new_tokens, decoding.num_beams) if decoding else (20, 1)
        if decoding is not None and decoding.temperature > 0:
            raise ValueError("UniVL decodes greedily or by beam search: set temperature 0")
        states = self.video(features, mask)
        empty = self.text.tokenizer([""] * features.shape[0]).to(features.device)
        fused, fused_mask = self.fuse(empty, states, mask)
        ids = decode_captions(self.decoder, fused, fused_mask, self.bos_id, self.eos_id, max_new,
                              beams)  # fmt: skip
        tok = AutoTokenizer.from_pretrained(self.text.tokenizer.path, local_files_only=True)
        return [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]

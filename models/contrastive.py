"""CLIP-style dual-encoder pretraining (InfoNCE or SigLIP): image or audio tower + text tower."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from mmpt.batch import AudioTextBatch, ImageTextBatch, VideoTextBatch
from mmpt.eval.forgetting import eval_prefix
from mmpt.models.adapters import AdapterSpec
from mmpt.models.grad_cache import GradCache, cached_embeddings, fsdp_forward_method
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


def text_owner(batch: ImageTextBatch | AudioTextBatch | VideoTextBatch) -> torch.Tensor:
    """Long tensor (M,): the image or clip each caption of ``batch`` belongs to."""
    if isinstance(batch, VideoTextBatch):
        return batch.text_to_video
    return batch.text_to_audio if isinstance(batch, AudioTextBatch) else batch.text_to_image


class ContrastiveModule(MMPTModule):
    """A vision (or audio) tower and a text tower trained to agree on matching pairs.

    With ``audio`` instead of ``vision`` it is CLAP-like audio-text pretraining on
    ``AudioTextBatch`` es; evaluation (zero-shot retrieval and classification) is the same code
    as for images.

    Args:
        vision: Image tower: ``(B, C, H, W) -> (B, D)``, with ``image_preprocess``.
        text: Text tower: ``(B, L) -> (B, D)``, with ``tokenizer``.
        loss: ``ClipLoss`` (default) or ``SigLipLoss``; owns the logit scale (and bias).
        optimizer: See :class:`~mmpt.models.module.MMPTModule`.
        lr_schedule: See :class:`~mmpt.models.module.MMPTModule`.
        freeze: Patterns to freeze, e.g. ``["vision.*"]`` for LiT (locked image tuning).
        trainable: Patterns that alone train.
        init_from: Checkpoint to initialise from.
        audio: Audio tower instead of ``vision``: ``(B, N), (B,) -> (B, D)`` (waveforms and
            their lengths), with ``audio_preprocess`` (``LogMelTower``, ``Wav2Vec2Tower``).
        init_from_strict: Refuse a checkpoint of which too little loads (see :class:`MMPTModule`).
        grad_cache: Gradient caching (``{chunk_size: N}``): the towers embed the training batch
            N pairs at a time, so a batch far larger than memory allows trains with exactly the
            full-batch loss and gradients (:mod:`mmpt.models.grad_cache`). Training only embeds
            the first caption of each item.
        adapters: peft LoRA/DoRA/(IA)^3 adapters by module pattern (see :class:`MMPTModule`).
    """

    def __init__(
        self,
        vision: nn.Module | None = None,
        text: nn.Module | None = None,
        loss: nn.Module | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: Schedule | None = None,
        freeze: list[str] | None = None,
        trainable: list[str] | None = None,
        init_from: str | list[str] | None = None,
        audio: nn.Module | None = None,
        init_from_strict: bool = True,
        grad_cache: GradCache | None = None,
        adapters: list[AdapterSpec] | None = None,
    ) -> None:
        super().__init__(
            optimizer, lr_schedule, freeze, trainable, init_from, init_from_strict, adapters
        )
        self.grad_cache = grad_cache
        if text is None or (vision is None) == (audio is None):
            raise ValueError(
                "ContrastiveModule needs model.text and exactly one of model.vision (image-text) "
                "or model.audio (audio-text)"
            )
        self.vision, self.text, self.audio = vision, text, audio
        self.loss = loss if loss is not None else ClipLoss()
        media = vision if vision is not None else audio
        if media.output_dim != text.output_dim:
            kind = "vision" if vision is not None else "audio"
            raise ValueError(
                f"{kind} tower embeds to {media.output_dim} but text tower to "
                f"{text.output_dim}: set the same embed_dim on both"
            )

    @property
    def preprocess(self) -> Preprocess:
        """The media tower's preprocessing (image or audio) and the text tower's tokenizer."""
        return Preprocess(
            image=self.vision.image_preprocess if self.vision is not None else None,
            tokenizer=self.text.tokenizer,
            audio=self.audio.audio_preprocess if self.audio is not None else None,
        )

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings: (B, C, H, W) -> (B, D)."""
        return F.normalize(self.vision(images), dim=-1)

    def encode_audio(self, audio: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """L2-normalised audio embeddings: (B, N) waveforms, (B,) lengths -> (B, D)."""
        return F.normalize(self.audio(audio, lengths), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings: (M, L) -> (M, D)."""
        return F.normalize(self.text(tokens), dim=-1)

    def encode_media(self, batch: ImageTextBatch | AudioTextBatch) -> torch.Tensor:
        """L2-normalised embeddings (B, D) of the batch's images or audio clips."""
        if isinstance(batch, AudioTextBatch):
            if self.audio is None:
                raise ValueError("an audio batch for a model without an audio tower")
            return self.encode_audio(batch.audio, batch.audio_lengths)
        if self.vision is None:
            raise ValueError("an image batch for a model without a vision tower")
        return self.encode_image(batch.images)

    def forward(self, batch: ImageTextBatch | AudioTextBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of the batch's images or clips (B, D) and captions (M, D)."""
        return self.encode_media(batch), self.encode_text(batch.text_tokens)

    def encode_media_rows(
        self, batch: ImageTextBatch | AudioTextBatch, rows: slice
    ) -> torch.Tensor:
        """L2-normalised embeddings (R, D) of the batch's images or audio clips ``rows``."""
        if isinstance(batch, AudioTextBatch):
            return self.encode_audio(batch.audio[rows], batch.audio_lengths[rows])
        return self.encode_image(batch.images[rows])

    def train_embeddings(
        self, batch: ImageTextBatch | AudioTextBatch | VideoTextBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training embeddings: media (B, D) and captions (M, D), or (B, D) with grad caching.

        With ``grad_cache`` the towers run ``chunk_size`` items (and their first captions) at
        a time; the returned embeddings re-run the chunks in backward.
        """
        if self.grad_cache is None:
            return self(batch)
        tokens = batch.text_tokens
        if tokens.shape[0] != len(batch):  # several captions per item: each one's first
            owner = text_owner(batch).to(tokens.device)
            tokens = tokens[first_text_per_item(owner, len(batch))]

        embed_rows = fsdp_forward_method(self, "embed_rows")  # FSDP2: gathers root weights
        towers = [t for t in (self.vision, self.audio, self.text) if t is not None]
        media, text = cached_embeddings(
            lambda rows: embed_rows(batch, tokens, rows),
            len(batch),
            self.grad_cache.chunk_size,
            towers,
            root=self,
        )
        return media, text

    def embed_rows(
        self,
        batch: ImageTextBatch | AudioTextBatch | VideoTextBatch,
        tokens: torch.Tensor,
        rows: slice,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (R, D) of the items ``rows`` and of ``tokens[rows]`` (one caption each)."""
        return self.encode_media_rows(batch, rows), self.encode_text(tokens[rows])

    def _pair_loss(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        batch: ImageTextBatch | AudioTextBatch,
        gather: bool = True,
    ) -> torch.Tensor:
        if txt.shape[0] != img.shape[0]:  # several captions per item: use each one's first
            txt = txt[first_text_per_item(text_owner(batch), img.shape[0])]
        return self.loss(img, txt, gather=gather)

    def training_step(self, batch: ImageTextBatch | AudioTextBatch, batch_idx: int) -> torch.Tensor:
        """Contrastive loss on one batch; logs loss, logit scale and skipped samples."""
        img, txt = self.train_embeddings(batch)
        loss = self._pair_loss(img, txt, batch)
        bs = len(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/logit_scale", self.loss.scale, batch_size=bs)
        self.log_data_counts(batch, ("skipped",), bs)  # samples dropped as corrupt
        return loss

    def on_train_batch_end(self, *args, **kwargs) -> None:
        """Clamp the logit scale after every optimizer step (CLIP: at most ln 100)."""
        self.loss.clamp_()

    def validation_step(
        self, batch: ImageTextBatch | AudioTextBatch, batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, torch.Tensor]:
        """Rank-local validation loss; returns embeddings for the zero-shot callback.

        No collective here: ranks may hold different validation batch sizes and counts. With
        several validation sets the loss is ``val/<set>/loss``.
        """
        return self._eval_step(batch, eval_prefix(self._trainer, "val", dataloader_idx))

    def test_step(
        self, batch: ImageTextBatch | AudioTextBatch, batch_idx: int
    ) -> dict[str, torch.Tensor]:
        """As :meth:`validation_step`, logged under ``test/``."""
        return self._eval_step(batch, "test")

    def predict_step(self, batch: ImageTextBatch | AudioTextBatch, batch_idx: int) -> dict:
        """Normalised embeddings with the sample keys, for export."""
        img, txt = self(batch)
        return {
            "keys": batch.keys,
            "image_emb" if self.audio is None else "audio_emb": img,
            "text_emb": txt,
            "text_to_image" if self.audio is None else "text_to_audio": text_owner(batch),
        }

    def _eval_step(
        self, batch: ImageTextBatch | AudioTextBatch, stage: str
    ) -> dict[str, torch.Tensor]:
        img, txt = self(batch)
        loss = self._pair_loss(img, txt, batch, gather=False)
        self.log(
            f"{stage}/loss", loss, batch_size=len(batch), sync_dist=True, add_dataloader_idx=False
        )
        # the evaluation code names the embedded items "images", whatever they are
        return {
            "image_emb": img.detach(),
            "text_emb": txt.detach(),
            "text_to_image": text_owner(batch),
            "labels": batch.labels if batch.labels is not None else torch.full((len(batch),), -1),
        }

"""CTC fine-tuning of a wav2vec 2.0 / HuBERT / WavLM tower for speech recognition.

The head is Hugging Face's ``Wav2Vec2ForCTC`` one (dropout + linear over the last hidden state,
transformers' own ``ForCTCLoss`` with ``pad`` as the blank) on any :class:`Wav2Vec2Tower`
(HF or torchaudio), with the fine-tuning recipe's knobs: frozen feature encoder (the tower's
``freeze_feature_encoder``), the whole encoder frozen for the first N steps, LayerDrop and
SpecAugment-style masking through the HF model config, greedy decoding, and WER/CER logged
during validation (``val/wer``, ``val/cer``).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from mmpt.batch import AudioTextBatch
from mmpt.ctc_vocab import CTCTokenizer, CTCVocab
from mmpt.eval.asr_metrics import ErrorTally, TextNormalizer
from mmpt.eval.forgetting import eval_prefix
from mmpt.models.adapters import AdapterSpec
from mmpt.models.encoders.wav2vec2 import Wav2Vec2Tower
from mmpt.models.module import MMPTModule
from mmpt.models.schedules import Schedule
from mmpt.preprocess import Preprocess

#: HF config fields of SpecAugment masking that ``CTCModule`` sets (None keeps the model's).
MASK_FIELDS = ("mask_time_prob", "mask_time_length", "mask_feature_prob", "mask_feature_length")


def ctc_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    frame_lengths: torch.Tensor,
    blank: int,
    reduction: str = "mean",
    zero_infinity: bool = True,
) -> torch.Tensor:
    """The loss of transformers' ``Wav2Vec2ForCTC`` (its ``ForCTCLoss``): float32 log-softmax.

    Args:
        logits: (B, T, V) frame scores.
        labels: Long tensor (B, L), padded with -100.
        frame_lengths: Long tensor (B,), valid frames per row.
        blank: Blank id (the ``<pad>`` token).
        reduction: ``mean`` (per-row loss / target length, averaged: HF's fine-tuning
            default), ``sum`` or ``none``.
        zero_infinity: Zero impossible alignments (and their gradients) instead of inf.

    Returns:
        The loss (a scalar, or (B,) with ``none``).
    """
    from transformers.loss.loss_ctc import ForCTCLoss

    return ForCTCLoss(logits, labels, frame_lengths, blank, reduction, zero_infinity)


def configure_tower(
    tower: Wav2Vec2Tower, layerdrop: float | None, masking: dict[str, float | int | None]
) -> None:
    """Set LayerDrop and SpecAugment masking on the tower's model (None keeps a value).

    Raises:
        ValueError: Masking asked of a torchaudio tower (it has none).
    """
    if tower.source == "torchaudio":
        if any(v for v in masking.values()):
            raise ValueError(
                f"model.{'/'.join(MASK_FIELDS)}: SpecAugment masking needs an HF tower "
                "(source: hf); torchaudio's Wav2Vec2Model has none"
            )
        if layerdrop is not None:
            tower.model.encoder.transformer.layer_drop = float(layerdrop)
        return
    config = tower.backbone.config
    if layerdrop is not None:
        config.layerdrop = float(layerdrop)
    for name, value in masking.items():
        if value is not None:
            setattr(config, name, value)
    needs_embed = (config.mask_time_prob or 0) > 0 or (config.mask_feature_prob or 0) > 0
    if needs_embed and getattr(tower.backbone, "masked_spec_embed", None) is None:
        tower.backbone.masked_spec_embed = nn.Parameter(torch.empty(config.hidden_size).uniform_())


class CTCModule(MMPTModule):
    """Speech recognition: a speech tower + HF's CTC head, trained on transcripts.

    Batches come from :class:`~mmpt.datamodules.ctc.CTCDataModule`. The vocabulary (a
    ``vocab.json`` from ``mmpt data vocab``) is stored in the checkpoint's hyper-parameters.

    Attributes:
        vocab: The :class:`~mmpt.ctc_vocab.CTCVocab`.
        lm_head: Linear ``feature_dim -> len(vocab)``.
    """

    def __init__(
        self,
        encoder: Wav2Vec2Tower,
        vocab: str | dict[str, Any],
        lowercase: bool = False,
        final_dropout: float = 0.0,
        ctc_loss_reduction: str = "mean",
        ctc_zero_infinity: bool = True,
        freeze_encoder_steps: int = 0,
        layerdrop: float | None = None,
        mask_time_prob: float | None = None,
        mask_time_length: int | None = None,
        mask_feature_prob: float | None = None,
        mask_feature_length: int | None = None,
        normalizer: TextNormalizer | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: Schedule | None = None,
        freeze: list[str] | None = None,
        trainable: list[str] | None = None,
        init_from: str | list[str] | None = None,
        init_from_strict: bool = True,
        adapters: list[AdapterSpec] | None = None,
    ) -> None:
        """Build the head on the tower.

        Args:
            encoder: Any :class:`Wav2Vec2Tower` (``pretraining_head: true`` keeps the key
                names of a continued-pretraining checkpoint for ``init_from``; freeze its
                ``encoder.model.quantizer.*``/``project_*`` then).
            vocab: A ``vocab.json`` (or ``tokenizers`` file) path, or its stored description.
            lowercase: Lowercase transcripts before encoding.
            final_dropout: Dropout before the head (HF ``final_dropout``).
            ctc_loss_reduction: ``mean`` or ``sum`` (HF ``ctc_loss_reduction``).
            ctc_zero_infinity: Zero impossible alignments (HF ``ctc_zero_infinity``).
            freeze_encoder_steps: Train only the head for this many optimizer steps (fairseq's
                ``freeze_finetune_updates``).
            layerdrop: Probability of skipping a transformer layer in training; None keeps
                the model config's.
            mask_time_prob, mask_time_length, mask_feature_prob, mask_feature_length:
                SpecAugment masking of the HF model config (None keeps the config's).
            normalizer: Text normalisation before WER/CER (default: lowercase, no
                punctuation, single spaces).
            optimizer, lr_schedule, freeze, trainable, init_from, init_from_strict, adapters:
                See :class:`MMPTModule`.

        Raises:
            ValueError: A bad reduction, negative steps, masking on a torchaudio tower.
            FileNotFoundError: No vocabulary file.
        """
        super().__init__(
            optimizer, lr_schedule, freeze, trainable, init_from, init_from_strict, adapters
        )
        if ctc_loss_reduction not in ("mean", "sum"):
            raise ValueError("model.ctc_loss_reduction must be mean or sum")
        if freeze_encoder_steps < 0:
            raise ValueError("model.freeze_encoder_steps must be >= 0")
        self.encoder = encoder
        self.vocab = CTCVocab.from_spec(vocab, lowercase)
        masking = dict(
            zip(
                MASK_FIELDS,
                (mask_time_prob, mask_time_length, mask_feature_prob, mask_feature_length),
                strict=True,
            )
        )
        configure_tower(encoder, layerdrop, masking)
        self.dropout = nn.Dropout(final_dropout)
        self.lm_head = nn.Linear(encoder.feature_dim, len(self.vocab))
        self.reduction, self.zero_infinity = ctc_loss_reduction, ctc_zero_infinity
        self.freeze_encoder_steps = freeze_encoder_steps
        self.normalizer = normalizer or TextNormalizer()
        # what load_ctc rebuilds the model from (mmpt eval asr, pseudo-labels, export)
        self.save_hyperparameters({"vocab": self.vocab.to_dict(), "encoder": encoder.describe()})
        self._tally: dict[str, ErrorTally] = {}

    @property
    def preprocess(self) -> Preprocess:
        """The tower's audio preprocessing and the CTC tokenizer (vocabulary + frames)."""
        if getattr(self, "_preprocess", None) is None:
            self._preprocess = Preprocess(
                image=None,
                tokenizer=CTCTokenizer(self.vocab, self.encoder.lengths),
                audio=self.encoder.audio_preprocess,
            )
        return self._preprocess

    def encoder_frozen(self) -> bool:
        """Whether this training step leaves the encoder out (``freeze_encoder_steps``)."""
        return (
            self.training
            and self._trainer is not None
            and (self.global_step < self.freeze_encoder_steps)
        )

    def forward(
        self, audio: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame logits of a padded batch.

        Args:
            audio: (B, N) float waveforms, zero-padded.
            lengths: Long tensor (B,), clip lengths in samples.

        Returns:
            logits: (B, T, V).
            frame_lengths: Long tensor (B,), valid frames per row.
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.encoder_frozen()):
            feats, frames = self.encoder.frame_features(audio, lengths)
        return self.lm_head(self.dropout(feats)), frames

    def loss(
        self, logits: torch.Tensor, labels: torch.Tensor, frames: torch.Tensor
    ) -> torch.Tensor:
        """HF's CTC loss of this head's settings (see :func:`ctc_loss`)."""
        blank = self.vocab.blank
        return ctc_loss(logits, labels, frames, blank, self.reduction, self.zero_infinity)

    def transcribe(self, audio: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        """Greedy transcripts of a padded batch (B strings)."""
        logits, frames = self(audio, lengths)
        return self.vocab.greedy(logits, frames)

    def log_ctc_counts(self, batch: AudioTextBatch) -> None:
        """Log the batch's out-of-vocabulary characters (``data/oov``) and skipped samples."""
        bs = len(batch)
        self.log_data_counts(batch, ("skipped",), bs)
        if hasattr(batch, "oov"):
            self.log_data_counts(batch, ("oov",), bs)

    def training_step(self, batch: AudioTextBatch, batch_idx: int = 0) -> torch.Tensor:
        """CTC loss of the batch."""
        logits, frames = self(batch.audio, batch.audio_lengths)
        loss = self.loss(logits, batch.text_tokens, frames)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        self.log("train/encoder_frozen", float(self.encoder_frozen()), batch_size=len(batch))
        self.log_ctc_counts(batch)
        return loss

    def on_validation_epoch_start(self) -> None:
        """Start the epoch's WER/CER tallies."""
        self._tally = {}

    def validation_step(
        self, batch: AudioTextBatch, batch_idx: int = 0, dataloader_idx: int = 0
    ) -> torch.Tensor:
        """Loss, and greedy transcripts scored against the references."""
        prefix = eval_prefix(self._trainer, "val", dataloader_idx)
        logits, frames = self(batch.audio, batch.audio_lengths)
        loss = self.loss(logits, batch.text_tokens, frames)
        log = partial(self.log, batch_size=len(batch), sync_dist=True, add_dataloader_idx=False)
        log(f"{prefix}/loss", loss, prog_bar=True)
        hyps = self.vocab.greedy(logits, frames)
        refs = getattr(batch, "transcripts", None) or [
            self.vocab.decode(row.tolist()) for row in batch.text_tokens
        ]
        self._tally.setdefault(prefix, ErrorTally(self.normalizer)).add(refs, hyps)
        self.log_ctc_counts(batch)
        return loss

    def on_validation_epoch_end(self) -> None:
        """Log ``<prefix>/wer`` and ``<prefix>/cer`` over every rank's utterances."""
        for prefix, tally in self._tally.items():
            counts = torch.tensor(tally.counts(), dtype=torch.float64, device=self.device)
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
            word_err, words, char_err, chars = counts.tolist()
            self.log(f"{prefix}/wer", word_err / max(words, 1), prog_bar=True, sync_dist=False)
            self.log(f"{prefix}/cer", char_err / max(chars, 1), sync_dist=False)
        self._tally = {}


__all__ = ["MASK_FIELDS", "CTCModule", "configure_tower", "ctc_loss"]

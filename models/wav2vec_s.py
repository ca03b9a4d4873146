"""wav2vec-S: semi-supervised pretraining between self-supervised pretraining and CTC fine-tuning.

The stage (wav2vec-S, arXiv 2110.04484) keeps optimising wav2vec 2.0's self-supervised loss on
all audio while a CTC loss on the labelled subset adapts the representation to the task; a
plain CTC fine-tuning (:class:`~mmpt.models.ctc.CTCModule`, ``init_from`` this run) follows.
Batches mix unlabelled and labelled clips (``CTCDataModule(allow_unlabelled=True)`` with
``train.weights``); optionally a fine-tuned CTC model transcribes the unlabelled clips
(pseudo-labels, weighted apart).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from lightning.pytorch.cli import OptimizerCallable

from mmpt.batch import AudioTextBatch
from mmpt.ctc_vocab import pad_labels
from mmpt.eval.asr_metrics import TextNormalizer
from mmpt.models.adapters import AdapterSpec
from mmpt.models.ctc import CTCModule
from mmpt.models.encoders.wav2vec2 import Wav2Vec2Tower
from mmpt.models.schedules import Schedule
from mmpt.models.wav2vec2_pretrain import gumbel_temperature_at, pretraining_outputs


class WavSModule(CTCModule):
    """Self-supervised loss on every clip + CTC loss on the labelled ones.

    ``loss = ssl_weight(step) * L_ssl + ctc_weight * L_ctc (+ pseudo_weight * L_pseudo)``,
    with ``ssl_weight`` moving linearly from ``ssl_weight`` to ``ssl_weight_end`` over the run.
    Validation is the CTC module's (loss, WER, CER). The checkpoint's encoder keys are a
    ``Wav2Vec2ForPreTraining``'s, so both a continued-pretraining run (``init_from``) and the
    CTC fine-tuning after it (a CTC model with ``pretraining_head: true``) load it by name.
    """

    def __init__(
        self,
        encoder: Wav2Vec2Tower,
        vocab: str | dict[str, Any],
        ssl_weight: float = 1.0,
        ssl_weight_end: float | None = None,
        ctc_weight: float = 1.0,
        pseudo_labeler: str | None = None,
        pseudo_weight: float = 0.5,
        mask_prob: float = 0.65,
        mask_length: int = 10,
        num_negatives: int = 100,
        gumbel_temperature: tuple[float, float, float] = (2.0, 0.5, 0.999995),
        lowercase: bool = False,
        final_dropout: float = 0.0,
        ctc_loss_reduction: str = "mean",
        normalizer: TextNormalizer | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: Schedule | None = None,
        freeze: list[str] | None = None,
        trainable: list[str] | None = None,
        init_from: str | list[str] | None = None,
        init_from_strict: bool = True,
        adapters: list[AdapterSpec] | None = None,
    ) -> None:
        """Build the stage.

        Args:
            encoder: A :class:`Wav2Vec2Tower` with ``source: hf`` and ``pretraining_head:
                true``.
            vocab: The CTC vocabulary (see :class:`CTCModule`).
            ssl_weight: Weight of the self-supervised loss (per masked frame) at step 0.
            ssl_weight_end: Its weight at the last step (linear in between); None: constant.
            ctc_weight: Weight of the CTC loss on the labelled clips.
            pseudo_labeler: A fine-tuned CTC checkpoint (``CTCModule`` ``.ckpt``) whose greedy
                transcripts of the unlabelled clips are extra CTC targets; None for none.
            pseudo_weight: Weight of the CTC loss on pseudo-labelled clips.
            mask_prob, mask_length, num_negatives, gumbel_temperature: The self-supervised
                loss's settings (see ``Wav2Vec2PretrainModule``).
            lowercase, final_dropout, ctc_loss_reduction, normalizer: See :class:`CTCModule`.
            optimizer, lr_schedule, freeze, trainable, init_from, init_from_strict, adapters:
                See :class:`~mmpt.models.module.MMPTModule`.

        Raises:
            ValueError: A tower without the pretraining head, negative weights.
        """
        if encoder.source != "hf" or not encoder.pretraining_head:
            raise ValueError(
                "wav2vec-S needs model.encoder with source: hf and pretraining_head: true "
                "(the self-supervised loss needs the quantizer)"
            )
        if min(ssl_weight, ctc_weight, pseudo_weight, ssl_weight_end or 0.0) < 0:
            raise ValueError("model.ssl_weight, ctc_weight and pseudo_weight must be >= 0")
        super().__init__(
            encoder,
            vocab,
            lowercase=lowercase,
            final_dropout=final_dropout,
            ctc_loss_reduction=ctc_loss_reduction,
            normalizer=normalizer,
            optimizer=optimizer,
            lr_schedule=lr_schedule,
            freeze=freeze,
            trainable=trainable,
            init_from=init_from,
            init_from_strict=init_from_strict,
            adapters=adapters,
        )
        self.ssl_weight, self.ssl_weight_end = ssl_weight, ssl_weight_end
        self.ctc_weight, self.pseudo_weight = ctc_weight, pseudo_weight
        self.mask = (mask_prob, mask_length, num_negatives)
        self.gumbel_temperature = tuple(float(t) for t in gumbel_temperature)
        self.pseudo_labeler_path = pseudo_labeler
        self._labeler: list[CTCModule] = []  # kept out of the state dict and the optimizer

    def ssl_weight_at(self, step: int, total: int) -> float:
        """The self-supervised loss's weight at ``step`` of ``total``."""
        if self.ssl_weight_end is None or total <= 1:
            return self.ssl_weight
        p = min(1.0, step / (total - 1))
        return self.ssl_weight + (self.ssl_weight_end - self.ssl_weight) * p

    def labeler(self) -> CTCModule | None:
        """The pseudo-labelling model (loaded on first use, frozen, in eval mode)."""
        if self.pseudo_labeler_path is None:
            return None
        if not self._labeler:
            from mmpt.models.ctc_load import load_ctc

            teacher = load_ctc(self.pseudo_labeler_path, flag="model.pseudo_labeler")
            if teacher.vocab.tokens != self.vocab.tokens:
                raise ValueError("model.pseudo_labeler: its vocabulary differs from model.vocab")
            self._labeler.append(teacher.to(self.device).eval().requires_grad_(False))
        return self._labeler[0]

    def _pseudo_labels(self, batch: AudioTextBatch, rows: torch.Tensor) -> torch.Tensor:
        """Labels (R, L) of the teacher's greedy transcripts of ``rows`` (unlabelled)."""
        teacher = self.labeler()
        assert teacher is not None
        with torch.no_grad():
            texts = teacher.transcribe(batch.audio[rows], batch.audio_lengths[rows])
        return pad_labels([self.vocab.encode(t)[0] for t in texts]).to(self.device)

    def training_step(self, batch: AudioTextBatch, batch_idx: int = 0) -> torch.Tensor:
        """Weighted self-supervised + CTC (+ pseudo-label CTC) loss of a mixed batch."""
        bs = len(batch)
        log = partial(self.log, batch_size=bs)
        self.encoder.model.set_gumbel_temperature(
            gumbel_temperature_at(self.gumbel_temperature, self.global_step)
        )
        outputs, mask = pretraining_outputs(
            self.encoder, batch.audio, batch.audio_lengths, *self.mask
        )
        ssl = outputs.loss / mask.sum().clamp(min=1).to(outputs.loss.dtype)
        trainer = self._trainer
        total = int(trainer.estimated_stepping_batches) if trainer is not None else 0
        weight = self.ssl_weight_at(self.global_step, total)
        loss = weight * ssl
        labelled = (batch.text_tokens >= 0).any(dim=1)
        log("train/ssl_loss", ssl.detach())
        log("train/ssl_weight", weight)
        log("train/labelled", labelled.float().mean())
        if labelled.any():
            rows = labelled.nonzero().squeeze(1)
            logits, frames = self(batch.audio[rows], batch.audio_lengths[rows])
            ctc = self.loss(logits, batch.text_tokens[rows], frames)
            loss = loss + self.ctc_weight * ctc
            log("train/ctc_loss", ctc.detach())
        if self.pseudo_labeler_path is not None and not labelled.all():
            rows = (~labelled).nonzero().squeeze(1)
            labels = self._pseudo_labels(batch, rows)
            keep = (labels >= 0).any(dim=1)
            if keep.any():
                rows, labels = rows[keep], labels[keep]
                logits, frames = self(batch.audio[rows], batch.audio_lengths[rows])
                pseudo = self.loss(logits, labels, frames)
                loss = loss + self.pseudo_weight * pseudo
                log("train/pseudo_loss", pseudo.detach())
        log("train/loss", loss, prog_bar=True)
        self.log_ctc_counts(batch)
        return loss


__all__ = ["WavSModule"]

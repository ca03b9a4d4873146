"""Continued wav2vec 2.0 self-supervised pretraining (contrastive + diversity loss) on speech.

Adapting a pretrained speech encoder (XLS-R, wav2vec2-base) to a new language or domain by
continuing its own objective on unlabelled audio, as in Hugging Face's
``run_wav2vec2_pretraining_no_trainer`` example: span masks over the frames, negatives drawn
from the masked frames, the Gumbel temperature decayed every step and the summed loss divided
by the number of masked frames.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import numpy as np
import torch
from lightning.pytorch.cli import OptimizerCallable
from transformers.models.wav2vec2.modeling_wav2vec2 import (
    Wav2Vec2ForPreTrainingOutput,
    _compute_mask_indices,
    _sample_negative_indices,
)

from mmpt.batch import AudioTextBatch
from mmpt.eval.forgetting import eval_prefix
from mmpt.models.adapters import AdapterSpec
from mmpt.models.encoders.lengths import length_mask
from mmpt.models.encoders.wav2vec2 import Wav2Vec2Tower
from mmpt.models.module import MMPTModule
from mmpt.models.schedules import Schedule
from mmpt.preprocess import Preprocess


def span_masks(
    frame_lengths: torch.Tensor,
    num_frames: int,
    mask_prob: float,
    mask_length: int,
    num_negatives: int,
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """wav2vec 2.0 time masks and negative indices for a padded batch (HF's sampling).

    Args:
        frame_lengths: Long tensor (B,), valid frames per row.
        num_frames: Padded frame count T.
        mask_prob: Share of frames that start a masked span (before overlaps).
        mask_length: Frames per span.
        num_negatives: Distractors per masked frame, drawn from the row's masked frames.
        seed: Draw from a numpy RNG seeded with it (the global numpy state is restored);
            None uses the global numpy RNG.

    Returns:
        mask_time_indices: Bool tensor (B, T), True on masked frames (never on padding; at
            least 2 spans per row).
        sampled_negative_indices: Long tensor (B, T, num_negatives), flat (B * T) indices.
    """
    shape = (int(frame_lengths.shape[0]), num_frames)
    sub_mask = length_mask(frame_lengths, num_frames).long().cpu()
    state = np.random.get_state() if seed is not None else None
    try:
        if seed is not None:
            np.random.seed(seed)
        mask = _compute_mask_indices(
            shape, mask_prob, mask_length, attention_mask=sub_mask, min_masks=2
        )
        negatives = _sample_negative_indices(shape, num_negatives, mask)
    finally:
        if state is not None:
            np.random.set_state(state)
    device = frame_lengths.device
    return torch.from_numpy(mask).to(device), torch.from_numpy(negatives).long().to(device)


def gumbel_temperature_at(schedule: tuple[float, float, float], step: int) -> float:
    """``max(high * decay**step, low)`` of a ``(high, low, decay)`` schedule."""
    high, low, decay = schedule
    return max(high * decay**step, low)


def pretraining_outputs(
    tower: Wav2Vec2Tower,
    audio: torch.Tensor,
    lengths: torch.Tensor,
    mask_prob: float,
    mask_length: int,
    num_negatives: int,
    seed: int | None = None,
) -> tuple[Wav2Vec2ForPreTrainingOutput, torch.Tensor]:
    """wav2vec 2.0 pretraining outputs of a padded batch under fresh span masks.

    Args:
        tower: A tower with the pretraining head.
        audio: (B, N) float waveforms, zero-padded.
        lengths: Long tensor (B,), clip lengths in samples.
        mask_prob, mask_length, num_negatives: See :func:`span_masks`.
        seed: Seed of the masks and negatives (validation); None draws them at random.

    Returns:
        outputs: HF outputs; ``loss``, ``contrastive_loss`` and ``diversity_loss`` are
            sums over the masked frames.
        mask_time_indices: Bool tensor (B, T), the masked frames.

    Raises:
        ValueError: A clip too short for ``mask_length``.
    """
    frames = tower.output_lengths(lengths)
    num_frames = int(tower.lengths(audio.shape[1]))
    if int(frames.min()) <= mask_length:
        raise ValueError(
            f"a clip of {int(frames.min())} frames is too short for mask_length "
            f"{mask_length}: raise the datamodule's minimum clip length"
        )
    mask, negatives = span_masks(frames, num_frames, mask_prob, mask_length, num_negatives, seed)
    outputs = tower.model(
        **tower.model_inputs(audio, lengths),
        mask_time_indices=mask,
        sampled_negative_indices=negatives,
    )
    return outputs, mask


class Wav2Vec2PretrainModule(MMPTModule):
    """Continued self-supervised pretraining of an HF ``Wav2Vec2ForPreTraining`` tower.

    Batches are :class:`~mmpt.batch.AudioTextBatch` (text ignored), standardised by the
    datamodule when the tower asks for it. The checkpoint's ``encoder.model.*`` weights are a
    ``Wav2Vec2ForPreTraining`` (save them with ``encoder.save_pretrained`` for other tools).
    """

    def __init__(
        self,
        encoder: Wav2Vec2Tower,
        mask_prob: float = 0.65,
        mask_length: int = 10,
        num_negatives: int = 100,
        gumbel_temperature: tuple[float, float, float] = (2.0, 0.5, 0.999995),
        diversity_loss_weight: float | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: Schedule | None = None,
        freeze: list[str] | None = None,
        trainable: list[str] | None = None,
        init_from: str | list[str] | None = None,
        init_from_strict: bool = True,
        adapters: list[AdapterSpec] | None = None,
    ) -> None:
        """Wrap the tower.

        Args:
            encoder: A :class:`Wav2Vec2Tower` with ``source: hf`` and ``pretraining_head:
                true`` (freeze its CNN with the tower's ``freeze_feature_encoder``).
            mask_prob: Share of frames starting a masked span (0.65 in wav2vec 2.0).
            mask_length: Frames per masked span (10).
            num_negatives: Distractors per masked frame (100).
            gumbel_temperature: (max, min, decay): step s uses ``max(max * decay**s, min)``.
            diversity_loss_weight: Weight of the codebook diversity loss; None keeps the
                model config's (0.1).
            optimizer, lr_schedule, freeze, trainable, init_from, init_from_strict,
                adapters: See :class:`MMPTModule`.

        Raises:
            ValueError: A tower without the pretraining head or not from HF, bad masking.
        """
        super().__init__(
            optimizer, lr_schedule, freeze, trainable, init_from, init_from_strict, adapters
        )
        if encoder.source != "hf" or not encoder.pretraining_head:
            raise ValueError(
                "continued pretraining needs model.encoder with source: hf and "
                "pretraining_head: true (Wav2Vec2ForPreTraining carries the quantizer and loss)"
            )
        if not 0 < mask_prob <= 1 or mask_length < 1 or num_negatives < 1:
            raise ValueError("need 0 < mask_prob <= 1, mask_length >= 1, num_negatives >= 1")
        self.encoder = encoder
        self.mask_prob = mask_prob
        self.mask_length = mask_length
        self.num_negatives = num_negatives
        self.gumbel_temperature = tuple(float(t) for t in gumbel_temperature)
        if diversity_loss_weight is not None:
            encoder.model.config.diversity_loss_weight = float(diversity_loss_weight)

    @property
    def preprocess(self) -> Preprocess:
        """The tower's audio preprocessing (no image, no tokenizer).

        Its ``min_seconds`` is raised to clips of ``mask_length + 1`` frames, the shortest the
        span masking handles; the datamodule skips (and counts) shorter ones.
        """
        audio = self.encoder.audio_preprocess
        lengths = self.encoder.lengths
        min_samples = lengths.min_input() + self.mask_length * lengths.stride
        min_seconds = max(audio.min_seconds, min_samples / audio.sample_rate)
        return Preprocess(
            image=None, tokenizer=None, audio=dataclasses.replace(audio, min_seconds=min_seconds)
        )

    def temperature_at(self, step: int) -> float:
        """Gumbel-softmax temperature of the quantizer at optimizer step ``step``."""
        return gumbel_temperature_at(self.gumbel_temperature, step)

    def forward(
        self, audio: torch.Tensor, lengths: torch.Tensor, seed: int | None = None
    ) -> tuple[Wav2Vec2ForPreTrainingOutput, torch.Tensor]:
        """Pretraining outputs and masks of a padded batch: :func:`pretraining_outputs`."""
        return pretraining_outputs(
            self.encoder, audio, lengths, self.mask_prob, self.mask_length, self.num_negatives, seed
        )

    def _step(self, batch: AudioTextBatch, stage: str, seed: int | None) -> torch.Tensor:
        """Loss per masked frame of ``batch``, logged with its parts under ``stage/``.

        ``stage`` is ``train`` or a validation prefix (``val`` or ``val/<set>``).
        """
        outputs, mask = self(batch.audio, batch.audio_lengths, seed)
        num = mask.sum().clamp(min=1).to(outputs.loss.dtype)
        loss = outputs.loss / num
        bs = len(batch)
        log = partial(self.log, batch_size=bs, sync_dist=stage != "train", add_dataloader_idx=False)
        log(f"{stage}/loss", loss, prog_bar=True)
        parts = {
            "contrastive_loss": outputs.contrastive_loss / num,
            "diversity_loss": outputs.diversity_loss / num,
            "codevector_perplexity": outputs.codevector_perplexity,
        }
        for name, value in parts.items():
            log(f"{stage}/{name}", value.detach())
        if stage == "train":
            self.log("train/masked_frames", num.detach(), batch_size=bs)
        self.log_data_counts(batch, ("skipped",), bs)
        return loss

    def training_step(self, batch: AudioTextBatch, batch_idx: int = 0) -> torch.Tensor:
        """Set the step's Gumbel temperature, return the loss per masked frame."""
        temperature = self.temperature_at(self.global_step)
        self.encoder.model.set_gumbel_temperature(temperature)
        self.log("train/gumbel_temperature", temperature, batch_size=len(batch))
        return self._step(batch, "train", seed=None)

    def validation_step(
        self, batch: AudioTextBatch, batch_idx: int = 0, dataloader_idx: int = 0
    ) -> torch.Tensor:
        """The same loss under masks seeded by ``batch_idx`` (comparable across epochs).

        With several validation sets it is logged under ``val/<set>/``.
        """
        prefix = eval_prefix(self._trainer, "val", dataloader_idx)
        return self._step(batch, prefix, seed=batch_idx)

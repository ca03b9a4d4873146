"""What a model needs done to raw samples: image size and normalisation, and its tokenizer.

A model exposes a :class:`Preprocess` as ``model.preprocess``; the CLI links it into the
datamodule (``link_arguments(..., apply_on="instantiate")``) and it is saved in every
checkpoint, so training, validation and ``mmpt eval`` cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@runtime_checkable
class Tokenizer(Protocol):
    """Turns a list of strings into a padded/truncated id tensor. Must be picklable.

    Attributes:
        context_length: Length L of every output row.
        vocab_size: Number of token ids the matching text tower accepts.
    """

    context_length: int
    vocab_size: int

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """Tokenize ``texts`` into a long tensor (N, context_length)."""
        ...


@dataclass
class ImagePreprocess:
    """Image preprocessing a vision tower was built for.

    RGB images (``bands`` None) arrive as uint8 and are normalised as ``(x / 255 - mean) /
    std``. Multispectral tiles (``bands`` set) arrive as float raw values (e.g. Sentinel-2
    digital numbers) in the model's band order and are normalised as ``(x * scale - mean) /
    std``, with mean/std in scaled units.

    Attributes:
        size: Square input size in pixels (tiles of other sizes are resized to it).
        mean: Per-channel mean subtracted after scaling.
        std: Per-channel std divided by after the mean.
        channels: Input channel count (3 for RGB, ``len(bands)`` for tiles).
        bands: Band names the model takes, in channel order; None for RGB images.
        scale: Multiplier applied to raw tile values before mean/std (1e-4 for Sentinel-2
            digital numbers); unused for RGB.
    """

    size: int = 224
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    channels: int = 3
    bands: tuple[str, ...] | None = None
    scale: float = 1.0


@dataclass
class AudioPreprocess:
    """Audio preprocessing a speech/audio tower was built for.

    Workers decode every clip to mono float32 at ``sample_rate`` (resampling when the file's
    rate differs), crop it to ``max_seconds`` (a random window in training, the start in
    evaluation) and keep its true length; batches are zero-padded to their longest clip. On
    the device, ``normalize`` standardises each clip over its true length (zero mean, unit
    variance, as wav2vec 2.0's feature extractor does with ``do_normalize``); padding stays 0.

    Attributes:
        sample_rate: Rate the tower takes, in Hz (16000 for wav2vec 2.0).
        max_seconds: Longest clip fed to the tower; longer clips are cropped.
        min_seconds: Shorter clips are skipped and counted (a tower's convolutions need a
            minimum length; wav2vec 2.0 needs 400 samples = 25 ms).
        normalize: Per-clip zero-mean unit-variance standardisation.
    """

    sample_rate: int = 16000
    max_seconds: float = 10.0
    min_seconds: float = 0.025
    normalize: bool = True

    @property
    def max_samples(self) -> int:
        """``max_seconds`` in samples."""
        return int(round(self.max_seconds * self.sample_rate))

    @property
    def min_samples(self) -> int:
        """``min_seconds`` in samples (at least 1)."""
        return max(1, int(round(self.min_seconds * self.sample_rate)))


@dataclass
class Preprocess:
    """Everything a datamodule must do to feed a given model.

    Attributes:
        image: Image preprocessing, None for models without an image input.
        tokenizer: Text tokenizer, None for models without a text input.
        audio: Audio preprocessing, None for models without an audio input.
    """

    image: ImagePreprocess | None = field(default_factory=ImagePreprocess)
    tokenizer: Tokenizer | None = None
    audio: AudioPreprocess | None = None


@dataclass
class VLMPreprocess:
    """What a VLM's datamodule needs from the model to turn documents into token rows.

    Attributes:
        tokenizer: The LLM's HF tokenizer (image token included).
        image_token_id: Id of the image placeholder token.
        pad_id: Padding id.
        eos: End-of-sequence string appended after target text.
        policy: Resolution policy (``mmpt.datamodules.resolution``): image -> crops, counts.
        tokens_for_grid: Picklable (h, w) patch grid of one crop -> connector tokens; None
            when the model fuses images by cross-attention (one marker token per image).
        image: Normalisation (mean/std) of the vision tower; None for a speech-only model.
        audio_token_id: Id of the audio placeholder token (models with a speech encoder).
        tokens_for_samples: Picklable clip length in samples -> LLM tokens of the clip
            (encoder frames after the adapter's subsampling).
        audio: Audio preprocessing of the speech encoder.
    """

    tokenizer: Any
    image_token_id: int | None
    pad_id: int
    eos: str
    policy: Any
    tokens_for_grid: Callable[[tuple[int, int]], int] | None
    image: ImagePreprocess | None
    audio_token_id: int | None = None
    tokens_for_samples: Callable[[int], int] | None = None
    audio: AudioPreprocess | None = None

    def image_tokens(self, crops: Any) -> int:
        """LLM tokens of one image's ``ImageCrops`` (1 marker token under fusion)."""
        return 1 if self.tokens_for_grid is None else crops.num_tokens(self.tokens_for_grid)

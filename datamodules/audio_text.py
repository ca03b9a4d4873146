"""Audio clips with captions or transcripts (or none) from WebDataset shards as AudioTextBatch.

Audio-text retrieval (AudioCaps/Clotho-style ``flac`` + ``json:caption``), speech-text pairs
(``json:transcript``) and, for a model without a text tower, self-supervised speech
pretraining on the audio alone.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from mmpt.batch import AudioTextBatch
from mmpt.datamodules.audio import (
    AudioReader,
    LengthBucketBatcher,
    clip_length,
    normalize_audio,
    pad_audio,
)
from mmpt.datamodules.decode import read_captions, read_label
from mmpt.datamodules.image_text import ShardDataModule, SyntheticData
from mmpt.datamodules.shard_faults import MAX_SKIPPED_FRACTION
from mmpt.datamodules.streams import ShardStream, StreamConfig
from mmpt.preprocess import AudioPreprocess, Preprocess, Tokenizer


class AudioTextSample:
    """Raw sample dict -> (clip (N,), captions, label, key). Picklable for workers.

    Args:
        read_audio: Sample -> mono clip at the model's rate, cropped.
        text_key: Caption field(s), see :func:`~mmpt.datamodules.decode.read_field`; None
            reads no text (every sample gets ``[]``).
        label_key: Class id field, None for none.
        all_captions: Keep every caption (evaluation) instead of one at random (training).
    """

    def __init__(
        self,
        read_audio: AudioReader,
        text_key: str | None,
        label_key: str | None,
        all_captions: bool,
    ) -> None:
        self.read_audio, self.text_key = read_audio, text_key
        self.label_key, self.all_captions = label_key, all_captions

    def __call__(self, sample: dict[str, Any]) -> tuple[torch.Tensor, list[str], int, str]:
        """Decode one sample; raises (and so is skipped and counted) when a field is bad."""
        captions: list[str] = []
        if self.text_key is not None:
            captions = read_captions(sample, self.text_key)
            if not self.all_captions:
                captions = [random.choice(captions)]
        clip = self.read_audio(sample)
        return clip, captions, read_label(sample, self.label_key), sample["__key__"]


def item_key(item: tuple[Any, ...]) -> str:
    """The sample key of an :class:`AudioTextSample` item (its last element)."""
    return item[-1]


class AudioTextCollate:
    """Pad clips and tokenize all captions of a batch in one call.

    Args:
        tokenizer: Caption tokenizer; None (a model without text) gives (0, 0) text tokens.
    """

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer

    def __call__(self, items: list[tuple[torch.Tensor, list[str], int, str]]) -> AudioTextBatch:
        """Collate decoded samples into one batch (captions flattened, see AudioTextBatch)."""
        texts = [c for _, caps, _, _ in items for c in caps]
        owner = [i for i, (_, caps, _, _) in enumerate(items) for _ in caps]
        if self.tokenizer is None or not texts:
            tokens = torch.zeros((0, 0), dtype=torch.long)
            owner = []
        else:
            tokens = self.tokenizer(texts)
        audio, lengths = pad_audio([it[0] for it in items])
        return AudioTextBatch(
            audio=audio,
            audio_lengths=lengths,
            text_tokens=tokens,
            text_to_audio=torch.tensor(owner, dtype=torch.long),
            keys=[it[3] for it in items],
            labels=torch.tensor([it[2] for it in items], dtype=torch.long),
        )


class AudioTextDataModule(ShardDataModule):
    """Audio(-text) shards -> :class:`~mmpt.batch.AudioTextBatch`.

    Workers decode each clip (flac, wav, mp3, ogg, opus, m4a) to mono float32 at the model's
    sample rate, resampling other rates, crop it to ``max_seconds`` and skip (and count)
    corrupt, empty and too-short files. Batches are zero-padded with true lengths; training
    batches group clips of similar length (``bucket_batches``) to cut padding. Clips are
    standardised per clip on the device when the model's preprocessing asks for it.

    Args:
        train: Training stream (sources, mixing, epoch size).
        val: Validation stream; every caption of a clip is kept (retrieval with several
            captions per clip, e.g. Clotho's five).
        test: Test stream for ``mmpt test`` and ``mmpt predict`` (read like ``val``; predict
            falls back to ``val`` when no test stream is set).
        batch_size: Clips per batch per rank (the global batch is this x world size).
        val_batch_size: Validation batch size (default: ``batch_size``).
        num_workers: DataLoader worker processes (decode and resampling happen there).
        audio_key: Audio extensions to look for, ``;``-separated; None:
            ``flac;wav;mp3;ogg;opus;m4a``.
        text_key: Caption field: ``txt`` or ``json:<field>``; alternatives ``;``-separated
            (the first present wins). Read only when the model has a tokenizer; None reads
            no text (self-supervised speech pretraining).
        val_text_key: Caption field for validation (e.g. ``json:captions``); default text_key.
        label_key: Class id field (audio classification probes), None for none; a clip
            without it gets -1.
        bucket_batches: Training batches per length-sorted buffer (its decoded clips stay in
            worker memory: ``batch_size x bucket_batches x max_seconds`` float32 samples, e.g.
            64 x 16 x 10 s at 16 kHz = 655 MB per worker; lower it for long clips) (see
            :class:`~mmpt.datamodules.audio.LengthBucketBatcher`); 0 or 1: plain batching.
        seed: Base seed of shard order, shuffles and resampling.
        synthetic: Synthetic set(s) to generate first when missing (one, or a list for mixes).
        preprocess: Filled by the CLI from the model (its ``audio`` part and tokenizer).
        eval_sets: More validation streams by name, read like ``val`` (e.g. the old and the new
            domain in continual pretraining); metrics are logged as ``val/<name>/...``.
        max_skipped_fraction: Unreadable shards an epoch may lose before the run stops
            (see :class:`~mmpt.datamodules.shard_datamodule.ShardDataModule`).
    """

    def __init__(
        self,
        train: StreamConfig | None = None,
        val: StreamConfig | None = None,
        test: StreamConfig | None = None,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        audio_key: str | None = None,
        text_key: str | None = "txt;json:caption;json:transcript;json:text",
        val_text_key: str | None = None,
        label_key: str | None = "json:label",
        bucket_batches: int = 16,
        seed: int = 0,
        synthetic: SyntheticData | list[SyntheticData] | None = None,
        preprocess: Preprocess | None = None,
        eval_sets: dict[str, StreamConfig] | None = None,
        max_skipped_fraction: float = MAX_SKIPPED_FRACTION,
    ) -> None:
        super().__init__(
            train,
            val,
            test,
            batch_size,
            val_batch_size,
            num_workers,
            seed,
            synthetic,
            preprocess,
            eval_sets=eval_sets,
            max_skipped_fraction=max_skipped_fraction,
        )
        self.audio_key, self.text_key, self.label_key = audio_key, text_key, label_key
        self.val_text_key = val_text_key or text_key
        self.bucket_batches = bucket_batches

    def audio_preprocess(self) -> AudioPreprocess:
        """The model's audio preprocessing.

        Raises:
            ValueError: The model gives none (no audio input).
        """
        return self.required_preprocess("audio", "an audio tower")

    def required_fields(self, meta: dict) -> dict[str, str]:
        """The caption field, when the model has a text tower (validation reads captions)."""
        tokenizer = getattr(self.preprocess, "tokenizer", None)
        return {"data.val_text_key": self.val_text_key} if tokenizer and self.val_text_key else {}

    def sample_fn(self, pre: AudioPreprocess, train: bool, text_key: str | None) -> Any:
        """Raw sample -> decoded item, run in the workers (subclasses read other targets)."""
        return AudioTextSample(
            read_audio=AudioReader(pre, train, self.audio_key),
            text_key=text_key,
            label_key=self.label_key,
            all_captions=not train,
        )

    def collate_fn(self, tokenizer: Tokenizer | None) -> Any:
        """Decoded items -> :class:`~mmpt.batch.AudioTextBatch`."""
        return AudioTextCollate(tokenizer)

    def stream(self, config: StreamConfig, train: bool, field: str) -> ShardStream:
        """Build the stream of one split (also used by ``mmpt eval`` on arbitrary shards).

        Args:
            config: Where the split's samples come from.
            train: Random crops and captions, length buckets, dropped last short batch (True)
                or evaluation reading (first ``max_seconds``, all captions, every clip).
            field: Name of the split's setting, quoted by errors (``data.train``, ``--data``).

        Raises:
            ValueError: No audio preprocessing, or a bad stream configuration.
            FileNotFoundError: A source has no shards.
        """
        pre = self.audio_preprocess()
        tokenizer = self.preprocess.tokenizer
        text_key = None  # a model without a text tower reads no text
        if tokenizer is not None:
            text_key = self.text_key if train else self.val_text_key
        sample_fn = self.sample_fn(pre, train, text_key)
        batch_size = self.batch_size if train else self.val_batch_size
        batcher = None
        if train and self.bucket_batches > 1:
            batcher = LengthBucketBatcher(
                batch_size, clip_length, self.bucket_batches, partial=False, key=item_key
            )
        rank, world = self._world()
        return ShardStream(
            config.sources(field),
            config,
            sample_fn,
            self.collate_fn(tokenizer),
            batch_size=batch_size,
            partial=not train,
            seed=self.seed,
            rank=rank,
            world_size=world,
            num_workers=self.num_workers,
            batcher=batcher,
            # one batch per batch_size clips, last short one dropped: plain batching's counts
            batcher_exact=True,
        )

    def normalize(self, batch: AudioTextBatch) -> AudioTextBatch:
        """Standardise each clip (B, N) over its true length when the model asks for it.

        Call once per batch, on the device (see
        :func:`~mmpt.datamodules.audio.normalize_audio`); padding stays 0.
        """
        if self.audio_preprocess().normalize:
            batch.audio = normalize_audio(batch.audio, batch.audio_lengths)
        return batch


__all__ = ["AudioTextCollate", "AudioTextDataModule", "AudioTextSample", "item_key"]

"""Precomputed clip-feature shards (``feat.npy`` per clip, e.g. S3D) -> VideoFeatureBatch.

A sample holds a float ``(T, D)`` array (``feat.npy``, one row per frame or per second) and
a ``json`` with its captions (``captions``), or HowTo100M-style ASR segments (``segments``:
``[{"start", "end", "text"}, ...]`` in seconds, with ``feature_fps`` rows a second).
"""

from __future__ import annotations

import io
import json
import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mmpt.batch import VideoFeatureBatch
from mmpt.datamodules.decode import MissingField, first_key, read_captions
from mmpt.datamodules.shard_datamodule import ShardDataModule
from mmpt.datamodules.shard_faults import MAX_SKIPPED_FRACTION
from mmpt.datamodules.streams import ShardStream, StreamConfig
from mmpt.datamodules.synthetic import SyntheticData
from mmpt.preprocess import Preprocess, Tokenizer


@dataclass
class FeatureClip:
    """One clip's features and captions, from the sample function to the collate.

    Attributes:
        features: (T, D) float32.
        captions: Candidate captions (training: the clip's first, then its neighbours), or
            every reference (evaluation).
        key: The sample's ``__key__``.
    """

    features: torch.Tensor
    captions: list[str]
    key: str


def read_features(data: bytes) -> np.ndarray:
    """``.npy`` bytes -> float32 (T, D); no pickles.

    Raises:
        ValueError: Not a 2-D array of finite numbers with at least one row (a counted skip).
    """
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if arr.ndim != 2 or arr.shape[0] == 0 or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"expected a numeric (T, D) feature array, got {arr.dtype} {arr.shape}")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ValueError("the feature array holds NaN or inf")
    return arr


def segment_window(segment: dict, fps: float, total: int) -> tuple[int, int]:
    """Feature rows ``[lo, hi)`` of an ASR segment (seconds) at ``fps`` rows a second.

    Raises:
        ValueError: The segment lies outside the features.
    """
    lo = max(0, math.floor(float(segment["start"]) * fps + 1e-6))  # 1e-6: float round-off
    hi = min(total, max(lo + 1, math.ceil(float(segment["end"]) * fps - 1e-6)))
    if lo >= total:
        raise ValueError(f"segment {segment} starts after the {total} feature rows")
    return lo, hi


class FeatureSample:
    """Raw sample dict -> :class:`FeatureClip`. Picklable; raising skips (and counts) it.

    Args:
        feature_key: Feature extensions, ``;``-separated.
        text_key: Caption field(s), e.g. ``json:captions;txt``.
        train: Training (random choices, ``candidates`` captions) or evaluation (all).
        candidates: Captions per training clip for MIL-NCE (its own first).
        segments: Training samples are whole videos with ``json:segments``: one segment is
            the clip, and the nearest other segments are its further candidates.
        max_frames: Longer feature sequences are subsampled uniformly to this length.
    """

    def __init__(
        self,
        feature_key: str,
        text_key: str,
        train: bool,
        candidates: int,
        segments: bool,
        max_frames: int,
    ) -> None:
        self.feature_key, self.text_key, self.train = feature_key, text_key, train
        self.candidates, self.segments, self.max_frames = candidates, segments, max_frames

    def __call__(self, sample: dict[str, Any]) -> FeatureClip:
        """Read one clip (a corrupt ``.npy`` or a missing field raises)."""
        meta = json.loads(sample["json"]) if "json" in sample else {}
        feats = read_features(sample[first_key(sample, self.feature_key)])
        if self.train and self.segments:
            segs = meta.get("segments")
            if not segs:
                raise MissingField("data.segments: true needs json:segments")
            s = random.randrange(len(segs))
            lo, hi = segment_window(segs[s], float(meta.get("feature_fps", 1.0)), len(feats))
            feats = feats[lo:hi]
            near = sorted(range(len(segs)), key=lambda j: (abs(j - s), j))
            captions = [str(segs[j]["text"]) for j in near[: self.candidates]]
        else:
            captions = read_captions(sample, self.text_key)
            if self.train:
                first = random.choice(captions)
                rest = [c for c in captions if c is not first]
                random.shuffle(rest)
                captions = [first, *rest][: self.candidates]
        if len(feats) > self.max_frames:
            feats = feats[np.linspace(0, len(feats) - 1, self.max_frames).round().astype(int)]
        return FeatureClip(torch.from_numpy(np.ascontiguousarray(feats)), captions,
                           sample["__key__"])  # fmt: skip


class FeatureCollate:
    """Pad clips to the longest, tokenize all captions. Picklable."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, clips: list[FeatureClip]) -> VideoFeatureBatch:
        """Clips -> :class:`VideoFeatureBatch` (features zero-padded, ``frame_mask`` set)."""
        dims = {c.features.shape[1] for c in clips}
        if len(dims) > 1:
            raise ValueError(f"feature widths differ within a batch: {sorted(dims)}")
        t = max(c.features.shape[0] for c in clips)
        feats = torch.zeros(len(clips), t, dims.pop())
        mask = torch.zeros(len(clips), t, dtype=torch.bool)
        for i, c in enumerate(clips):
            feats[i, : len(c.features)], mask[i, : len(c.features)] = c.features, True
        texts = [t for c in clips for t in c.captions]
        owner = [i for i, c in enumerate(clips) for _ in c.captions]
        return VideoFeatureBatch(
            features=feats,
            frame_mask=mask,
            text_tokens=self.tokenizer(texts),
            text_to_video=torch.tensor(owner, dtype=torch.long),
            captions=texts,
            keys=[c.key for c in clips],
        )


class VideoFeatureDataModule(ShardDataModule):
    """Feature shards (``feat.npy`` + ``json``) -> :class:`~mmpt.batch.VideoFeatureBatch`.

    Streams, mixing, workers, splits and synthetic data work as in the other shard
    datamodules; a corrupt ``.npy`` (not a finite 2-D array) is skipped and counted in
    ``data/skipped``. Evaluation batches hold every caption of ``val_text_key`` per clip.

    Args:
        train: Training stream.
        val: Validation stream.
        test: Test stream.
        batch_size: Clips per batch per rank.
        val_batch_size: Validation batch size (default ``batch_size``).
        num_workers: DataLoader workers.
        feature_key: Feature extensions, ``;``-separated.
        text_key: Caption field for training (a list: the candidates).
        val_text_key: Caption field for evaluation (default ``text_key``).
        candidates: Captions per training clip (MIL-NCE candidates); a clip with fewer gives
            what it has, so keep it at most the smallest count (every rank must hold the same
            number of captions under DDP).
        segments: Training shards hold whole videos with ASR segments (HowTo100M style).
        max_frames: Longest feature sequence (uniformly subsampled beyond).
        seed: Base seed of shard order, shuffles and random choices.
        synthetic: Synthetic set to generate when missing (``kind: video-caption``).
        preprocess: Filled by the CLI from the model (its tokenizer).
        eval_sets: More validation streams by name.
        max_skipped_fraction: Unreadable shards an epoch may lose before the run stops.
    """

    def __init__(
        self,
        train: StreamConfig | None = None,
        val: StreamConfig | None = None,
        test: StreamConfig | None = None,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        feature_key: str = "feat.npy;npy",
        text_key: str = "json:captions;txt",
        val_text_key: str | None = None,
        candidates: int = 1,
        segments: bool = False,
        max_frames: int = 48,
        seed: int = 0,
        synthetic: SyntheticData | list[SyntheticData] | None = None,
        preprocess: Preprocess | None = None,
        eval_sets: dict[str, StreamConfig] | None = None,
        max_skipped_fraction: float = MAX_SKIPPED_FRACTION,
    ) -> None:
        super().__init__(
            train, val, test, batch_size, val_batch_size, num_workers, seed, synthetic,
            preprocess, eval_sets=eval_sets, max_skipped_fraction=max_skipped_fraction,
        )  # fmt: skip
        if candidates < 1 or max_frames < 1:
            raise ValueError(
                f"data.candidates and data.max_frames must be >= 1, got {candidates}, {max_frames}"
            )
        self.feature_key, self.text_key = feature_key, text_key
        self.val_text_key = val_text_key or text_key
        self.candidates, self.segments, self.max_frames = candidates, segments, max_frames

    def required_fields(self, meta: dict) -> dict[str, str]:
        """The evaluation caption field."""
        return {"data.val_text_key": self.val_text_key}

    def stream(self, config: StreamConfig, train: bool, field: str) -> ShardStream:
        """Build the stream of one split (also used by ``mmpt eval univl``)."""
        tokenizer = self.required_preprocess("tokenizer", "a text tower")
        sample_fn = FeatureSample(
            self.feature_key, self.text_key if train else self.val_text_key, train,
            self.candidates, self.segments, self.max_frames,
        )  # fmt: skip
        rank, world = self._world()
        return ShardStream(
            config.sources(field),
            config,
            sample_fn,
            FeatureCollate(tokenizer),
            batch_size=self.batch_size if train else self.val_batch_size,
            partial=not train,
            seed=self.seed,
            rank=rank,
            world_size=world,
            num_workers=self.num_workers,
        )

    def normalize(self, batch: VideoFeatureBatch) -> VideoFeatureBatch:
        """Features are model inputs as they are."""
        return batch

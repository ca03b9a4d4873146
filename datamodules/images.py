"""Image-only shards (RGB or multispectral tiles, optional labels) as ImageBatch: MAE, probes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mmpt.batch import ImageBatch
from mmpt.datamodules.decode import read_label
from mmpt.datamodules.image_text import ShardDataModule, SyntheticData
from mmpt.datamodules.shard_faults import MAX_SKIPPED_FRACTION
from mmpt.datamodules.streams import ShardStream, StreamConfig
from mmpt.datamodules.transforms import ImageReader, normalize_for
from mmpt.preprocess import ImagePreprocess, Preprocess


class ImageSample:
    """Raw sample dict -> (image (C, H, W), label, key). Picklable for workers.

    Args:
        read_image: Sample -> image tensor (:class:`~mmpt.datamodules.transforms.ImageReader`).
        label_key: Class id field; a sample without it gets -1. None: every label is -1.
    """

    def __init__(
        self, read_image: Callable[[dict[str, Any]], torch.Tensor], label_key: str | None
    ) -> None:
        self.read_image, self.label_key = read_image, label_key

    def __call__(self, sample: dict[str, Any]) -> tuple[torch.Tensor, int, str]:
        """Decode one sample; raises (and so is skipped and counted) when a field is bad."""
        return self.read_image(sample), read_label(sample, self.label_key), sample["__key__"]


def collate_images(items: list[tuple[torch.Tensor, int, str]]) -> ImageBatch:
    """Stack decoded samples into an :class:`~mmpt.batch.ImageBatch`."""
    return ImageBatch(
        images=torch.stack([it[0] for it in items]),
        labels=torch.tensor([it[1] for it in items], dtype=torch.long),
        keys=[it[2] for it in items],
    )


class ImageDataModule(ShardDataModule):
    """Image shards -> :class:`~mmpt.batch.ImageBatch` (no text).

    RGB images (uint8 in the batch) for an RGB model, or multispectral tiles (float32 raw
    values, the model's bands picked by name, see :mod:`mmpt.datamodules.tiles`) for a model
    whose preprocessing names ``bands``. Both are normalised per batch on the device.

    Args:
        train: Training stream (sources, mixing, epoch size).
        val: Validation stream.
        test: Test stream for ``mmpt test`` and ``mmpt predict`` (falls back to ``val``).
        batch_size: Samples per batch per rank (the global batch is this x world size).
        val_batch_size: Validation batch size (default: ``batch_size``).
        num_workers: DataLoader worker processes (decode happens there).
        image_key: Image extensions to look for, ``;``-separated; None: ``jpg;jpeg;png;webp``
            for RGB models, ``npy;tif;tiff`` for multispectral ones.
        label_key: Class id field (a sample without it gets -1), None for none.
        train_crop_scale: Area range of training crops; None: 0.9-1.0 for RGB, 0.5-1.0 for
            tiles (MAE uses 0.2-1.0).
        train_flip: Random flips in training: horizontal for RGB, horizontal and vertical for
            tiles.
        seed: Base seed of shard order, shuffles and resampling.
        synthetic: Synthetic set(s) to generate first when missing (one, or a list for mixes).
        preprocess: Filled by the CLI from the model (only its ``image`` part is used).
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
        batch_size: int = 256,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        image_key: str | None = None,
        label_key: str | None = "json:label",
        train_crop_scale: tuple[float, float] | None = None,
        train_flip: bool = True,
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
        self.image_key, self.label_key = image_key, label_key
        self.train_crop_scale, self.train_flip = train_crop_scale, train_flip

    def image_preprocess(self) -> ImagePreprocess:
        """The model's image preprocessing.

        Raises:
            ValueError: The model gives none (no image input).
        """
        return self.required_preprocess("image", "an image input")

    def stream(self, config: StreamConfig, train: bool, field: str) -> ShardStream:
        """Build the stream of one split (also used by the probe CLI on arbitrary shards).

        Args:
            config: Where the split's samples come from.
            train: Random crops, dropped last short batch (True) or evaluation reading.
            field: Name of the split's setting, quoted by errors (``data.train``, ``--data``).

        Raises:
            ValueError: No image preprocessing, or a bad stream configuration.
            FileNotFoundError: A source has no shards.
        """
        pre = self.image_preprocess()
        crop_scale = tuple(self.train_crop_scale) if self.train_crop_scale else None
        read = ImageReader(pre, train, self.image_key, pre.size, crop_scale, self.train_flip)
        rank, world = self._world()
        return ShardStream(
            config.sources(field),
            config,
            ImageSample(read, self.label_key),
            collate_images,
            batch_size=self.batch_size if train else self.val_batch_size,
            partial=not train,
            seed=self.seed,
            rank=rank,
            world_size=world,
            num_workers=self.num_workers,
        )

    def normalize(self, batch: ImageBatch) -> ImageBatch:
        """Worker pixels (B, C, H, W) -> normalised float32 with the model's scale/mean/std.

        Call once per batch (raw tiles are float already, so a second call would rescale).
        """
        batch.images = normalize_for(batch.images, self.image_preprocess())
        return batch


__all__ = ["ImageDataModule", "ImageSample", "collate_images"]

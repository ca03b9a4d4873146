"""Dense-task shards (``rs-dense`` format) -> DenseBatch: semantic masks, instances, oriented boxes.

Per-task sources (e.g. SAMRS's segmentation, instance and rotated-box sets) mix by weight in one
stream (``data.train.urls`` a list + ``weights`` + ``resampled: true``); every sample keeps only
its own annotations and :class:`~mmpt.batch.DenseBatch` says which it has.
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmpt.batch import DenseBatch
from mmpt.datamodules.image_text import ShardDataModule, SyntheticData
from mmpt.datamodules.shard_faults import MAX_SKIPPED_FRACTION
from mmpt.datamodules.streams import ShardStream, StreamConfig
from mmpt.datamodules.transforms import normalize_for
from mmpt.preprocess import ImagePreprocess, Preprocess
from mmpt.shards.dense_format import decode_dense_sample

IGNORE = 255


def _boxes_of(masks: torch.Tensor) -> torch.Tensor:
    """(M, 4) xyxy boxes around (M, H, W) masks (pixel edges: a 1-pixel mask is 1 wide)."""
    if masks.shape[0] == 0:
        return torch.zeros((0, 4))
    from torchvision.ops import masks_to_boxes

    return masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0])


class DenseSample:
    """Raw sample -> dict of tensors at ``size`` x ``size``, flipped at random in training.

    A square tile of another size is resized (image bilinear, masks nearest, boxes scaled);
    a non-square tile is refused (skipped and counted): cut tiles with ``mmpt data build
    --kind rs-dense --tile-size``.

    Args:
        size: The model's input side.
        train: Random horizontal and vertical flips (overhead imagery has no up or left).
        flip: Flip in training.
    """

    def __init__(self, size: int, train: bool, flip: bool = True) -> None:
        self.size, self.train, self.flip = size, train, flip

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Decode, resize and flip one sample."""
        d = decode_dense_sample(sample)
        h, w = d["image"].shape[:2]
        image = torch.from_numpy(np.array(d["image"])).permute(2, 0, 1)
        mask = torch.from_numpy(d["mask"].astype(np.int64)) if d["mask"] is not None else None
        inst = d["instances"]
        imasks = torch.from_numpy(inst["masks"]) if inst is not None else None
        obbs = d["obbs"]
        boxes5 = torch.from_numpy(obbs["boxes"]).clone() if obbs is not None else None
        if (h, w) != (self.size, self.size):
            if h != w:
                raise ValueError(
                    f"dense sample {d['key']} is {h}x{w}, the model takes {self.size}x{self.size}:"
                    " cut square tiles (mmpt data build --kind rs-dense --tile-size)"
                )
            s, size = self.size / h, (self.size, self.size)
            image = (
                F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=s < 1)[0]
                .round()
                .clamp(0, 255)
                .to(torch.uint8)
            )
            if mask is not None:
                mask = F.interpolate(mask[None, None].float(), size=size)[0, 0].long()
            if imasks is not None and imasks.shape[0]:
                imasks = F.interpolate(imasks[None].float(), size=size)[0].to(torch.uint8)
            if imasks is not None and not imasks.shape[0]:
                imasks = torch.zeros((0, *size), dtype=torch.uint8)
            if boxes5 is not None:
                boxes5[:, :4] *= s
        for dim in (-1, -2):
            if not (self.train and self.flip and random.random() < 0.5):
                continue
            image = image.flip(dim)
            mask = mask.flip(dim) if mask is not None else None
            imasks = imasks.flip(dim) if imasks is not None else None
            if boxes5 is not None:
                axis = 0 if dim == -1 else 1
                boxes5[:, axis] = self.size - boxes5[:, axis]
                boxes5[:, 4] = -boxes5[:, 4]
        out: dict[str, Any] = {"key": d["key"], "image": image.contiguous(), "mask": mask}
        out["instances"] = None
        if imasks is not None:
            keep = imasks.flatten(1).any(1).bool()  # an instance resized away is dropped
            imasks = imasks[keep].contiguous()
            out["instances"] = {
                "masks": imasks,
                "labels": torch.from_numpy(inst["labels"])[keep],
                "boxes": _boxes_of(imasks),
            }
        out["obbs"] = None
        if boxes5 is not None:
            boxes5[:, 4] = torch.remainder(boxes5[:, 4] + math.pi / 2, math.pi) - math.pi / 2
            out["obbs"] = {
                "boxes": boxes5,
                "labels": torch.from_numpy(obbs["labels"]),
                "difficult": torch.from_numpy(obbs["difficult"]),
            }
        return out


def collate_dense(items: list[dict[str, Any]]) -> DenseBatch:
    """Stack decoded dense samples into a :class:`~mmpt.batch.DenseBatch`."""
    images = torch.stack([it["image"] for it in items])
    h, w = images.shape[-2:]
    masks = torch.stack(
        [it["mask"] if it["mask"] is not None else torch.full((h, w), IGNORE) for it in items]
    )
    return DenseBatch(
        images=images,
        masks=masks,
        has_mask=torch.tensor([it["mask"] is not None for it in items]),
        instances=[it["instances"] for it in items],
        obbs=[it["obbs"] for it in items],
        keys=[it["key"] for it in items],
    )


class DenseDataModule(ShardDataModule):
    """``rs-dense`` shards (:mod:`mmpt.shards.dense_format`) -> :class:`~mmpt.batch.DenseBatch`.

    Args:
        train: Training stream; for multi-task pretraining a list of per-task sources with
            ``weights`` and ``resampled: true``.
        val: Validation stream (samples with every annotation give every metric).
        test: Test stream (falls back to ``val``).
        batch_size: Samples per batch per rank.
        val_batch_size: Validation batch size (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        train_flip: Random horizontal and vertical flips in training.
        seed: Base seed of shard order, shuffles and resampling.
        synthetic: Synthetic set(s) to generate first when missing (``kind: rs-dense``).
        preprocess: Filled by the CLI from the model (its ``image`` part).
        eval_sets: More validation streams by name.
        max_skipped_fraction: See :class:`~mmpt.datamodules.shard_datamodule.ShardDataModule`.
    """

    def __init__(
        self,
        train: StreamConfig | None = None,
        val: StreamConfig | None = None,
        test: StreamConfig | None = None,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 4,
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
        self.train_flip = train_flip

    def image_preprocess(self) -> ImagePreprocess:
        """The model's image preprocessing (RGB)."""
        pre = self.required_preprocess("image", "an image tower")
        if pre.bands is not None:
            raise ValueError("DenseDataModule reads RGB PNG tiles; the model takes bands")
        return pre

    def stream(self, config: StreamConfig, train: bool, field: str) -> ShardStream:
        """The stream of one split (``field`` names it in errors)."""
        pre = self.image_preprocess()
        rank, world = self._world()
        return ShardStream(
            config.sources(field),
            config,
            DenseSample(pre.size, train, self.train_flip),
            collate_dense,
            batch_size=self.batch_size if train else self.val_batch_size,
            partial=not train,
            seed=self.seed,
            rank=rank,
            world_size=world,
            num_workers=self.num_workers,
        )

    def normalize(self, batch: DenseBatch) -> DenseBatch:
        """uint8 pixels -> normalised float32 with the model's mean/std (once per batch)."""
        batch.images = normalize_for(batch.images, self.image_preprocess())
        return batch


__all__ = ["DenseDataModule", "DenseSample", "collate_dense"]

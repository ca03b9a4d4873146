"""Synthetic remote-sensing dense set: fields, roads, rotated buildings and vehicles (MTP)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from mmpt.shards.dense_format import TASKS, encode_dense_sample, segmentation_mask
from mmpt.synth.common import check_minimums, split_folders, split_writer

GENERATOR_NAME = "mmpt.synth.rs_dense"
#: Semantic classes (mask values).
SEMANTIC_CLASSES = ("background", "field", "road", "building", "vehicle")
#: Object classes of the instance and oriented-box annotations.
OBJECT_CLASSES = ("building", "vehicle")
_SPLIT_STREAM = {"train": 0, "train-semseg": 1, "train-instance": 2, "train-rotated": 3, "val": 4}
_ROOFS = ((185, 80, 60), (200, 195, 185), (150, 60, 50), (120, 125, 140))
_CARS = ((235, 235, 235), (40, 60, 200), (210, 40, 40), (240, 210, 40))


def _corners(cx: float, cy: float, w: float, h: float, a: float) -> list[tuple[float, float]]:
    c, s = math.cos(a), math.sin(a)
    local = ((-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2))
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in local]


def _polygon_mask(points: list[tuple[float, float]], size: int) -> np.ndarray:
    """The polygon rasterised as its COCO instance mask is (so mask and instance agree)."""
    return segmentation_mask([[v for p in points for v in p]], size, size)


def render_dense_tile(rng: np.random.Generator, size: int) -> dict[str, Any]:
    """One tile with its semantic mask, instances and oriented boxes.

    Bare ground, 0-2 striped crop fields, 0-2 straight roads, 1-3 rotated buildings and 2-5
    rotated vehicles (objects never overlap each other), a global illumination gain and pixel
    noise.

    Returns:
        ``image`` (size, size, 3) uint8, ``mask`` (size, size) uint8 (:data:`SEMANTIC_CLASSES`),
        ``instances`` and ``obbs`` lists (labels into :data:`OBJECT_CLASSES`).
    """
    s = size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)
    image = np.empty((s, s, 3), np.float64)
    image[:] = np.array([150, 120, 88]) + rng.normal(0, 10, 3)
    image += rng.normal(0, 6, (s, s, 1))
    mask = np.zeros((s, s), np.uint8)
    for _ in range(rng.integers(0, 3)):  # striped fields
        x0, y0 = rng.integers(0, s // 2, 2)
        x1, y1 = x0 + rng.integers(s // 4, s // 2 + 1, 2)
        region = (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
        theta, period = rng.uniform(0, np.pi), rng.uniform(3, 6)
        stripe = np.floor(2 * (xx * np.cos(theta) + yy * np.sin(theta)) / period) % 2
        green = np.array([70, 140, 55]) + rng.normal(0, 8, 3)
        colour = green[None, None] * (0.8 + 0.25 * stripe[..., None])
        image = np.where(region[..., None], colour, image)
        mask[region] = 1
    for _ in range(rng.integers(0, 3)):  # roads: straight bands across the tile
        theta, width = rng.uniform(0, np.pi), rng.uniform(2.5, 4.5)
        cx, cy = rng.uniform(0.2 * s, 0.8 * s, 2)
        dist = np.abs((xx - cx) * np.sin(theta) - (yy - cy) * np.cos(theta))
        road = dist <= width / 2
        image[road] = np.array([105, 105, 108]) + rng.normal(0, 3, 3)
        mask[road] = 2
    occupied = np.zeros((s, s), bool)
    instances, obbs = [], []
    objects = [(0, rng.integers(1, 4)), (1, rng.integers(2, 6))]
    for label, count in objects:
        for _ in range(count):
            for _try in range(20):
                if label == 0:
                    w, h = rng.uniform(0.16, 0.3) * s, rng.uniform(0.12, 0.2) * s
                else:
                    w, h = rng.uniform(0.09, 0.14) * s, rng.uniform(0.05, 0.07) * s
                a = rng.uniform(-np.pi / 2, np.pi / 2)
                cx, cy = rng.uniform(w / 2 + 1, s - w / 2 - 1, 2)
                pts = _corners(cx, cy, w, h, a)
                obj = _polygon_mask(pts, s).astype(bool)
                if obj.sum() >= 4 and not (obj & occupied).any():
                    break
            else:
                continue
            occupied |= obj
            palette = _ROOFS if label == 0 else _CARS
            colour = np.array(palette[rng.integers(len(palette))]) + rng.normal(0, 6, 3)
            ridge = 0.9 + 0.1 * (((xx - cx) * math.cos(a) + (yy - cy) * math.sin(a)) > 0)
            image = np.where(
                obj[..., None], colour * (ridge[..., None] if label == 0 else 1), image
            )
            mask[obj] = 3 + label
            flat = [v for p in pts for v in p]
            instances.append({"label": label, "segmentation": [flat]})
            obbs.append({"label": label, "obb": [cx, cy, max(w, h), min(w, h), a]})
    image = image * rng.uniform(0.85, 1.15) + rng.normal(0, 4, image.shape)
    return {
        "image": np.clip(np.rint(image), 0, 255).astype(np.uint8),
        "mask": mask,
        "instances": instances,
        "obbs": obbs,
    }


def synth_rs_dense(
    out: str | Path,
    train_samples: int = 600,
    val_samples: int = 100,
    image_size: int = 64,
    seed: int = 0,
    samples_per_shard: int = 500,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the synthetic dense set: one training source per task and fully labelled sets.

    ``out/train`` and ``out/val`` hold tiles with all three annotations; ``out/train-semseg``
    holds tiles with only the semantic mask, ``out/train-instance`` only instances,
    ``out/train-rotated`` only oriented boxes (``train_samples`` each, different tiles: MTP's
    per-task sources). Samples follow :mod:`mmpt.shards.dense_format`; ``index.json``
    ``meta`` holds ``semantic_classes``, ``object_classes`` and ``tasks``.

    Args:
        out: Output folder.
        train_samples: Tiles per training source.
        val_samples: Validation tiles.
        image_size: Tile side in pixels (at least 32).
        seed: Same seed gives byte-identical shards.
        samples_per_shard: Tiles per ``.tar`` shard.
        overwrite: Replace shards in the split folders that this generator did not write.

    Returns:
        Dict with ``out``, each split folder, ``<split>_samples`` and ``<split>_shards``.
    """
    check_minimums(
        {
            "train_samples": (train_samples, 1),
            "val_samples": (val_samples, 1),
            "image_size": (image_size, 32),
        }
    )
    out = Path(out)
    folders = split_folders(out, _SPLIT_STREAM, overwrite, GENERATOR_NAME)
    result: dict[str, Any] = {"out": str(out)}
    for split, folder in folders.items():
        count = val_samples if split == "val" else train_samples
        tasks = TASKS if split in ("train", "val") else (split.removeprefix("train-"),)
        meta = {
            "semantic_classes": list(SEMANTIC_CLASSES),
            "object_classes": list(OBJECT_CLASSES),
            "tasks": list(tasks),
            "split": split,
            "generator": {"name": GENERATOR_NAME, "seed": seed, "image_size": image_size},
        }
        rng = np.random.default_rng([seed, _SPLIT_STREAM[split]])
        with split_writer(result, split, folder, count, samples_per_shard, ["image"], meta) as w:
            for i in range(count):
                tile = render_dense_tile(rng, image_size)
                w.write(
                    encode_dense_sample(
                        f"{i:09d}",
                        tile["image"],
                        tile["mask"] if "semseg" in tasks else None,
                        tile["instances"] if "instance" in tasks else None,
                        tile["obbs"] if "rotated" in tasks else None,
                        source=f"synthetic/{split}/{i:09d}",
                    )
                )
    return result


__all__ = ["OBJECT_CLASSES", "SEMANTIC_CLASSES", "render_dense_tile", "synth_rs_dense"]

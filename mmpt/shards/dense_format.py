"""The ``rs-dense`` sample format: an image with a PNG class mask, instances and oriented boxes.

A sample is ``{key}.png`` (RGB), optionally ``{key}.mask.png`` (8-bit class ids, 255 = no
label) and ``{key}.json`` with ``height``, ``width`` and, when the sample has them,
``instances`` (``[{"label": int, "segmentation": <COCO polygons or RLE>}]``) and ``obbs``
(``[{"label": int, "obb": [cx, cy, w, h, angle], "difficult": bool}]``, angle in radians,
long-edge form). A sample carries only the annotations of its tasks, so per-task sources can be
mixed (MTP).
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from PIL import Image

#: Extensions of a dense sample.
IMAGE_EXT, MASK_EXT = "png", "mask.png"
#: The tasks and what marks a sample as having them.
TASKS = ("semseg", "instance", "rotated")


def png_bytes(array: np.ndarray) -> bytes:
    """Lossless PNG of an (H, W, 3) or (H, W) uint8 array."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array.astype(np.uint8))).save(buf, format="PNG")
    return buf.getvalue()


def encode_dense_sample(
    key: str,
    image: np.ndarray,
    mask: np.ndarray | None = None,
    instances: list[dict[str, Any]] | None = None,
    obbs: list[dict[str, Any]] | None = None,
    **meta: Any,
) -> dict[str, Any]:
    """A shard sample of the ``rs-dense`` format.

    Args:
        key: Sample key.
        image: (H, W, 3) uint8 RGB.
        mask: (H, W) uint8 class ids (255 = no label), or None (no semantic annotation).
        instances: ``{"label", "segmentation"}`` dicts (COCO polygons ``[[x0, y0, x1, ...]]``
            or RLE), or None (no instance annotation; ``[]`` is an annotated empty image).
        obbs: ``{"label", "obb", "difficult"}`` dicts, or None (no oriented boxes).
        **meta: More json fields (``source`` ...).

    Returns:
        The sample dict for :class:`~mmpt.shards.writer.ShardWriter`.
    """
    h, w = image.shape[:2]
    info: dict[str, Any] = {"height": int(h), "width": int(w), **meta}
    sample: dict[str, Any] = {"__key__": key, IMAGE_EXT: png_bytes(image)}
    if mask is not None:
        if mask.shape != (h, w):
            raise ValueError(f"sample {key}: mask {mask.shape} does not match image {(h, w)}")
        sample[MASK_EXT] = png_bytes(mask)
    if instances is not None:
        info["instances"] = instances
    if obbs is not None:
        info["obbs"] = [{**o, "obb": [float(v) for v in o["obb"]]} for o in obbs]
    sample["json"] = info
    return sample


def segmentation_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """(H, W) uint8 mask of a COCO segmentation (polygon list, RLE or uncompressed RLE)."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        rles = mask_utils.frPyObjects(segmentation, height, width)
        rle = mask_utils.merge(rles) if rles else None
        if rle is None:
            return np.zeros((height, width), np.uint8)
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    return mask_utils.decode(rle).astype(np.uint8)


def decode_dense_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Decode a raw ``rs-dense`` sample into arrays.

    Returns:
        ``image`` (H, W, 3) uint8, ``mask`` (H, W) or None, ``instances`` (``masks``
        (M, H, W) uint8, ``labels`` (M,)) or None, ``obbs`` (``boxes`` (M, 5), ``labels``,
        ``difficult``) or None, ``key``.

    Raises:
        KeyError: No image or json (the sample is skipped and counted).
        ValueError: Mask size differs from the image, or a malformed annotation.
    """
    key = sample.get("__key__", "?")
    if IMAGE_EXT not in sample or "json" not in sample:
        raise KeyError(f"rs-dense sample {key} needs .{IMAGE_EXT} and .json")
    image = np.asarray(Image.open(io.BytesIO(sample[IMAGE_EXT])).convert("RGB"))
    h, w = image.shape[:2]
    raw = sample["json"]
    info = json.loads(raw) if isinstance(raw, bytes | str) else dict(raw)
    mask = None
    if MASK_EXT in sample:
        mask = np.asarray(Image.open(io.BytesIO(sample[MASK_EXT])))
        if mask.shape != (h, w):
            raise ValueError(f"sample {key}: mask {mask.shape} does not match image {(h, w)}")
    instances = None
    if "instances" in info:
        inst = info["instances"]
        masks = [segmentation_mask(i["segmentation"], h, w) for i in inst]
        instances = {
            "masks": np.stack(masks) if masks else np.zeros((0, h, w), np.uint8),
            "labels": np.array([int(i["label"]) for i in inst], np.int64),
        }
    obbs = None
    if "obbs" in info:
        boxes = [o["obb"] for o in info["obbs"]]
        obbs = {
            "boxes": np.array(boxes, np.float32).reshape(-1, 5),
            "labels": np.array([int(o["label"]) for o in info["obbs"]], np.int64),
            "difficult": np.array([bool(o.get("difficult", False)) for o in info["obbs"]]),
        }
    return {"key": key, "image": image, "mask": mask, "instances": instances, "obbs": obbs}


__all__ = [
    "IMAGE_EXT",
    "MASK_EXT",
    "TASKS",
    "decode_dense_sample",
    "encode_dense_sample",
    "png_bytes",
    "segmentation_mask",
]

"""Image transforms: fused crop + resize in the workers (uint8 out), per-batch normalisation.

RGB images and multispectral tiles (:mod:`mmpt.datamodules.tiles`) share one entry point each
side: :class:`ImageReader` in the workers and :func:`normalize_for` on the device.

Keeping images uint8 until they reach the accelerator makes worker output and host->device
copies 4x smaller than float32. Normalising a whole batch on the GPU is one fused elementwise
pass; on CPU it costs about as much as per-sample normalisation (docs/benchmarks.md).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmpt.datamodules.decode import decode_image, first_key
from mmpt.datamodules.tiles import (
    TILE_KEYS,
    TileTransform,
    normalize_tiles,
    read_tile,
    select_bands,
)
from mmpt.preprocess import ImagePreprocess

RGB_KEYS = "jpg;jpeg;png;webp"


class ImageTransform:
    """PIL image -> uint8 tensor (3, size, size).

    Train: random resized crop (area scale 0.9-1.0 and aspect 3/4-4/3, as open_clip); no
    flips by default, since captions often say left and right. Eval: the centred square of
    the short side, i.e. resize-short-side + centre-crop. Either way the crop and the bicubic
    (antialiased) resize are one ``Image.resize(box=...)`` call.

    Args:
        size: Output side in pixels.
        train: Random crop (True) or centre crop (False).
        scale: Area range of the random crop.
        ratio: Aspect-ratio range of the random crop.
        flip: Random horizontal flips in training (image-only data, e.g. MAE).
    """

    def __init__(
        self,
        size: int,
        train: bool,
        scale: tuple[float, float] = (0.9, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = False,
    ) -> None:
        self.size, self.train, self.scale, self.ratio = size, train, scale, ratio
        self.flip = flip

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The (left, top, right, bottom) region to resize into the output."""
        if self.train:
            area = width * height
            log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
            for _ in range(10):
                target = area * random.uniform(*self.scale)
                aspect = math.exp(random.uniform(*log_ratio))
                w = math.sqrt(target * aspect)
                h = math.sqrt(target / aspect)
                if 0 < w <= width and 0 < h <= height:
                    left = random.uniform(0, width - w)
                    top = random.uniform(0, height - h)
                    return (left, top, left + w, top + h)
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        return (left, top, left + side, top + side)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """Crop and resize ``img``; returns uint8 (3, size, size)."""
        box = self.crop_box(*img.size)
        out = img.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)
        if self.train and self.flip and random.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        arr = np.asarray(out.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def image_transform(pre: ImagePreprocess, train: bool) -> ImageTransform:
    """The worker-side transform for a model's preprocessing (uint8 out)."""
    return ImageTransform(pre.size, train)


def normalize_images(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Normalise a batch: uint8 (B, C, H, W) -> float32 ``(x / 255 - mean) / std``.

    Float input is returned unchanged (it is already normalised).
    """
    if images.dtype != torch.uint8:
        return images
    m = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float().div_(255.0) - m).div_(s)


def normalize_for(images: torch.Tensor, pre: ImagePreprocess) -> torch.Tensor:
    """Normalise a batch (B, C, H, W) for a model's image preprocessing.

    RGB (``pre.bands`` None): uint8 -> float32 ``(x / 255 - mean) / std`` (float passes
    through, see :func:`normalize_images`). Tiles: raw float -> ``(x * scale - mean) / std``
    (:func:`~mmpt.datamodules.tiles.normalize_tiles`; call once).

    Raises:
        ValueError: The batch's channel count is not ``pre.channels``.
    """
    if images.shape[1] != pre.channels:
        what = f"bands {list(pre.bands)}" if pre.bands is not None else "RGB"
        raise ValueError(
            f"images have {images.shape[1]} channels but the model takes {pre.channels} "
            f"({what}); check the data's bands against the model's preprocessing"
        )
    if pre.bands is not None:
        return normalize_tiles(images, pre)
    return normalize_images(images, pre.mean, pre.std)


class ImageReader:
    """Raw sample dict -> the model's image tensor (C, size, size). Picklable for workers.

    RGB models (``pre.bands`` None): decode ``jpg;jpeg;png;webp`` and crop to uint8
    (:class:`ImageTransform`). Multispectral models: read ``npy;tif;tiff``, pick the model's
    bands by name and crop to float32 raw units (:class:`~mmpt.datamodules.tiles.TileTransform`).

    Args:
        pre: The model's image preprocessing.
        train: Training (random) or evaluation (deterministic) crops.
        image_key: Extensions to look for, ``;``-separated; None: by mode, as above.
        min_size: Smallest decoded short side an RGB JPEG needs (default ``pre.size``).
        crop_scale: Area range of training crops; None: 0.9-1.0 (RGB, as open_clip), 0.5-1.0
            (tiles).
        flip: Random flips in training (horizontal for RGB, horizontal and vertical for
            tiles); None: none for RGB (captions say left and right), both for tiles.
    """

    def __init__(
        self,
        pre: ImagePreprocess,
        train: bool,
        image_key: str | None = None,
        min_size: int | None = None,
        crop_scale: tuple[float, float] | None = None,
        flip: bool | None = None,
    ) -> None:
        self.bands = pre.bands
        self.image_key = image_key or (TILE_KEYS if pre.bands is not None else RGB_KEYS)
        self.min_size = pre.size if min_size is None else min_size
        self.transform: ImageTransform | TileTransform
        if pre.bands is not None:
            scale = crop_scale or (0.5, 1.0)
            self.transform = TileTransform(pre.size, train, scale, flip=flip is not False)
        else:
            scale = crop_scale or (0.9, 1.0)
            self.transform = ImageTransform(pre.size, train, scale, flip=bool(flip))

    def __call__(self, sample: dict[str, Any]) -> torch.Tensor:
        """The sample's image: uint8 (3, size, size) or float32 (len(bands), size, size).

        Raises:
            BandMismatch: The tile lacks the model's bands (stops the run).
            Exception: Anything else (missing field, undecodable bytes) marks a bad sample.
        """
        if self.bands is None:
            data = sample[first_key(sample, self.image_key)]
            return self.transform(decode_image(data, self.min_size))
        array, have = read_tile(sample, self.image_key)
        return self.transform(select_bands(array, have, self.bands, sample["__key__"]))

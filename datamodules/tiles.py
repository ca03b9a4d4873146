"""Multispectral tiles: read ``.npy``/``.tif`` samples, match bands by name, crop and normalise.

A tile sample in a WebDataset shard is ``{key}.npy`` (``np.save`` of a (C, H, W) array,
uint16, int16 or float32) or ``{key}.tif``/``{key}.tiff`` (a (Geo)TIFF), plus ``{key}.json``
with optional ``bands`` (names), ``sensor`` (a key of :data:`mmpt.bands.SENSORS`),
``season``, ``label`` and ``caption``. Tiles stay in raw units (e.g. Sentinel-2 digital
numbers) through the workers; :func:`normalize_tiles` scales and normalises whole batches on
the device.
"""

from __future__ import annotations

import io
import json
import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmpt.bands import SENSORS
from mmpt.datamodules.decode import first_key
from mmpt.datamodules.stages import DataError
from mmpt.preprocess import ImagePreprocess

TILE_KEYS = "npy;tif;tiff"


class BandMismatch(DataError):
    """A tile does not have the bands the model takes (stops the run, never a skip)."""


def tile_band_names(meta: dict[str, Any]) -> list[str] | None:
    """Band names of a tile from its json: ``bands``, else the ``sensor``'s, else None.

    Raises:
        DataError: ``sensor`` names no sensor mmpt knows.
    """
    if meta.get("bands"):
        return [str(b) for b in meta["bands"]]
    sensor = meta.get("sensor")
    if sensor is None:
        return None
    if str(sensor).lower() not in SENSORS:
        raise DataError(
            f"unknown sensor {sensor!r} in a tile's json; known: {', '.join(SENSORS)} "
            "(or give the band names as a json `bands` list)"
        )
    return list(SENSORS[str(sensor).lower()])


def _tif_array(data: bytes, num_bands: int | None) -> np.ndarray:
    """A TIFF's pixels as (C, H, W); see :func:`read_tile` for the layout rule."""
    import tifffile

    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = tif.pages[0]
        array = tif.asarray()
        contig = page.samplesperpixel > 1 and page.planarconfig == tifffile.PLANARCONFIG.CONTIG
    while array.ndim > 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 2:
        return array[None]
    if array.ndim != 3:
        raise ValueError(f"a tif tile must be 2-D or 3-D, got shape {array.shape}")
    if contig:
        array = np.moveaxis(array, -1, 0)
    if num_bands is not None and array.shape[0] != num_bands:
        other = np.moveaxis(array, 0, -1) if contig else np.moveaxis(array, -1, 0)
        if other.shape[0] == num_bands:
            array = other
    return array


def read_tile(
    sample: dict[str, Any], image_key: str = TILE_KEYS
) -> tuple[np.ndarray, list[str] | None]:
    """Read a tile sample's pixels and band names.

    ``.npy``: the saved array, (C, H, W) (a 2-D array is one band). ``.tif``/``.tiff``: read
    with tifffile. A page with several samples per pixel stored contiguously (``planarconfig``
    CONTIG) is (H, W, C) and becomes (C, H, W); planar (SEPARATE) data and one band per page
    are (C, H, W) already. When the json names n bands and that rule gives another count while
    the other layout gives n, the json wins (files written with an odd layout still read).

    Args:
        sample: Raw sample dict (extension -> bytes, plus ``__key__``).
        image_key: Tile extensions to look for, ``;``-separated (the first present wins).

    Returns:
        The pixels, (C, H, W) in the file's dtype, and the band names (json ``bands``, else
        the json ``sensor``'s bands, else None: unknown).

    Raises:
        MissingField: No tile field in the sample.
        ValueError: The tile cannot be read, has the wrong rank, or its band names do not
            match its channel count (a bad sample: skipped and counted).
        DataError: The json names an unknown sensor.
    """
    ext = first_key(sample, image_key)
    raw_meta = sample.get("json")
    meta = json.loads(raw_meta) if isinstance(raw_meta, bytes | str) else dict(raw_meta or {})
    names = tile_band_names(meta)
    data = sample[ext]
    if ext.endswith("npy"):
        array = np.load(io.BytesIO(data), allow_pickle=False)
        if array.ndim == 2:
            array = array[None]
    else:
        array = _tif_array(data, len(names) if names is not None else None)
    if array.ndim != 3:
        raise ValueError(f"a tile must be (C, H, W), got shape {array.shape}")
    if names is not None and len(names) != array.shape[0]:  # the file contradicts its json
        raise ValueError(
            f"tile of shape {array.shape} has {array.shape[0]} channels but its json names "
            f"{len(names)} bands {names}: tiles must be (C, H, W) with one channel per band"
        )
    return array, names


def select_bands(
    array: np.ndarray, have: Sequence[str] | None, want: Sequence[str], key: str
) -> np.ndarray:
    """The model's bands ``want`` of a tile, picked by name and in the model's order.

    Args:
        array: Tile pixels (C, H, W).
        have: The tile's band names (length C), None when unknown: then the tile must have
            exactly ``len(want)`` channels and is taken to be in the model's order.
        want: Bands the model takes, in channel order.
        key: The sample's ``__key__`` (quoted by errors).

    Returns:
        (len(want), H, W) pixels (``array`` itself when it already matches).

    Raises:
        BandMismatch: A wanted band is missing, or the count differs with unknown names.
    """
    want = list(want)
    if have is None:
        if array.shape[0] != len(want):
            raise BandMismatch(
                f"tile {key!r} has {array.shape[0]} bands but the model takes {len(want)} "
                f"({want}); its band names are unknown: a json `bands` list or `sensor` field "
                f"({', '.join(SENSORS)}) lets mmpt match bands by name"
            )
        return array
    have = list(have)
    if have == want:
        return array
    missing = [b for b in want if b not in have]
    if missing:
        raise BandMismatch(
            f"tile {key!r} has bands {have} but the model takes {want}: missing {missing}"
        )
    return array[[have.index(b) for b in want]]


class TileTransform:
    """Tile (C, H, W) of any numeric dtype -> float32 tensor (C, size, size), raw units.

    Eval: the whole tile resized to ``size`` x ``size`` (bilinear; antialiased when
    shrinking), so a 64 px EuroSAT chip becomes 224 px. Train: a random resized crop (area
    ``scale``, aspect ``ratio``; the whole tile when no crop fits in 10 tries) resized the same
    way, then random horizontal and vertical flips (overhead imagery has no up or left) unless
    ``flip`` is False.

    Args:
        size: Output side in pixels.
        train: Random crop and flips (True) or the whole tile (False).
        scale: Area range of the random crop, as fractions of the tile.
        ratio: Aspect-ratio (width / height) range of the random crop.
        flip: Random horizontal and vertical flips in training.
    """

    def __init__(
        self,
        size: int,
        train: bool,
        scale: tuple[float, float] = (0.5, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
    ) -> None:
        self.size, self.train, self.scale, self.ratio = size, train, scale, ratio
        self.flip = flip

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """The (top, left, h, w) region to resize: random in training, whole in eval.

        ``scale`` (1, 1) never crops: flips only, the tile's ground sampling distance kept.
        """
        if self.train and self.scale[0] < 1.0:
            area = height * width
            log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
            for _ in range(10):
                target = area * random.uniform(*self.scale)
                aspect = math.exp(random.uniform(*log_ratio))
                w = round(math.sqrt(target * aspect))
                h = round(math.sqrt(target / aspect))
                if 0 < w <= width and 0 < h <= height:
                    return random.randint(0, height - h), random.randint(0, width - w), h, w
        return 0, 0, height, width

    def __call__(self, array: np.ndarray) -> torch.Tensor:
        """Crop, resize (and flip in training) ``array`` (C, H, W); returns (C, size, size)."""
        x = torch.from_numpy(np.array(array, dtype=np.float32))
        top, left, h, w = self.crop_box(x.shape[1], x.shape[2])
        x = x[:, top : top + h, left : left + w]
        if (h, w) != (self.size, self.size):
            shrink = h > self.size or w > self.size
            x = F.interpolate(
                x[None], size=(self.size, self.size), mode="bilinear", antialias=shrink
            )[0]
        if self.train and self.flip:
            if random.random() < 0.5:
                x = x.flip(-1)
            if random.random() < 0.5:
                x = x.flip(-2)
        return x.contiguous()


def normalize_tiles(images: torch.Tensor, pre: ImagePreprocess) -> torch.Tensor:
    """Normalise a batch of raw tiles: (B, C, H, W) -> float32 ``(x * scale - mean) / std``.

    Not idempotent (raw and normalised floats look alike): call it once per batch.
    """
    m = torch.tensor(pre.mean, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(pre.std, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float() * pre.scale - m).div_(s)


__all__ = [
    "TILE_KEYS",
    "BandMismatch",
    "DataError",
    "TileTransform",
    "normalize_tiles",
    "read_tile",
    "select_bands",
    "tile_band_names",
]

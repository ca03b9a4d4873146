"""Build multispectral tile shards from SSL4EO-S12 trees, class folders or flat folders.

Finding and reading the tiles of each source layout lives in
:mod:`mmpt.shards.multispectral_sources` (its names are re-exported here).
"""

from __future__ import annotations

import functools
import io
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmpt.shards.build import (
    BuildReport,
    check_ranges,
    prepare_out_dir,
    record_result,
    warn_skipped,
    write_rows,
)
from mmpt.shards.multispectral_sources import (  # noqa: F401 (re-exported)
    ARRAY_SUFFIXES,
    FOLDER_SENSORS,
    LAYOUTS,
    Tile,
    _arrays,
    _band_name,
    _file_tiles,
    _guess_bands,
    _key,
    _ssl4eo_tiles,
    _to_chw,
    find_tiles,
    num_channels,
    read_array,
)
from mmpt.shards.sources import Row
from mmpt.shards.writer import ShardWriter

logger = logging.getLogger(__name__)

TEMPLATES = ["a satellite image of {}.", "a multispectral image of {}.", "an aerial view of {}."]


def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Weights of a separable bilinear resize, antialiased (triangle filter) when shrinking.

    Pixel centres are aligned (``align_corners=False``); edges are clamped. Enlarging equals
    ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``.

    Args:
        n_in: Input length.
        n_out: Output length.

    Returns:
        (n_out, n_in) float64 matrix whose rows sum to 1.

    """
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale
    dist = (np.arange(n_in)[None, :] + 0.5 - centres[:, None]) / support
    w = np.clip(1.0 - np.abs(dist), 0.0, None)
    empty = w.sum(1) == 0  # only when a far-enlarged row falls between two clamped edges
    w[empty, np.clip(np.floor(centres[empty]).astype(int), 0, n_in - 1)] = 1.0
    return w / w.sum(1, keepdims=True)


@functools.lru_cache(maxsize=64)
def _taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`resize_matrix` as (n_out, T) input indices and weights of its nonzero runs."""
    m = resize_matrix(n_in, n_out)
    nonzero = m > 0
    first = nonzero.argmax(1)
    cols = first[:, None] + np.arange(int(nonzero.sum(1).max()))
    idx = np.minimum(cols, n_in - 1)
    return idx, np.where(cols < n_in, np.take_along_axis(m, idx, 1), 0.0)


def resize(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize the last two axes bilinearly in float64, then cast back to the input dtype.

    Integer outputs are rounded and clipped to the dtype's range.

    Args:
        array: (..., H, W) array.
        height: Output height.
        width: Output width.

    Returns:
        (..., height, width) array of ``array.dtype``.

    """
    if array.shape[-2:] == (height, width):
        return array
    out = array.astype(np.float64)
    if out.shape[-2] != height:
        idx, w = _taps(out.shape[-2], height)
        out = (out[..., idx, :] * w[:, :, None]).sum(-2)
    if out.shape[-1] != width:
        idx, w = _taps(out.shape[-1], width)
        out = (out[..., idx] * w).sum(-1)
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(array.dtype)


def _load(tile: Tile, bands: tuple[str, ...], size: int | None) -> Tile:
    """Read, resample and stack one tile (runs in pool workers); skipped tiles pass through."""
    if tile.problem is not None:
        return tile
    try:
        if len(tile.files) == 1 and tile.files[0][0] == "":
            raw = read_array(tile.files[0][1])
            try:
                array = _to_chw(raw, len(bands))
            except ValueError:
                tile.problem = ("band_mismatch", f"{num_channels(raw)} bands, need {len(bands)}")
                return tile
        else:
            layers = []
            for _, path in tile.files:
                layer = read_array(path)
                if layer.ndim == 3 and 1 in (layer.shape[0], layer.shape[-1]):
                    layer = layer.reshape(
                        layer.shape[:2] if layer.shape[-1] == 1 else layer.shape[1:]
                    )
                if layer.ndim != 2:
                    tile.problem = ("band_mismatch", f"{path}: not one band ({layer.shape})")
                    return tile
                layers.append(layer)
            h, w = max((x.shape for x in layers), key=lambda s: s[0] * s[1])
            dtype = np.result_type(*layers)
            array = np.stack([resize(x.astype(dtype, copy=False), h, w) for x in layers])
    except Exception as e:  # any read failure means a corrupt file: skip it, never crash
        tile.problem = ("corrupt_file", f"{type(e).__name__}: {e}")
        return tile
    tile.array = resize(array, size, size) if size is not None else array
    return tile


class BandStats:
    """Streaming per-band count, sum, sum of squares, min and max in float64."""

    def __init__(self, bands: Sequence[str]) -> None:
        self.bands = list(bands)
        c = len(self.bands)
        self.n = 0
        self.sum, self.sq = np.zeros(c), np.zeros(c)
        self.min, self.max = np.full(c, np.inf), np.full(c, -np.inf)

    def update(self, array: np.ndarray) -> None:
        """Add a (C, H, W) tile."""
        x = array.reshape(array.shape[0], -1).astype(np.float64)
        self.n += x.shape[1]
        self.sum += x.sum(1)
        self.sq += np.einsum("ij,ij->i", x, x)
        self.min, self.max = np.minimum(self.min, x.min(1)), np.maximum(self.max, x.max(1))

    def to_dict(self) -> dict[str, dict[str, float]]:
        """``{band: {"mean", "std", "min", "max"}}``; std is the population std."""
        if self.n == 0:
            return {}
        mean = self.sum / self.n
        std = np.sqrt(np.maximum(self.sq / self.n - mean**2, 0.0))
        return {b: {"mean": float(mean[i]), "std": float(std[i]), "min": float(self.min[i]),
                    "max": float(self.max[i])} for i, b in enumerate(self.bands)}  # fmt: skip


def encode_tile(array: np.ndarray, format: str) -> bytes:
    """(C, H, W) array -> ``np.save`` bytes, or a planar minisblack TIFF."""
    buf = io.BytesIO()
    if format == "npy":
        np.save(buf, array, allow_pickle=False)
    else:
        import tifffile

        tifffile.imwrite(buf, array, photometric="minisblack", planarconfig="separate")
    return buf.getvalue()


def tile_meta(
    sensor: str | None, bands: Sequence[str], classnames: list[str] | None
) -> dict[str, Any]:
    """Index ``meta`` shared by build and synth: sensor, bands, class names and zero-shot."""
    meta: dict[str, Any] = {"kind": "multispectral", "sensor": sensor, "bands": list(bands)}
    if classnames:
        meta["classnames"] = list(classnames)
        meta["zeroshot"] = {"classnames": list(classnames), "templates": list(TEMPLATES)}
    return meta


def _one_thread() -> None:
    """Pool initializer: one torch thread when the parent process already loaded torch."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def build_multispectral_shards(
    source: str | Path,
    out: str | Path,
    sensor: str | None = None,
    format: str = "npy",
    samples_per_shard: int = 500,
    size: int | None = None,
    workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> BuildReport:
    """Write multispectral tiles as WebDataset shards plus ``index.json``.

    Layouts (detected): an SSL4EO-S12 tree ``ROOT/{s1,s2a,s2c}/<location>/<acquisition>/
    <band>.tif`` (single-band files resampled bilinearly to the largest grid of their
    folder and stacked in the sensor's band order; season = index of the acquisition folder
    in sorted order; key ``<location>_<season>``); class folders ``DIR/<ClassName>/*.tif|
    *.npy`` (label = index in sorted class names); a flat folder of multi-band files with
    optional same-name ``.json`` sidecars (``label``, ``class``, ``season``, ``caption``).
    Each sample is ``<key>.npy`` (``np.save`` of a (C, H, W) array in the source dtype) or
    ``<key>.tif`` and ``<key>.json`` (``bands``, ``sensor``, ``season``, ``source`` and,
    when known, ``label``, ``class``, ``caption``). ``meta.band_stats`` holds per-band
    mean/std/min/max over all written pixels. Unreadable files, missing bands and band
    counts that do not fit the sensor are skipped and counted by reason. Several sensor
    folders under one root are written to ``out/<sensor>/`` each.

    Args:
        source: The folder to read.
        out: Output shard folder.
        sensor: ``s2_l1c``, ``s2_l2a``, ``s1`` or a comma-separated band list; for an
            SSL4EO-S12 root, only that sensor's folder. Default: inferred (13 bands L1C,
            12 bands L2A).
        format: ``npy`` or ``tif``.
        samples_per_shard: Tiles per ``.tar`` shard.
        size: Resize every tile to ``size`` x ``size``; None keeps the size.
        workers: Reading processes; 1 reads in this process. Output order never changes.
        progress: Show a Rich progress bar on stderr.
        overwrite: Replace shards already in ``out`` instead of failing.

    Returns:
        A :class:`~mmpt.shards.build.BuildReport` (skip reasons ``corrupt_file``,
        ``missing_band``, ``band_mismatch``, ``bad_sidecar``, ``duplicate_key``).

    Raises:
        FileNotFoundError: ``source`` is not a folder.
        ValueError: Unknown layout, bad option, or ``out`` already holds shards.

    """
    source, out = Path(source), Path(out)
    checks = [("format (--format npy|tif)", format, format in ("npy", "tif")),
              ("samples_per_shard (--shard-size)", samples_per_shard, samples_per_shard >= 1),
              ("size (--size)", size, size is None or size >= 1),
              ("workers (--workers)", workers, workers >= 1)]  # fmt: skip
    check_ranges(checks)
    groups = find_tiles(source, sensor)
    params = {"sensor": sensor, "format": format, "samples_per_shard": samples_per_shard,
              "size": size, "workers": workers}  # fmt: skip
    command = f"mmpt data build --kind multispectral --from {source} --out {out}" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in params.items() if v is not None
    ).replace("--samples-per-shard", "--shard-size")
    report = BuildReport(out=str(out))
    for group in groups:
        folder = out / group["sensor"] if len(groups) > 1 else out
        prepare_out_dir(folder, overwrite)
        meta = tile_meta(group["sensor"], group["bands"], group["classnames"])
        meta |= {"layout": group["layout"], "source": str(source.resolve()), "build": params,
                 "command": command}  # fmt: skip
        _write_group(group, folder, meta, report, size, format, samples_per_shard, workers,
                     progress)  # fmt: skip
    warn_skipped(report, source, "tiles", logger)
    return report


def _write_group(
    group: dict[str, Any],
    folder: Path,
    meta: dict[str, Any],
    report: BuildReport,
    size: int | None,
    format: str,
    samples_per_shard: int,
    workers: int,
    progress: bool,
) -> None:
    bands, tiles = tuple(group["bands"]), group["tiles"]
    stats = BandStats(bands)
    # tiles already skipped come first, then the loaded ones, in order
    ordered = [t for t in tiles if t.problem is not None] + [t for t in tiles if t.problem is None]
    work = functools.partial(_load, bands=bands, size=size)

    def write(report: BuildReport, writer: ShardWriter, tile: Tile) -> None:
        if tile.problem is not None:
            record_result(report, writer, Row(tile.source, "", tile.problem))
            return
        stats.update(tile.array)
        info = {"key": tile.key, "bands": list(bands), "sensor": group["sensor"],
                "season": tile.season, "source": tile.source}  # fmt: skip
        extra = {"label": tile.label, "class": tile.classname, "caption": tile.caption}
        info |= {k: v for k, v in extra.items() if v is not None}
        writer.write({"__key__": tile.key, format: encode_tile(tile.array, format),
                      "json": info})  # fmt: skip
        report.written += 1

    writer = ShardWriter(folder, samples_per_shard, modalities=["image"], meta=meta)
    with writer:
        write_rows(ordered, work, writer, report, workers, progress, len(tiles), write=write,
                   initializer=_one_thread, chunksize=4)  # fmt: skip
        writer.index.meta |= {"band_stats": stats.to_dict(), "skipped": dict(report.skipped)}
    report.shards += [str(folder / s.name) for s in writer.index.shards]

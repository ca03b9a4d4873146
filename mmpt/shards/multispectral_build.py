"""Build multispectral tile shards from SSL4EO-S12 trees, class folders or flat folders."""

from __future__ import annotations

import functools
import io
import json
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmpt.bands import SENSORS, resolve_bands
from mmpt.shards.build import (
    BuildReport,
    check_ranges,
    prepare_out_dir,
    record_result,
    warn_skipped,
    write_rows,
)
from mmpt.shards.sources import Row
from mmpt.shards.writer import ShardWriter

logger = logging.getLogger(__name__)

#: SSL4EO-S12 sensor folders -> mmpt sensor names (:data:`mmpt.bands.SENSORS`).
FOLDER_SENSORS = {"s2c": "s2_l1c", "s2a": "s2_l2a", "s1": "s1"}
ARRAY_SUFFIXES = (".tif", ".tiff", ".npy")
TEMPLATES = ["a satellite image of {}.", "a multispectral image of {}.", "an aerial view of {}."]
LAYOUTS = (
    "an SSL4EO-S12 tree (ROOT/{s1,s2a,s2c}/<location>/<acquisition>/<band>.tif, or one of "
    "those sensor folders)",
    "class folders (DIR/<ClassName>/*.tif|*.npy, one multi-band file each)",
    "a flat folder of multi-band .tif/.npy files (optional same-name .json sidecars)",
)


@dataclass
class Tile:
    """One tile to read; a worker fills in the (C, H, W) array, or the problem that skips it."""

    key: str
    source: str  # path relative to --from, for the json and the report
    files: list[tuple[str, str]]  # (band name, path) per single-band file, or [("", path)]
    label: int | None = None
    classname: str | None = None
    season: int | None = None
    caption: str | None = None
    array: np.ndarray | None = None
    problem: tuple[str, str] | None = None  # (reason, detail)


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


def read_array(path: str | Path) -> np.ndarray:
    """Read a ``.npy`` (no pickles) or a (Geo)TIFF file as an array.

    Raises:
        ValueError: The file holds no pixels (tifffile reads some broken files as empty).
        OSError: The file cannot be read.

    """
    if str(path).lower().endswith(".npy"):
        array = np.load(path, allow_pickle=False)
    else:
        import tifffile

        array = tifffile.imread(path)
    if array.size == 0:
        raise ValueError(f"{path} holds no image data")
    return array


def num_channels(array: np.ndarray) -> int:
    """Band count of a (C, H, W) or (H, W, C) array; 2-D is one band.

    A square tile tells the layout (``H == W``); otherwise the shorter end is the bands.
    """
    if array.ndim == 2:
        return 1
    if array.ndim != 3:
        raise ValueError(f"expected a 2-D or 3-D array, got shape {array.shape}")
    c, h, w = array.shape
    if h == w != c:
        return c
    if c == h != w:
        return w
    return min(c, w)


def _to_chw(array: np.ndarray, n: int) -> np.ndarray:
    if array.ndim == 2 and n == 1:
        return array[None]
    if array.ndim == 3 and array.shape[0] == n:
        return array
    if array.ndim == 3 and array.shape[-1] == n:
        return np.ascontiguousarray(array.transpose(2, 0, 1))
    raise ValueError(f"shape {array.shape} has no axis of {n} bands")


def _band_name(stem: str) -> str:
    """``B01``/``b8a``/``vv`` -> ``B1``/``B8A``/``VV``."""
    m = re.fullmatch(r"[Bb]0*(\d+[Aa]?)", stem)
    return "B" + m.group(1).upper() if m else stem.upper()


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


def _key(text: str) -> str:
    """A WebDataset-safe key (no dots or slashes)."""
    return re.sub(r"[^\w-]+", "_", text).strip("_") or "tile"


def _arrays(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in ARRAY_SUFFIXES)


def _ssl4eo_tiles(folder: Path, root: Path, bands: tuple[str, ...]) -> list[Tile]:
    tiles = []
    for loc in sorted(p for p in folder.iterdir() if p.is_dir()):
        for season, acq in enumerate(sorted(p for p in loc.iterdir() if p.is_dir())):
            found = {_band_name(p.stem): str(p) for p in _arrays(acq) if p.suffix != ".npy"}
            tile = Tile(_key(f"{loc.name}_{season}"), str(acq.relative_to(root)), [])
            tile.season = season
            missing = [b for b in bands if b not in found]
            if missing:
                tile.problem = ("missing_band", f"no {', '.join(missing)} in {acq}")
            tile.files = [(b, found[b]) for b in bands if b in found]
            tiles.append(tile)
    return tiles


def _file_tiles(root: Path, files: list[Path], labels: dict[str, int] | None) -> list[Tile]:
    tiles, seen = [], set()
    for path in files:
        rel = path.relative_to(root)
        tile = Tile(_key(str(rel.with_suffix(""))), str(rel), [("", str(path))])
        if labels is not None:
            tile.classname = path.parent.name
            tile.label = labels[tile.classname]
        sidecar = path.with_suffix(".json")
        if labels is None and sidecar.is_file():
            try:
                info = json.loads(sidecar.read_text())
                tile.label, tile.classname = info.get("label"), info.get("class")
                tile.season, tile.caption = info.get("season"), info.get("caption")
            except (OSError, ValueError, AttributeError) as e:
                tile.problem = ("bad_sidecar", f"{sidecar}: {type(e).__name__}: {e}")
        if tile.problem is None and tile.key in seen:
            tile.problem = ("duplicate_key", f"key {tile.key!r} appeared before")
        seen.add(tile.key)
        tiles.append(tile)
    return tiles


def _guess_bands(sensor: str | None, files: list[Path]) -> tuple[str | None, tuple[str, ...]]:
    """Bands of multi-band files: ``sensor``, else from the first readable file's band count."""
    if sensor is not None:
        spec = sensor if sensor.lower() in SENSORS else [b.strip() for b in sensor.split(",")]
        name = sensor.lower() if isinstance(spec, str) else None
        return name, resolve_bands(spec)
    for path in files:
        try:
            n = num_channels(read_array(path))
        except Exception:  # a corrupt file is skipped later; try the next one
            continue
        defaults = {13: "s2_l1c", 12: "s2_l2a"}
        if n not in defaults:
            raise ValueError(
                f"{path} has {n} bands: pass --sensor (one of {', '.join(SENSORS)}) or a "
                "comma-separated band list (e.g. --sensor B4,B3,B2,B8)"
            )
        return defaults[n], SENSORS[defaults[n]]
    return "s2_l1c", SENSORS["s2_l1c"]  # nothing readable: every file is skipped anyway


def find_tiles(source: Path, sensor: str | None) -> list[dict[str, Any]]:
    """Detect the layout of ``source`` and list its tiles, one group per sensor.

    Args:
        source: SSL4EO-S12 root or sensor folder, class folders, or a flat folder.
        sensor: A sensor name or comma-separated band list (``--sensor``); None to infer.

    Returns:
        Groups: dicts with ``layout``, ``sensor`` (name or None), ``bands``, ``tiles``
        (:class:`Tile` list) and ``classnames`` (list or None).

    Raises:
        FileNotFoundError: ``source`` is not a folder.
        ValueError: An unrecognised layout (names the three known ones) or a bad ``sensor``.

    """
    if not source.is_dir():
        raise FileNotFoundError(f"{source} is not a folder; give one of: " + "; ".join(LAYOUTS))
    sub = sorted(p for p in source.iterdir() if p.is_dir())
    sensor_dirs = [p for p in sub if p.name.lower() in FOLDER_SENSORS]
    if source.name.lower() in FOLDER_SENSORS:
        sensor_dirs = [source]
    if sensor_dirs:
        if sensor is not None:
            if sensor.lower() not in FOLDER_SENSORS.values():
                raise ValueError(
                    f"--sensor {sensor!r}: an SSL4EO-S12 tree needs one of "
                    f"{', '.join(FOLDER_SENSORS.values())}"
                )
            sensor_dirs = [
                p for p in sensor_dirs if FOLDER_SENSORS[p.name.lower()] == sensor.lower()
            ]
            if not sensor_dirs:
                raise ValueError(f"{source} has no folder for --sensor {sensor}")
        root = source.parent if source in sensor_dirs else source
        groups = []
        for folder in sensor_dirs:
            name = FOLDER_SENSORS[folder.name.lower()]
            tiles = _ssl4eo_tiles(folder, root, SENSORS[name])
            groups.append({"layout": "ssl4eo-s12", "sensor": name, "bands": SENSORS[name],
                           "tiles": tiles, "classnames": None})  # fmt: skip
        return groups
    files = _arrays(source)
    class_dirs = [p for p in sub if _arrays(p)]
    if files:
        layout, labels, classnames = "flat", None, None
    elif class_dirs:
        classnames = [p.name for p in class_dirs]
        labels = {c: i for i, c in enumerate(classnames)}
        files = [f for p in class_dirs for f in _arrays(p)]
        layout = "class-folders"
    else:
        raise ValueError(f"{source}: layout not recognised; give one of: " + "; ".join(LAYOUTS))
    name, bands = _guess_bands(sensor, files)
    tiles = _file_tiles(source, files, labels)
    if layout == "flat" and any(t.classname is not None for t in tiles):
        classnames = sorted({t.classname for t in tiles if t.classname is not None})
    return [{"layout": layout, "sensor": name, "bands": bands, "tiles": tiles,
             "classnames": classnames}]  # fmt: skip


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

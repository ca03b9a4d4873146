"""Find multispectral tiles in SSL4EO-S12 trees, class folders or flat folders, and read them."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmpt.bands import SENSORS, resolve_bands

#: SSL4EO-S12 sensor folders -> mmpt sensor names (:data:`mmpt.bands.SENSORS`).
FOLDER_SENSORS = {"s2c": "s2_l1c", "s2a": "s2_l2a", "s1": "s1"}
ARRAY_SUFFIXES = (".tif", ".tiff", ".npy")
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

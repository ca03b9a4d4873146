"""``mmpt data build --kind rs-dense``: DOTA, iSAID/SAMRS (COCO json) annotations -> dense shards.

- DOTA: a ``labelTxt`` folder (or one ``.txt``) of lines ``x1 y1 x2 y2 x3 y3 x4 y4 class
  difficult`` (``imagesource:``/``gsd:`` header lines skipped), images of the same stem in
  ``--images``; each quadrilateral becomes its minimum-area oriented box (rotated task).
- iSAID / SAMRS instance files: a COCO ``.json`` (polygon or RLE segmentations) with images
  under ``--images``; each object gives an instance, its oriented box (minimum rotated
  rectangle) and its class in a semantic mask (0 = background, class k -> k + 1).
- ``--masks DIR``: semantic PNGs of the same stem (SAMRS, Potsdam ...) replace the mask.

``--size N`` cuts every image into N x N tiles (the last row/column aligned to the border); an
object goes to the tile holding its centre, its outline clipped to the tile.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmpt.models.dense.rotated_ops import polygon_to_obb
from mmpt.shards.build import MAX_EXAMPLES, BuildReport, prepare_out_dir
from mmpt.shards.dense_format import encode_dense_sample, segmentation_mask
from mmpt.shards.writer import ShardWriter

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def parse_dota(path: Path) -> list[dict[str, Any]]:
    """Objects of one DOTA label file: ``points`` (4, 2), ``name``, ``difficult``."""
    objects = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) < 9 or line.startswith(("imagesource", "gsd")):
            continue
        try:
            coords = np.array([float(v) for v in parts[:8]]).reshape(4, 2)
        except ValueError:
            continue
        difficult = len(parts) > 9 and parts[9] not in ("0", "false")
        objects.append({"points": coords, "name": parts[8], "difficult": difficult})
    return objects


def _find_image(root: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        if (root / f"{stem}{suffix}").is_file():
            return root / f"{stem}{suffix}"
    return None


def _tiles(h: int, w: int, size: int | None) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) tiles covering an image (one tile when ``size`` is None)."""
    if size is None:
        return [(0, 0, h, w)]

    def starts(n: int) -> list[int]:
        if n <= size:
            return [0]
        return sorted({*range(0, n - size + 1, size), n - size})

    return [(t, s, min(size, h), min(size, w)) for t in starts(h) for s in starts(w)]


def _clip_polygon(points: np.ndarray, box: tuple[int, int, int, int]) -> list[list[float]]:
    """COCO polygons of ``points`` clipped to the tile, in tile coordinates."""
    from shapely.geometry import Polygon
    from shapely.geometry import box as shapely_box

    top, left, h, w = box
    poly = Polygon(points).buffer(0).intersection(shapely_box(left, top, left + w, top + h))
    parts = [poly] if poly.geom_type == "Polygon" else getattr(poly, "geoms", [])
    out = []
    for p in parts:
        if p.geom_type == "Polygon" and p.area > 0:
            xy = np.asarray(p.exterior.coords)[:-1] - [left, top]
            out.append([round(float(v), 2) for v in xy.reshape(-1)])
    return out


def _coco_objects(path: Path) -> tuple[list[str], dict[str, dict], dict[str, list[dict]]]:
    """Class names, images by file name and their objects from a COCO instances file."""
    data = json.loads(path.read_text())
    cats = sorted(data.get("categories", []), key=lambda c: c["id"])
    if not cats or "images" not in data:
        raise ValueError(f"--from {path}: not a COCO instances file (no categories/images)")
    label_of = {c["id"]: i for i, c in enumerate(cats)}
    images = {im["id"]: im for im in data["images"]}
    objects: dict[str, list[dict]] = {im["file_name"]: [] for im in data["images"]}
    for ann in data.get("annotations", []):
        im = images.get(ann["image_id"])
        if im is None or ann.get("iscrowd", 0) or ann["category_id"] not in label_of:
            continue
        seg = segmentation_mask(ann["segmentation"], im["height"], im["width"])
        ys, xs = np.nonzero(seg)
        if len(xs) < 3:
            continue
        if isinstance(ann["segmentation"], list):
            points = np.concatenate([np.reshape(p, (-1, 2)) for p in ann["segmentation"]])
        else:  # pixel corners of an RLE mask
            points = np.concatenate(
                [np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)]
            )
        objects[im["file_name"]].append(
            {"points": points, "label": label_of[ann["category_id"]], "difficult": False}
        )
    return [c["name"] for c in cats], {im["file_name"]: im for im in data["images"]}, objects


def _sources(
    source: Path, images_root: Path, classnames: list[str] | None
) -> tuple[list[str], Iterator[tuple[Path | None, str, list[dict]]], bool]:
    """Class names, (image, name, objects) items, and whether objects carry instance masks."""
    if source.suffix == ".json":
        names, _, objects = _coco_objects(source)
        items = (
            (
                _find_image(images_root, Path(f).stem)
                if not (images_root / f).is_file()
                else images_root / f,
                f,
                objs,
            )
            for f, objs in objects.items()
        )
        return names, items, True
    files = sorted(source.glob("*.txt")) if source.is_dir() else [source]
    if not files:
        raise ValueError(f"--from {source}: no DOTA .txt label files (or give a COCO .json)")
    parsed = [(f, parse_dota(f)) for f in files]
    names = classnames or sorted({o["name"] for _, objs in parsed for o in objs})
    for _, objs in parsed:
        for o in objs:
            if o["name"] not in names:
                raise ValueError(f"class {o['name']!r} is not in --classnames ({names})")
            o["label"] = names.index(o["name"])
    items = ((_find_image(images_root, f.stem), f.stem, objs) for f, objs in parsed)
    return names, items, False


def build_rs_dense_shards(
    source: str | Path,
    out: str | Path,
    images_root: str | Path | None = None,
    masks_root: str | Path | None = None,
    classnames: str | Path | None = None,
    size: int | None = None,
    samples_per_shard: int = 500,
    progress: bool = True,
    overwrite: bool = False,
) -> BuildReport:
    """Write dense shards (:mod:`mmpt.shards.dense_format`) from DOTA or COCO-style annotations.

    Args:
        source: DOTA ``labelTxt`` folder or ``.txt`` file, or an iSAID/SAMRS COCO ``.json``.
        out: Output shard folder.
        images_root: Folder of the images (default: ``images/`` next to a DOTA folder, else the
            annotation file's folder).
        masks_root: Folder of semantic PNG masks named like the images.
        classnames: DOTA class names, one a line (label i = line i); default: sorted names.
        size: Tile side; None keeps whole images.
        samples_per_shard: Tiles per shard.
        progress: Unused (the build logs per image); kept for the CLI's common options.
        overwrite: Replace shards already in ``out``.

    Returns:
        A :class:`~mmpt.shards.build.BuildReport` (skips: ``missing_image``,
        ``corrupt_image``, ``bad_object``).

    Raises:
        FileNotFoundError: ``source`` or a given folder does not exist.
        ValueError: Not a DOTA or COCO annotation source, or an unknown class.
    """
    src = Path(source)
    if not src.exists():
        raise FileNotFoundError(f"--from {src}: no such file or folder")
    default_root = src.parent / "images" if src.is_dir() else src.parent
    root = Path(images_root) if images_root is not None else default_root
    if not root.is_dir():
        raise FileNotFoundError(f"--images {root}: not a folder (where the images are)")
    names_list = Path(classnames).read_text().split("\n") if classnames else None
    names_list = [n.strip() for n in names_list or [] if n.strip()] or None
    names, items, coco = _sources(src, root, names_list)
    prepare_out_dir(out, overwrite)
    meta = {
        "object_classes": names,
        "tasks": ["instance", "rotated", "semseg"] if coco else ["rotated"],
        "source": str(src),
    }
    if coco:
        meta["semantic_classes"] = ["background", *names]
    report = BuildReport(out=str(out))

    def skip(reason: str, where: str, detail: str) -> None:
        report.skipped[reason] = report.skipped.get(reason, 0) + 1
        if len(report.skipped_examples) < MAX_EXAMPLES:
            report.skipped_examples.append({"source": where, "reason": reason, "detail": detail})

    with ShardWriter(out, samples_per_shard, modalities=["image"], meta=meta) as writer:
        for path, name, objects in items:
            if path is None:
                skip("missing_image", name, f"no image named {name}.* in {root}")
                continue
            try:
                image = np.asarray(Image.open(path).convert("RGB"))
            except OSError as exc:
                skip("corrupt_image", str(path), str(exc))
                continue
            h, w = image.shape[:2]
            full_mask = None
            if masks_root is not None:
                mpath = _find_image(Path(masks_root), Path(name).stem)
                full_mask = np.asarray(Image.open(mpath)) if mpath is not None else None
            elif coco:
                full_mask = np.zeros((h, w), np.uint8)
            boxes = []
            for o in objects:
                try:
                    boxes.append(polygon_to_obb(o["points"]))
                except ValueError as exc:
                    skip("bad_object", name, str(exc))
                    boxes.append(None)
            if coco and masks_root is None:
                for o in objects:  # paint the classes in order (later objects on top)
                    poly = [list(np.asarray(o["points"], float).reshape(-1))]
                    full_mask[segmentation_mask(poly, h, w) > 0] = o["label"] + 1
            for top, left, th, tw in _tiles(h, w, size):
                obbs, instances = [], []
                for o, box in zip(objects, boxes, strict=True):
                    if box is None or not (left <= box[0] < left + tw and top <= box[1] < top + th):
                        continue
                    cx, cy, bw, bh, a = box
                    obbs.append(
                        {
                            "label": o["label"],
                            "obb": [cx - left, cy - top, bw, bh, a],
                            "difficult": bool(o["difficult"]),
                        }
                    )
                    if coco:
                        seg = _clip_polygon(np.asarray(o["points"], float), (top, left, th, tw))
                        if seg:
                            instances.append({"label": o["label"], "segmentation": seg})
                tile = image[top : top + th, left : left + tw]
                mask = (
                    full_mask[top : top + th, left : left + tw] if full_mask is not None else None
                )
                key = f"{Path(name).stem}_{top}_{left}".replace(".", "_")
                writer.write(
                    encode_dense_sample(
                        key,
                        tile,
                        mask,
                        instances if coco else None,
                        obbs,
                        source=f"{name}@{top},{left}",
                    )
                )
                report.written += 1
    report.shards = [str(Path(out) / s.name) for s in writer.index.shards]
    return report


__all__ = ["build_rs_dense_shards", "parse_dota"]

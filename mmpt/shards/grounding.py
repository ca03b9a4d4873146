"""RefCOCO / Flickr30k Entities grounding annotations (MDETR's COCO-style json) -> grounding shards.

The file is COCO-style with a caption per image entry and character spans per box (the layout
MDETR distributes RefCOCO/+/g and Flickr30k Entities in, ``final_refcoco_train.json``,
``final_flickr_separateGT_val.json``)::

    {"images": [{"id", "file_name", "caption", "width", "height", ...}],
     "annotations": [{"image_id", "bbox": [x, y, w, h], "tokens_positive": [[start, end], ...]}]}

Each image entry (one image-caption pair) becomes one sample: the image, and a ``json`` with
``caption``, ``boxes`` (normalised ``[x0, y0, x1, y1]``) and ``phrases`` (the distinct span sets
with the boxes they name, see :mod:`mmpt.datamodules.grounding`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmpt.shards.build import BuildReport
from mmpt.shards.coco_caption import load_json
from mmpt.shards.documents import Doc, build_documents, find_image, image_roots, source_files


def grounding_record(image: dict[str, Any], annotations: list[dict[str, Any]]) -> dict[str, Any]:
    """The sample json of one image entry and its box annotations.

    Raises:
        ValueError: A missing size or caption, a box outside the image, or a span outside the
            caption (the message says which).

    """
    caption = str(image.get("caption") or "")
    width, height = float(image.get("width") or 0), float(image.get("height") or 0)
    if not caption or width <= 0 or height <= 0:
        raise ValueError("an image entry needs 'caption', 'width' and 'height'")
    boxes, phrases = [], {}
    for ann in annotations:
        x, y, w, h = (float(v) for v in ann["bbox"])
        if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > width + 1 or y + h > height + 1:
            raise ValueError(f"bbox {ann['bbox']} is outside the {width:g}x{height:g} image")
        spans = tuple(tuple(int(v) for v in span) for span in ann.get("tokens_positive") or [])
        if not spans:
            continue  # a box no phrase names cannot be grounded
        if any(not 0 <= s < e <= len(caption) for s, e in spans):
            raise ValueError(f"tokens_positive {spans} outside the caption {caption!r}")
        box = [x / width, y / height, min((x + w) / width, 1.0), min((y + h) / height, 1.0)]
        phrases.setdefault(spans, []).append(len(boxes))
        boxes.append([round(v, 6) for v in box])
    if not boxes:
        raise ValueError("no box has a phrase (tokens_positive)")
    return {
        "caption": caption,
        "boxes": boxes,
        "phrases": [{"spans": [list(s) for s in k], "boxes": v} for k, v in phrases.items()],
    }


def grounding_docs(path: Path, roots: list[Path]) -> Iterator[Doc]:
    """One :class:`Doc` per image entry of an MDETR-style grounding file.

    Raises:
        ValueError: The file lacks the ``images`` or ``annotations`` list.

    """
    data = load_json(path)
    images = data.get("images") if isinstance(data, dict) else None
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise ValueError(
            f"--from {path}: expected a COCO-style grounding file with 'images' (with "
            "'caption') and 'annotations' (with 'bbox' and 'tokens_positive') lists"
        )
    by_image: dict[str, list[dict[str, Any]]] = {}
    for ann in annotations:
        if isinstance(ann, dict) and "image_id" in ann and "bbox" in ann:
            by_image.setdefault(str(ann["image_id"]), []).append(ann)
    return _docs(path, images, by_image, roots)


def _docs(
    path: Path, images: list[Any], by_image: dict[str, list[dict]], roots: list[Path]
) -> Iterator[Doc]:
    for i, im in enumerate(images):
        where = f"{path}[images][{i}]"
        if not isinstance(im, dict) or "id" not in im or not im.get("file_name"):
            yield Doc(where, problem=("bad_row", "an image needs 'id' and 'file_name'"))
            continue
        try:
            record = grounding_record(im, by_image.get(str(im["id"]), []))
        except (ValueError, KeyError, TypeError) as err:
            yield Doc(where, problem=("bad_annotation", str(err)))
            continue
        record["id"] = str(im["id"])
        yield Doc(where, record, [find_image(im["file_name"], roots)])


def _compose(doc: Doc, key: str) -> dict[str, Any]:
    return {"jpg": doc.encoded[0], "txt": doc.data["caption"], "json": {**doc.data, "key": key}}


def build_grounding_shards(
    source: str | Path,
    out: str | Path,
    images_root: str | Path | list[str | Path] | None = None,
    samples_per_shard: int = 5000,
    resize_short_side: int | None = None,
    jpeg_quality: int = 95,
    workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> BuildReport:
    """Write a RefCOCO/Flickr30k-Entities-style grounding file as grounding shards.

    Skips, counted by reason: ``bad_row``, ``bad_annotation`` (no size or caption, a box
    outside the image, a span outside the caption, no box with a phrase), ``missing_image``,
    ``corrupt_image``.

    Args:
        source: The ``.json`` file.
        out: Output shard folder.
        images_root: Folder(s) ``file_name`` resolves against (COCO ``train2014/``, Flickr30k
            ``flickr30k-images/``); default the file's folder.
        samples_per_shard: Samples per shard.
        resize_short_side: Downscale images whose short side is larger (boxes are normalised,
            so they stay right).
        jpeg_quality: Quality of re-encoded JPEGs.
        workers: Processes reading images.
        progress: Show a progress bar.
        overwrite: Replace shards already in ``out``.

    Returns:
        A :class:`~mmpt.shards.build.BuildReport`.

    Raises:
        FileNotFoundError: The file or images folder does not exist.
        ValueError: Not a grounding file, or no sample could be written.

    """
    (path,) = source_files(source, (".json",))
    roots = image_roots(images_root, path.parent)
    meta = {
        "kind": "grounding",
        "source": str(path.resolve()),
        "build": {"format": "mdetr-grounding", "images_root": [str(r) for r in roots]},
    }
    report = build_documents(
        grounding_docs(path, roots), out, _compose, meta, ["image", "text"], samples_per_shard,
        resize_short_side, jpeg_quality, workers, progress, overwrite,
    )  # fmt: skip
    if report.written == 0:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(report.skipped.items())) or "no records"
        raise ValueError(
            f"--from {path}: no grounding sample could be written ({reasons}); check the file's "
            "format and --images"
        )
    return report

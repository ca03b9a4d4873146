"""COCO caption annotation files (``captions_val2014.json``; NoCaps' files) -> caption eval shards.

The file is ``{"images": [{"id", "file_name", ...}], "annotations": [{"image_id",
"caption", ...}]}``. NoCaps uses the same layout (its images may carry a ``domain``:
in-domain, near-domain, out-domain, kept in the sample's json). Each written sample is one
image with all its reference captions (see :mod:`mmpt.shards.eval_sets`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmpt.shards.build import BuildReport
from mmpt.shards.documents import Doc, find_image, image_roots, source_files
from mmpt.shards.eval_sets import build_eval_shards, eval_record


def load_json(path: Path, flag: str = "--from") -> Any:
    """Parse a JSON file, naming it in the error.

    Raises:
        ValueError: the file is not valid JSON.
    """
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} {path} is not valid JSON ({e})") from e


def coco_caption_docs(path: Path, roots: list[Path]) -> Iterator[Doc]:
    """One :class:`Doc` per image of a COCO-format caption file, with its captions.

    The file is read and checked here (errors before any shard is written); the docs come
    lazily.

    Raises:
        ValueError: the file lacks the ``images`` or ``annotations`` list.
    """
    data = load_json(path)
    images = data.get("images") if isinstance(data, dict) else None
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise ValueError(
            f"--from {path}: expected a COCO caption file with 'images' and 'annotations' "
            "lists (captions_*.json; NoCaps' test file has no captions and cannot be scored)"
        )
    captions: dict[str, list[str]] = {}
    for ann in annotations:
        if isinstance(ann, dict) and "image_id" in ann:
            text = str(ann.get("caption") or "").strip()
            if text:
                captions.setdefault(str(ann["image_id"]), []).append(text)
    return _docs(path, images, captions, roots)


def _docs(
    path: Path, images: list[Any], captions: dict[str, list[str]], roots: list[Path]
) -> Iterator[Doc]:
    for i, im in enumerate(images):
        where = f"{path}[images][{i}]"
        if not isinstance(im, dict) or "id" not in im or not im.get("file_name"):
            yield Doc(where, problem=("bad_row", "an image needs 'id' and 'file_name'"))
            continue
        ident = str(im["id"])
        refs = captions.get(ident)
        if not refs:
            yield Doc(where, problem=("no_reference", f"image {ident} has no caption"))
            continue
        record = {"id": ident, "captions": refs, "file_name": str(im["file_name"])}
        if im.get("domain"):
            record["domain"] = str(im["domain"])
        yield Doc(where, eval_record("caption", record), [find_image(im["file_name"], roots)])


def build_coco_caption_shards(
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
    """Write a COCO/NoCaps caption set as caption eval shards (``jpg`` + json ``captions``).

    Skips, counted by reason: ``bad_row``, ``no_reference`` (an image without captions),
    ``missing_image``, ``corrupt_image``.

    Args:
        source: The ``captions_*.json`` file.
        out: Output shard folder.
        images_root: Folder(s) the ``file_name`` paths resolve against (COCO: ``val2014/``);
            default the file's folder.
        samples_per_shard: Images per shard.
        resize_short_side: Downscale images whose short side is larger.
        jpeg_quality: Quality of re-encoded JPEGs.
        workers: Processes reading images.
        progress: Show a progress bar.
        overwrite: Replace shards already in ``out``.

    Returns:
        A :class:`~mmpt.shards.build.BuildReport`.

    Raises:
        FileNotFoundError: The file or images folder does not exist.
        ValueError: Not a COCO caption file, or no image could be written.
    """
    (path,) = source_files(source, (".json",))
    roots = image_roots(images_root, path.parent)
    build = {"format": "coco-caption", "images_root": [str(r) for r in roots]}
    return build_eval_shards(
        coco_caption_docs(path, roots), out, "caption", str(path.resolve()), build,
        samples_per_shard, resize_short_side, jpeg_quality, workers, progress, overwrite,
    )  # fmt: skip

"""Karpathy split files (``dataset_coco.json``, ``dataset_flickr30k.json``) -> retrieval shards.

The file is ``{"images": [{"filepath" (COCO only), "filename", "split": "train"|"restval"|
"val"|"test", "sentences": [{"raw": ...}, ...], "cocoid"/"imgid"}, ...]}``. Each written
sample is one image with all its captions (json ``captions``), the layout
``mmpt eval retrieval --text-key json:captions`` scores (5 captions per image in COCO and
Flickr30k).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmpt.shards.build import BuildReport
from mmpt.shards.documents import Doc, build_documents, find_image, image_roots, source_files

TEXT_KEY = "json:captions"


def karpathy_docs(path: Path, roots: list[Path], splits: set[str]) -> Iterator[Doc]:
    """The images of ``splits`` in a Karpathy file, with their captions."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"--from {path} is not valid JSON ({e})") from e
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise ValueError(f"--from {path}: expected a Karpathy split file with an 'images' list")
    found = {im.get("split") for im in images if isinstance(im, dict)}
    if not splits & found:
        have = sorted(str(f) for f in found if f is not None)
        raise ValueError(f"--split {','.join(sorted(splits))}: the file has splits {have}")
    for i, im in enumerate(images):
        if isinstance(im, dict) and im.get("split") not in splits:
            continue
        yield karpathy_doc(f"{path}[{i}]", im, roots)


def karpathy_doc(where: str, im: Any, roots: list[Path]) -> Doc:
    """One image entry -> a :class:`~.documents.Doc` with its captions."""
    if not isinstance(im, dict) or not im.get("filename"):
        return Doc(where, problem=("bad_row", "needs 'filename' and 'sentences'"))
    sentences = im.get("sentences") or []
    captions = [str(s.get("raw", "")).strip() for s in sentences if isinstance(s, dict)]
    captions = [c for c in captions if c]
    if not captions:
        return Doc(where, problem=("empty_text", f"{im['filename']} has no caption"))
    rel = str(Path(im.get("filepath") or "") / im["filename"])
    ident = {k: im[k] for k in ("cocoid", "imgid", "split") if k in im}
    image_id = str(im.get("cocoid", im.get("imgid", rel)))
    data = {"id": image_id, "captions": captions, "filename": rel, **ident}
    return Doc(where, data, [find_image(rel, roots)])


def _compose(doc: Doc, key: str) -> dict[str, Any]:
    captions = doc.data["captions"]
    info = {"key": key, "caption": captions[0], **doc.data}
    return {"jpg": doc.encoded[0], "txt": captions[0], "json": info}


def build_retrieval_shards(
    source: str | Path,
    out: str | Path,
    images_root: str | Path | None = None,
    split: str = "test",
    samples_per_shard: int = 5000,
    resize_short_side: int | None = None,
    jpeg_quality: int = 95,
    workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> BuildReport:
    """Write one Karpathy split as retrieval shards: ``jpg``, ``txt`` (first caption), json.

    Skips, counted by reason: ``bad_row``, ``empty_text`` (no caption), ``missing_image``,
    ``corrupt_image``.

    Args:
        source: The Karpathy ``.json`` file.
        out: Output shard folder.
        images_root: Folder the ``filepath/filename`` paths resolve against (COCO: the folder
            holding ``train2014/`` and ``val2014/``); default the file's folder.
        split: Split(s) to write, comma-separated (``test``; ``train,restval`` for the
            full Karpathy training set).
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
        ValueError: Not a Karpathy file, or the split is not in it.
    """
    (path,) = source_files(source, (".json",))
    roots = image_roots(images_root, path.parent)
    splits = {s.strip() for s in split.split(",") if s.strip()}
    meta = {
        "kind": "retrieval",
        "source": str(path.resolve()),
        "text_key": TEXT_KEY,
        "build": {"format": "karpathy", "split": sorted(splits), "images_root": str(roots[0])},
    }
    docs = karpathy_docs(path, roots, splits)
    return build_documents(
        docs, out, _compose, meta, ["image", "text"], samples_per_shard, resize_short_side,
        jpeg_quality, workers, progress, overwrite,
    )  # fmt: skip

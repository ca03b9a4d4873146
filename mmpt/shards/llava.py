"""LLaVA conversation JSON (the 665k SFT mix, the 558k pretraining file) -> shards.

A row is ``{"id", "image": "coco/train2017/x.jpg" (or a list, or absent), "conversations":
[{"from": "human"|"gpt", "value": "<image> Describe ..."}, ...]}``. Conversation samples hold
``0.jpg`` ... and ``json`` ``{"id", "conversations", "images": ["0.jpg", ...]}``, which the VLM
reader (:mod:`mmpt.datamodules.vlm_sample`) takes as is; ``pairs`` writes single-image
two-turn rows (the 558k pretraining file) as img2dataset-style pairs for stage 1 instead.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mmpt.datamodules.templates import IMAGE_PLACEHOLDER
from mmpt.shards.build import BuildReport
from mmpt.shards.documents import (
    Doc,
    Skip,
    build_documents,
    find_image,
    image_roots,
    numbered_lines,
    source_files,
)

_ROLES = ("human", "gpt", "system")


def _records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) of a ``.json`` list or a ``.jsonl`` file."""
    if path.suffix.lower() == ".jsonl":
        for n, line in numbered_lines(path):
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:{n}", e
        return
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"--from {path} is not valid JSON ({e})") from e
    if not isinstance(rows, list):
        raise ValueError(f"--from {path}: expected a JSON list of conversations (LLaVA format)")
    for i, rec in enumerate(rows):
        yield f"{path}[{i}]", rec


def llava_doc(where: str, rec: Any, roots: list[Path], pairs: bool) -> Doc:
    """One LLaVA row -> a :class:`~.documents.Doc` (or one that says why it is skipped)."""
    turns = rec.get("conversations") if isinstance(rec, dict) else None
    ok = isinstance(turns, list) and bool(turns)
    ok = ok and all(
        isinstance(t, dict) and t.get("from") in _ROLES and isinstance(t.get("value"), str)
        for t in turns
    )
    if not ok:
        return Doc(where, problem=("bad_row", "needs 'conversations': [{from, value}, ...]"))
    image = rec.get("image")
    names = [] if image is None else [image] if isinstance(image, str) else image
    if not isinstance(names, list):
        return Doc(where, problem=("bad_row", "'image' must be a path or a list of paths"))
    answers = [t["value"].strip() for t in turns if t["from"] == "gpt"]
    if not answers or not all(answers):
        return Doc(where, problem=("empty_text", "a gpt turn is empty or missing"))
    markers = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns)
    if markers != len(names):
        detail = f"{markers} {IMAGE_PLACEHOLDER} marker(s) for {len(names)} image(s)"
        return Doc(where, problem=("marker_image_mismatch", detail))
    if pairs and (len(names) != 1 or [t["from"] for t in turns] != ["human", "gpt"]):
        detail = f"{len(names)} image(s), {len(turns)} turn(s); a pair is one image, two turns"
        return Doc(where, problem=("not_a_pair", detail))
    data = {"id": rec.get("id"), "turns": turns, "names": names}
    return Doc(where, data, [find_image(n, roots) for n in names])


def _conversation(doc: Doc, key: str) -> dict[str, Any]:
    members = {f"{i}.jpg": jpg for i, jpg in enumerate(doc.encoded)}
    info = {"key": key, "id": doc.data["id"], "conversations": doc.data["turns"],
            "images": list(members), "source_images": doc.data["names"]}  # fmt: skip
    return {**members, "json": info}


def _pair(doc: Doc, key: str) -> dict[str, Any]:
    caption = doc.data["turns"][1]["value"].strip()
    if not caption:
        raise Skip("empty_text", "the caption is empty")
    prompt = doc.data["turns"][0]["value"].replace(IMAGE_PLACEHOLDER, "").strip()
    info = {"key": key, "id": doc.data["id"], "caption": caption, "prompt": prompt,
            "url": doc.data["names"][0]}  # fmt: skip
    return {"jpg": doc.encoded[0], "txt": caption, "json": info}


def build_conversation_shards(
    source: str | Path | Sequence[str | Path],
    out: str | Path,
    images_root: str | Path | Sequence[str | Path] | None = None,
    pairs: bool = False,
    samples_per_shard: int = 5000,
    resize_short_side: int | None = None,
    jpeg_quality: int = 95,
    workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> BuildReport:
    """Write LLaVA-format conversations (or, with ``pairs``, image-caption pairs) as shards.

    Skips, counted by reason: ``bad_row`` (not a LLaVA row), ``empty_text`` (an empty or
    missing gpt turn), ``marker_image_mismatch`` (the ``<image>`` markers in the turns do not
    match the row's images), ``missing_image``, ``corrupt_image``, ``remote_url``, and with
    ``pairs`` ``not_a_pair``. Text-only rows (no ``image``) are written without images.

    Args:
        source: LLaVA ``.json`` list(s) or ``.jsonl`` file(s), paths or glob patterns.
        out: Output shard folder.
        images_root: Folder(s) that relative ``image`` paths are looked up in, in order;
            default the source file's folder.
        pairs: Write ``jpg`` + ``txt`` (the gpt answer) pairs for stage-1 alignment.
        samples_per_shard: Samples per shard.
        resize_short_side: Downscale images whose short side is larger.
        jpeg_quality: Quality of re-encoded JPEGs.
        workers: Processes reading images.
        progress: Show a progress bar.
        overwrite: Replace shards already in ``out``.

    Returns:
        A :class:`~mmpt.shards.build.BuildReport`.

    Raises:
        FileNotFoundError: A source file or images folder does not exist.
        ValueError: A source is not a LLaVA JSON list / JSONL file, or a bad parameter.
    """
    files = source_files(source, (".json", ".jsonl"))
    roots = image_roots(images_root, files[0].parent)
    docs = (llava_doc(w, rec, roots, pairs) for f in files for w, rec in _records(f))
    meta = {
        "kind": "image-text" if pairs else "conversation",
        "source": ", ".join(str(f.resolve()) for f in files),
        "build": {"format": "llava", "pairs": pairs, "images_root": [str(r) for r in roots]},
    }
    return build_documents(
        docs, out, _pair if pairs else _conversation, meta, ["image", "text"],
        samples_per_shard, resize_short_side, jpeg_quality, workers, progress, overwrite,
    )  # fmt: skip

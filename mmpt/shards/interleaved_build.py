"""``mmpt data build --kind interleaved``: MMC4 jsonl or OBELICS-style rows -> shards."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mmpt.shards.build import BuildReport
from mmpt.shards.documents import (
    Doc,
    build_documents,
    image_roots,
    interleaved_sample,
    numbered_lines,
    source_files,
)
from mmpt.shards.mmc4 import DEFAULT_MIN_SIM, mmc4_docs
from mmpt.shards.obelics import obelics_docs


def source_format(path: Path) -> str:
    """``obelics`` for parquet and rows with ``texts``/``images``; ``mmc4`` for ``text_list``.

    Raises:
        ValueError: The first row of a ``.jsonl`` file is neither.
    """
    if path.suffix.lower() == ".parquet":
        return "obelics"
    for n, line in itertools.islice(numbered_lines(path), 1):
        try:
            first = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"--from {path}:{n} is not JSON ({e})") from e
        if isinstance(first, dict) and "text_list" in first:
            return "mmc4"
        if isinstance(first, dict) and "texts" in first and "images" in first:
            return "obelics"
    raise ValueError(
        f"--from {path}: expected MMC4 documents (text_list, image_info) or OBELICS-style rows "
        "(texts, images) one per line"
    )


def _compose(doc: Doc, key: str) -> dict[str, Any]:
    return interleaved_sample(doc, key, doc.data["parts"])


def build_interleaved_shards(
    source: str | Path | Sequence[str | Path],
    out: str | Path,
    images_root: str | Path | Sequence[str | Path] | None = None,
    min_sim: float | None = None,
    images_from_bytes: bool = False,
    samples_per_shard: int = 2000,
    resize_short_side: int | None = None,
    jpeg_quality: int = 95,
    workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> BuildReport:
    """Write interleaved documents (``0.jpg`` ..., json ``texts``/``images``) as shards.

    A document is skipped (counted by reason) for ``bad_row``, ``empty_text`` or ``no_image``
    (none of its images is usable); single images are dropped from a document that is still
    written (counted in ``dropped``): ``missing_image``, ``corrupt_image``, ``remote_url``,
    ``below_min_sim`` (MMC4), ``missing_bytes`` (``images_from_bytes``), ``bad_image_info``.

    Args:
        source: MMC4 ``.jsonl`` or OBELICS-style ``.parquet``/``.jsonl`` file(s) or patterns.
        out: Output shard folder.
        images_root: Folder(s) that image names/paths are looked up in, in order; default
            the first source file's folder.
        min_sim: MMC4: drop images whose ``matched_sim`` is below this (default 0.24).
        images_from_bytes: OBELICS: the ``images`` column holds the encoded images.
        samples_per_shard: Documents per shard.
        resize_short_side: Downscale images whose short side is larger.
        jpeg_quality: Quality of re-encoded JPEGs.
        workers: Processes reading images.
        progress: Show a progress bar.
        overwrite: Replace shards already in ``out``.

    Returns:
        A :class:`~mmpt.shards.build.BuildReport`.

    Raises:
        FileNotFoundError: A source file or images folder does not exist.
        ValueError: Unknown or mixed source formats, or a flag for the other format.
    """
    files = source_files(source, (".jsonl", ".parquet"))
    formats = {source_format(f) for f in files}
    if len(formats) > 1:
        raise ValueError("--from mixes MMC4 and OBELICS-style files; build them separately")
    fmt = formats.pop()
    if fmt == "mmc4" and images_from_bytes:
        raise ValueError("--images-from-bytes applies to OBELICS-style rows, not MMC4 documents")
    if fmt == "obelics" and min_sim is not None:
        raise ValueError("--min-sim applies to MMC4 documents (matched_sim), not OBELICS rows")
    roots = image_roots(images_root, files[0].parent)
    sim = DEFAULT_MIN_SIM if min_sim is None else min_sim
    docs: Iterator[Doc] = itertools.chain.from_iterable(
        mmc4_docs(f, roots, sim) if fmt == "mmc4" else obelics_docs(f, roots, images_from_bytes)
        for f in files
    )
    build = {"format": fmt, "images_root": [str(r) for r in roots]}
    build |= {"min_sim": sim} if fmt == "mmc4" else {"images_from_bytes": images_from_bytes}
    meta = {
        "kind": "interleaved",
        "source": ", ".join(str(f.resolve()) for f in files),
        "build": build,
    }
    return build_documents(
        docs, out, _compose, meta, ["image", "text"], samples_per_shard, resize_short_side,
        jpeg_quality, workers, progress, overwrite,
    )  # fmt: skip

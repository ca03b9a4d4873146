"""OBELICS-style documents (parquet, or JSON lines of the same rows) -> interleaved shards.

A row holds ``texts`` and ``images``: lists of equal length where each position is either a
text (``images`` null there) or an image (``texts`` null there). An image is encoded bytes
(a binary column, or the ``{"bytes", "path"}`` struct that HF ``datasets`` writes), or a
path or URL; OBELICS itself ships URLs, which cannot be fetched here: they are dropped and
counted as ``remote_url`` (download them first, e.g. with img2dataset).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmpt.shards.documents import Doc, ImageRef, find_image, numbered_lines

_BATCH_ROWS = 256


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ValueError(
            f"--from {path}: reading .parquet needs pyarrow (pip install pyarrow); or give the "
            "rows as .jsonl"
        ) from e
    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for a bad file
        raise ValueError(f"--from {path} is not a readable parquet file ({e})") from e
    missing = {"texts", "images"} - set(table.schema_arrow.names)
    if missing:
        raise ValueError(f"--from {path}: no column(s) {sorted(missing)} (OBELICS-style rows)")
    n = 0
    for batch in table.iter_batches(batch_size=_BATCH_ROWS, columns=["texts", "images"]):
        for row in batch.to_pylist():
            yield f"{path}[{n}]", row
            n += 1


def obelics_docs(path: Path, roots: list[Path], from_bytes: bool) -> Iterator[Doc]:
    """The documents of one ``.parquet`` or ``.jsonl`` file."""
    if path.suffix.lower() == ".parquet":
        rows: Iterator[tuple[str, Any]] = _parquet_rows(path)
    else:
        rows = ((f"{path}:{n}", _loads(line)) for n, line in numbered_lines(path))
    for where, row in rows:
        yield obelics_doc(where, row, roots, from_bytes)


def _loads(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def _image(value: Any, roots: list[Path], from_bytes: bool) -> ImageRef:
    if isinstance(value, dict):  # HF datasets' Image struct
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if from_bytes:
        return ("missing_bytes", "--images-from-bytes, but this image is not bytes")
    return find_image(value, roots)


def obelics_doc(where: str, row: Any, roots: list[Path], from_bytes: bool) -> Doc:
    """One OBELICS row -> a :class:`~.documents.Doc` laid out by ``interleaved_sample``."""
    texts = row.get("texts") if isinstance(row, dict) else None
    images = row.get("images") if isinstance(row, dict) else None
    if not isinstance(texts, list) or not isinstance(images, list):
        return Doc(where, problem=("bad_row", "needs 'texts' and 'images' lists"))
    if len(texts) != len(images):
        detail = f"{len(texts)} texts for {len(images)} images; the lists must be parallel"
        return Doc(where, problem=("bad_row", detail))
    parts: list[tuple[str, Any]] = []
    refs: list[ImageRef] = []
    for text, image in zip(texts, images, strict=True):
        if text is not None and image is not None:
            return Doc(where, problem=("bad_row", "a position holds both a text and an image"))
        if image is not None:
            parts.append(("image", len(refs)))
            refs.append(_image(image, roots, from_bytes))
        elif text is not None and str(text).strip():
            parts.append(("text", str(text).strip()))
    if not any(kind == "text" for kind, _ in parts):
        return Doc(where, problem=("empty_text", "no non-empty text"))
    if not refs:
        return Doc(where, problem=("no_image", "the document has no image"))
    return Doc(where, {"parts": parts, "meta": {}}, refs, optional=True)

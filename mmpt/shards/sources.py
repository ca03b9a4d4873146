"""Raw image-caption sources for ``mmpt data build``: CSV/TSV/JSONL tables, folders of pairs."""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE_COLUMNS = ("path", "filepath", "image", "file", "image_path")
CAPTION_COLUMNS = ("caption", "text", "title")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl")
REMOTE_PREFIXES = ("http://", "https://", "s3://", "gs://", "ftp://")


@dataclass
class Row:
    """One source record; the builder fills in the JPEG, or the problem that skips it."""

    url: str
    caption: str
    problem: tuple[str, str] | None = None  # (reason, detail)
    jpg: bytes = b""
    size: tuple[int, int] = (0, 0)
    original_size: tuple[int, int] = (0, 0)


def _pick_column(
    columns: list[str], given: str | None, candidates: tuple[str, ...], flag: str, source: Path
) -> str:
    if given is not None:
        if given not in columns:
            raise ValueError(
                f"{source}: no column {given!r} (given with {flag}); columns are: {columns}"
            )
        return given
    lowered = {c.lower(): c for c in columns}
    for name in candidates:
        if name in lowered:
            return lowered[name]
    raise ValueError(
        f"{source}: found none of the columns {list(candidates)}; columns are: {columns}. "
        f"Name the right one with {flag} COLUMN"
    )


def _resolve(value: Any, root: Path) -> tuple[str, tuple[str, str] | None]:
    text = "" if value is None else str(value).strip()
    if not text:
        return text, ("missing_image", "empty image path")
    if text.lower().startswith(REMOTE_PREFIXES):
        return text, ("remote_url", "download it first (e.g. with img2dataset)")
    path = Path(text).expanduser()
    return str(path if path.is_absolute() else root / path), None


def read_records(source: Path) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """(line number, record) for each row of a table; None for a line that is not an object."""
    if source.suffix.lower() == ".jsonl":
        with source.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        rec = None
                    yield n, rec if isinstance(rec, dict) else None
    else:
        delimiter = "\t" if source.suffix.lower() == ".tsv" else ","
        with source.open(encoding="utf-8-sig", newline="") as f:
            yield from enumerate(csv.DictReader(f, delimiter=delimiter), 2)


def open_table(
    source: Path, wanted: dict[str, tuple[str | None, tuple[str, ...], str]]
) -> tuple[Iterator[tuple[int, dict[str, Any] | None]], dict[str, str]]:
    """Open a CSV/TSV/JSONL table and pick its columns from the first row.

    Args:
        source: The table.
        wanted: Role (``"image_column"`` ...) -> (column given by the user or None, default
            candidates tried in order, the flag naming it in error messages).

    Returns:
        All (line number, record) pairs of :func:`read_records`, and role -> chosen column.

    Raises:
        ValueError: The table is empty, its first row is not an object, or a column is
            missing.

    """
    records = read_records(source)
    first = next(records, None)
    if first is None:
        raise ValueError(f"{source} has no rows; it needs a header row (CSV) or JSON objects")
    if first[1] is None:
        raise ValueError(f"{source}:{first[0]} is not a JSON object; give one object per line")
    columns = list(first[1])
    chosen = {
        role: _pick_column(columns, given, candidates, flag, source)
        for role, (given, candidates, flag) in wanted.items()
    }
    return itertools.chain([first], records), chosen


def table_rows(
    source: Path, root: Path, image_column: str | None, caption_column: str | None
) -> tuple[Iterator[Row], dict[str, str]]:
    """Open a CSV/TSV/JSONL table; returns its rows and the columns chosen."""
    records, chosen = open_table(
        source,
        {
            "image_column": (image_column, IMAGE_COLUMNS, "--image-column"),
            "caption_column": (caption_column, CAPTION_COLUMNS, "--caption-column"),
        },
    )
    img_col, cap_col = chosen["image_column"], chosen["caption_column"]

    def rows() -> Iterator[Row]:
        for n, rec in records:
            if rec is None:
                yield Row(f"{source}:{n}", "", ("bad_row", "not a JSON object"))
                continue
            url, problem = _resolve(rec.get(img_col), root)
            caption = rec.get(cap_col)
            yield Row(url, "" if caption is None else str(caption).strip(), problem)

    return rows(), chosen


def folder_rows(
    folder: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES, what: str = "image"
) -> list[Row]:
    """Media files under ``folder`` (recursively, sorted) with same-stem ``.txt`` captions.

    Args:
        folder: Folder to search.
        suffixes: Lower-case suffixes of the media files (default images).
        what: Name of one media file in error messages.

    """
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes and p.is_file())
    if not images:
        raise ValueError(
            f"{folder} holds no {what}s ({', '.join(suffixes)}); give a folder of {what} + "
            "same-stem .txt pairs, or a .csv/.tsv/.jsonl table"
        )
    rows = []
    for image in images:
        txt = image.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8", errors="replace") if txt.is_file() else None
        problem = None if caption is not None else ("missing_caption", f"no {txt.name}")
        rows.append(Row(str(image), (caption or "").strip(), problem))
    return rows

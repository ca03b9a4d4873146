"""Multiple-choice tables (MMBench/SEED/ScienceQA-style TSV, CSV or JSONL) -> choice eval shards.

One row per question. Columns (JSONL keys):

- ``index`` / ``id`` / ``question_id``: the question id (default: the line number);
- ``question``; ``hint`` and ``category`` (optional; empty or ``nan`` -> None);
- the options: columns ``A``, ``B``, ... (MMBench; empty cells end the list), or ``options``
  / ``choices`` as a ``{"A": text}`` object or a list (lettered A, B, ...);
- ``answer``: the letter, a 0-based index into a list of options, or the option's text;
- the image: ``image_path`` (a path under ``--images``), or ``image``: a path when it ends
  in an image suffix, else the base64-encoded image (MMBench). MMBench's circular TSVs
  store a short ``image`` that is the ``index`` of the row holding the picture; it is
  followed.
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import string
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmpt.shards.build import BuildReport
from mmpt.shards.documents import Doc, ImageRef, find_image, image_roots, source_files
from mmpt.shards.eval_sets import build_eval_shards, eval_record
from mmpt.shards.sources import IMAGE_SUFFIXES, read_records

ID_COLUMNS = ("index", "id", "question_id")
_LETTERS = string.ascii_uppercase


def _text(value: Any) -> str | None:
    """A cell as stripped text; None for missing, empty and ``nan`` (pandas' empty cell)."""
    if value is None:
        return None
    text = str(value).strip()
    return None if not text or text.lower() == "nan" else text


def _ident(rec: dict[str, Any], line: int) -> str:
    for col in ID_COLUMNS:
        if _text(rec.get(col)) is not None:
            return str(rec[col]).strip()
    return str(line)


def parse_options(rec: dict[str, Any]) -> dict[str, str]:
    """The row's options as ``{letter: text}`` (see the module docstring for the layouts)."""
    given = rec.get("options", rec.get("choices"))
    if isinstance(given, str):
        try:
            given = json.loads(given)
        except json.JSONDecodeError:
            given = None
    if isinstance(given, dict):
        return {str(k).strip(): t for k, v in given.items() if (t := _text(v)) is not None}
    if isinstance(given, list):
        texts = [_text(v) for v in given]
        return {_LETTERS[i]: t for i, t in enumerate(texts[:26]) if t is not None}
    options: dict[str, str] = {}
    for letter in _LETTERS:
        text = _text(rec.get(letter))
        if text is None:
            break
        options[letter] = text
    return options


def parse_answer(value: Any, options: dict[str, str]) -> str | None:
    """The answer as an option letter: a letter, a 0-based index, or an option's text."""
    if isinstance(value, int) and not isinstance(value, bool):
        return _LETTERS[value] if 0 <= value < len(options) else None
    text = _text(value)
    if text is None:
        return None
    letter = text.strip("()").rstrip(".").strip()
    if letter in options:
        return letter
    matches = [k for k, v in options.items() if v.strip().lower() == text.lower()]
    return matches[0] if len(matches) == 1 else None


def _image_ref(rec: dict[str, Any], roots: list[Path], by_index: dict[str, str]) -> ImageRef:
    """The row's image: a path, the decoded bytes, or why there is none."""
    if _text(rec.get("image_path")) is not None:
        return find_image(rec["image_path"], roots)
    value = _text(rec.get("image"))
    if value is None:
        return ("missing_image", "no image or image_path")
    if len(value) < 1024 and value.lower().endswith(IMAGE_SUFFIXES):
        return find_image(value, roots)
    if value.isdigit() and len(value) <= 64:
        if value not in by_index:
            return ("missing_image", f"image refers to row index {value}, which has no image")
        value = by_index[value]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        return ("corrupt_image", f"image column is neither a path nor base64 ({e})")


def _referenced_images(path: Path) -> dict[str, str]:
    """MMBench's circular TSVs: ``{index: base64}`` of the rows other rows point to."""
    wanted: set[str] = set()
    for _, rec in read_records(path):
        value = _text((rec or {}).get("image"))
        if value is not None and value.isdigit() and len(value) <= 64:
            wanted.add(value)
    if not wanted:
        return {}
    found: dict[str, str] = {}
    for line, rec in read_records(path):
        value = _text((rec or {}).get("image"))
        if rec and value and not value.isdigit() and _ident(rec, line) in wanted:
            found[_ident(rec, line)] = value
    return found


def mcq_docs(path: Path, roots: list[Path]) -> Iterator[Doc]:
    """One :class:`Doc` per question row, or its skip reason."""
    by_index = _referenced_images(path)
    for line, rec in read_records(path):
        where = f"{path}:{line}"
        question = _text((rec or {}).get("question"))
        if rec is None or question is None:
            yield Doc(where, problem=("bad_row", "not a record with a 'question'"))
            continue
        options = parse_options(rec)
        if len(options) < 2:
            yield Doc(where, problem=("no_options", f"{len(options)} option(s); needs >= 2"))
            continue
        answer = parse_answer(rec.get("answer"), options)
        if answer is None:
            got = rec.get("answer")
            yield Doc(where, problem=("no_answer", f"answer {got!r} is not one of the options"))
            continue
        record = {
            "id": _ident(rec, line),
            "question": question,
            "options": options,
            "answer": answer,
            "hint": _text(rec.get("hint")),
            "category": _text(rec.get("category")),
        }
        yield Doc(where, eval_record("choice", record), [_image_ref(rec, roots, by_index)])


def build_mcq_shards(
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
    """Write a multiple-choice table as choice eval shards (``jpg`` + json question/options).

    Skips, counted by reason: ``bad_row``, ``no_options`` (fewer than 2), ``no_answer`` (none,
    or not an option: MMBench's test split has no answers), ``missing_image``,
    ``corrupt_image``.

    Args:
        source: A ``.tsv``, ``.csv`` or ``.jsonl`` file.
        out: Output shard folder.
        images_root: Folder(s) image paths resolve against; default the file's folder.
        samples_per_shard: Questions per shard.
        resize_short_side: Downscale images whose short side is larger.
        jpeg_quality: Quality of re-encoded JPEGs.
        workers: Processes reading images.
        progress: Show a progress bar.
        overwrite: Replace shards already in ``out``.

    Returns:
        A :class:`~mmpt.shards.build.BuildReport`.

    Raises:
        FileNotFoundError: The file or images folder does not exist.
        ValueError: No question could be written.
    """
    (path,) = source_files(source, (".tsv", ".csv", ".jsonl"))
    roots = image_roots(images_root, path.parent)
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images exceed the 128 KiB default
    build = {"format": "mcq", "images_root": [str(r) for r in roots]}
    return build_eval_shards(
        mcq_docs(path, roots), out, "choice", str(path.resolve()), build,
        samples_per_shard, resize_short_side, jpeg_quality, workers, progress, overwrite,
    )  # fmt: skip

"""Inspect WebDataset shards: sample counts, keys, missing and corrupt samples, index drift.

Samples are read in the shapes the VLM reader (``mmpt.datamodules.vlm.VLMSample``) takes:

- **pair**: an image member (``jpg`` ...) and a caption (``txt``, ``json`` ``caption``/``text``);
- **interleaved**: ``json`` with parallel lists ``texts`` and ``images``, where ``images``
  names members such as ``"0.jpg"`` (tar files ``<key>.0.jpg``);
- **conversation**: ``json`` with ``messages`` (``role``/``content``) or LLaVA's
  ``conversations`` (``from``/``value``), images named by ``json`` ``images`` or the sample's
  single image member;
- **text**: a caption without any image; a problem unless the folder's ``index.json`` says
  the set is text-only (``meta.kind`` ``"text"``, or ``modalities`` without ``"image"``).

The report type and its rendering live in :mod:`mmpt.shards.inspect_report` (re-exported here).
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image

from mmpt.shards.index import INDEX_NAME, ShardIndex, load_index
from mmpt.shards.inspect_report import (  # noqa: F401 (re-exported)
    MAX_EXAMPLES,
    MAX_SHARD_ROWS,
    PROBLEM_KINDS,
    InspectReport,
    ShardStats,
    _images_summary,
    print_report,
)
from mmpt.shards.members import member_problem, refused_member

SHAPES = ("pair", "interleaved", "conversation", "text")
_NUMBERED = re.compile(r"^\d+\.(.+)$")  # "0.jpg": the n-th image of an interleaved sample


def _split_name(name: str) -> tuple[str, str] | None:
    """WebDataset's naming rule: the key runs to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not stem or not dot:  # no extension, or a hidden file: the loader skips it too
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _is_image(ext: str, image_keys: tuple[str, ...]) -> bool:
    """An image member: an image extension (``jpg``) or a numbered one (``0.jpg``)."""
    numbered = _NUMBERED.match(ext)
    return ext in image_keys or (numbered is not None and numbered.group(1) in image_keys)


def _decode_problem(ext: str, data: bytes, image: bool) -> str | None:
    """Why ``data`` fails to decode as an image (``image``) or json, or None when it decodes."""
    try:
        if image:
            with Image.open(io.BytesIO(data)) as im:
                im.verify()
            with Image.open(io.BytesIO(data)) as im:
                im.load()
        elif ext == "json" or ext.endswith(".json"):
            json.loads(data)
    except Exception as e:  # any failure is the sample's fault: report it, go on
        return f"corrupt {ext}: {type(e).__name__}: {e}"
    return None


def _json_meta(data: bytes | None) -> dict[str, Any]:
    """The sample's ``json`` as a dict; {} when absent, not a dict or unparsable."""
    if data is None:
        return {}
    try:
        meta = json.loads(data)
    except (ValueError, UnicodeDecodeError):  # reported as corrupt json under --check
        return {}
    return meta if isinstance(meta, dict) else {}


def _has_text(values: list[Any]) -> bool:
    """Whether any value is non-empty text once stripped (bytes are read as UTF-8)."""
    for v in values:
        if isinstance(v, bytes):
            v = v.decode("utf-8", errors="replace")
        if v is not None and str(v).strip():
            return True
    return False


def _named_images(meta: dict[str, Any]) -> list[str] | None:
    """Member names listed in ``json`` ``images`` (nulls dropped), or None when not a list."""
    names = meta.get("images")
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list):
        return None
    return [str(n).lower() for n in names if n is not None]


def classify_sample(
    files: dict[str, bytes | None],
    image_keys: tuple[str, ...] = ("jpg", "jpeg", "png", "webp"),
    text_keys: tuple[str, ...] = ("txt",),
    text_only: bool = False,
) -> tuple[str, list[str], list[tuple[str, str]]]:
    """A sample's shape, its image members and its problems, as the VLM reader sees it.

    Args:
        files: Extension -> contents of one sample (``None`` where not read); the text
            extensions and ``json`` must be read.
        image_keys: Extensions of an image member (``jpg``; numbered ``0.jpg`` count too).
        text_keys: Extensions that count as a caption.
        text_only: The set is text-only: a pair/text sample without image is fine.

    Returns:
        ``(shape, images, problems)``: shape is one of :data:`SHAPES`; images lists the
        members read as images (numbered ones and those named by ``json``); problems are
        ``(problem, kind)`` with kind one of :data:`PROBLEM_KINDS`.
    """
    meta = _json_meta(files.get("json"))
    problems: list[tuple[str, str]] = []
    images = [ext for ext in files if _is_image(ext, image_keys)]
    turns = meta.get("messages") or meta.get("conversations")
    if turns:
        shape = "conversation"
        turns = turns if isinstance(turns, list) else [turns]
        contents = [
            (t.get("content") if "content" in t else t.get("value")) if isinstance(t, dict) else t
            for t in turns
        ]
        if not _has_text(contents):
            problems.append(("empty text", "missing_text"))
        names = _named_images(meta)
        if names is None:  # the sample's single image, if any
            names = next(([k] for k in image_keys if k in files), [])
    elif "texts" in meta and "images" in meta:
        shape = "interleaved"
        texts, listed = meta["texts"], meta["images"]
        if not (isinstance(texts, list) and isinstance(listed, list)) or len(texts) != len(listed):
            n = [len(x) if isinstance(x, list) else type(x).__name__ for x in (texts, listed)]
            problems.append((f"interleaved json: {n[0]} texts for {n[1]} images", "corrupt_json"))
        texts = texts if isinstance(texts, list) else [texts]
        if not _has_text(texts):
            problems.append(("no text" if not texts else "empty text", "missing_text"))
        names = _named_images(meta) or []
    else:
        shape = "pair" if images else "text"
        texts = [files[ext] for ext in text_keys if ext in files]
        texts += [meta[k] for k in ("caption", "text") if k in meta]
        if not _has_text(texts):
            problems.append(("no text" if not texts else "empty text", "missing_text"))
        if not images and not text_only:
            problems.append(("no image", "missing_image"))
        names = []
    for name in dict.fromkeys(names):
        if name not in files:
            problems.append((f"image member {name!r} named in json is missing", "missing_member"))
        elif name not in images:
            images.append(name)
    return shape, images, problems


def _scan_shard(
    args: tuple[Path, str, bool, tuple[str, ...], tuple[str, ...], bool],
) -> tuple[ShardStats, Counter, list[dict[str, str]]]:
    """Read one tar; returns its stats, problem, shape and extension counts, and examples."""
    path, name, check, image_keys, text_keys, text_only = args
    stats, counts, examples = ShardStats(name), Counter(), []

    def note(key: str, problem: str, kind: str) -> None:
        counts[kind] += 1
        examples.append({"shard": name, "key": key, "problem": problem, "kind": kind})

    def finish(key: str | None, files: dict[str, bytes | None]) -> None:
        if key is None:
            return
        stats.samples += 1
        counts.update(f"ext:{ext}" for ext in files)
        shape, images, problems = classify_sample(files, image_keys, text_keys, text_only)
        counts[f"shape:{shape}"] += 1
        counts[f"images:{len(images)}"] += 1
        for problem, kind in problems:
            note(key, problem, kind)
        if not check:  # json is read for its shape, but a bad one counts only under check
            return
        for ext, data in files.items():
            image = ext in images
            problem = _decode_problem(ext, data, image) if data is not None else None
            if problem:
                note(key, problem, "corrupt_images" if image else "corrupt_json")

    key, files = None, {}
    try:
        with tarfile.open(path, "r|*") as tf:
            for member in tf:
                unsafe = member_problem(member.name)
                if unsafe is not None:
                    note(member.name, refused_member(name, member.name, unsafe), "unsafe_member")
                    continue
                parts = _split_name(member.name) if member.isfile() else None
                if parts is None:
                    continue
                if parts[0] != key:
                    finish(key, files)
                    key, files = parts[0], {}
                read = check or parts[1] in text_keys or parts[1] == "json"
                files[parts[1]] = tf.extractfile(member).read() if read else None
        finish(key, files)
    except (tarfile.TarError, OSError, EOFError) as e:
        stats.error = (
            f"unreadable or truncated tar ({type(e).__name__}: {e}) after {stats.samples} samples"
        )
    return stats, counts, examples


def _text_only(index: ShardIndex | None) -> bool:
    """Whether ``index.json`` marks the set as text-only (samples need no image)."""
    if index is None:
        return False
    return index.meta.get("kind") == "text" or bool(
        index.modalities and "image" not in index.modalities
    )


def _shard_paths(path: Path) -> tuple[list[tuple[Path, str]], ShardIndex | None]:
    """List the shards to read as (path, name), and the index to compare them with."""
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist; give a folder of .tar shards or a .tar file"
        )
    if path.is_file():
        if ".tar" not in path.name:
            raise ValueError(f"{path} is not a .tar file; give a folder of shards or a .tar file")
        return [(path, path.name)], load_index(path.parent)
    index = load_index(path)
    names = [s.name for s in index.shards] if index else []
    listed = set(names)  # a set: a list's ``in`` made this quadratic in the shard count
    names += [p.name for p in sorted(path.glob("*.tar")) if p.name not in listed]
    if not names:
        raise ValueError(f"{path} holds no .tar shards and no {INDEX_NAME}; nothing to inspect")
    return [(path / n, n) for n in names], index


def inspect_shards(
    path: str | Path,
    check: bool = False,
    image_keys: tuple[str, ...] = ("jpg", "jpeg", "png", "webp"),
    text_keys: tuple[str, ...] = ("txt",),
    workers: int = 1,
) -> InspectReport:
    """Read every shard and report counts, extensions, problems and drift from ``index.json``.

    Args:
        path: A folder of shards (the shards named in its ``index.json`` plus any other
            ``*.tar``; sorted by name without an index) or a single ``.tar`` file (compared
            with its folder's ``index.json`` entry when there is one).
        check: Also decode every image (PIL verify + load) and parse every json.
        image_keys: Extensions that count as an image; numbered members (``0.jpg``) with
            these extensions and members named by a sample's ``json`` count too.
        text_keys: Extensions that count as a caption (``json`` ``caption``, ``text``,
            ``texts`` and conversation turns count too).
        workers: Processes reading shards in parallel.

    Returns:
        An :class:`InspectReport`; a truncated or unreadable tar is reported, not raised.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is neither a shard folder nor a ``.tar`` file, or its
            ``index.json`` is invalid.

    """
    shards, index = _shard_paths(Path(path))
    report = InspectReport(
        path=str(path), index_found=index is not None, checked=check, text_only=_text_only(index)
    )
    expected = {s.name: s.samples for s in index.shards} if index else {}
    keys = (tuple(k.lower() for k in image_keys), tuple(k.lower() for k in text_keys))
    todo = [(p, name, check, *keys, report.text_only) for p, name in shards if p.is_file()]
    if workers > 1 and len(todo) > 1:
        from mmpt.shards.build import pool_context

        with pool_context().Pool(min(workers, len(todo))) as pool:
            results = list(pool.imap(_scan_shard, todo))
    else:
        results = [_scan_shard(t) for t in todo]
    scanned = {stats.name: (stats, counts, examples) for stats, counts, examples in results}
    totals: Counter = Counter()
    for _, name in shards:
        stats, counts, examples = scanned.get(name, (ShardStats(name, error="missing"), {}, []))
        stats.expected = expected.get(name)
        report.shards.append(stats)
        totals.update(counts)
        report.examples += examples  # every problem sample (the text report shows a few)
        if stats.error == "missing":
            report.mismatches.append(f"{name} is listed in {INDEX_NAME} but the file is missing")
        elif index is not None and stats.expected is None:
            report.mismatches.append(f"{name} is not listed in {INDEX_NAME}")
        elif stats.expected is not None and stats.expected != stats.samples:
            report.mismatches.append(
                f"{name}: {INDEX_NAME} says {stats.expected} samples, found {stats.samples}"
            )
    report.extensions = {k[4:]: v for k, v in sorted(totals.items()) if k.startswith("ext:")}
    report.shapes = {s: totals[f"shape:{s}"] for s in SHAPES if totals[f"shape:{s}"]}
    per_sample = {int(k[7:]): v for k, v in totals.items() if k.startswith("images:")}
    report.images_per_sample = dict(sorted(per_sample.items()))
    report.images = sum(n * v for n, v in per_sample.items())
    for kind in PROBLEM_KINDS:
        setattr(report, kind, totals[kind])
    found = sorted(report.extensions)
    if index is not None and Path(path).is_dir() and index.keys and sorted(index.keys) != found:
        report.mismatches.append(
            f"{INDEX_NAME} lists keys {sorted(index.keys)}, shards hold {found}"
        )
    return report

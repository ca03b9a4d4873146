"""Shared loop of the format builders (LLaVA, MMC4, OBELICS, Karpathy, ImageFolder).

A format module turns its source into :class:`Doc` items (what to write, which images to
read, or why the row is skipped) and a ``compose`` function that lays out one written
sample; :func:`build_documents` reads and checks the images in worker processes, counts the
skips and dropped images by reason, and writes the shards with :func:`~.build.write_rows`.
"""

from __future__ import annotations

import functools
import glob
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmpt.shards.build import (
    BuildReport,
    check_build_params,
    encode_image,
    prepare_out_dir,
    record_result,
    warn_skipped,
    write_rows,
)
from mmpt.shards.sources import REMOTE_PREFIXES, Row
from mmpt.shards.writer import ShardWriter

#: A skipped row or dropped image: (reason, detail).
Problem = tuple[str, str]
#: An image to read: a file path, the encoded bytes, or the problem that rules it out.
ImageRef = str | bytes | Problem


class Skip(Exception):  # noqa: N818 - a control signal, not an error
    """Raised by a ``compose`` function: the sample is skipped with ``(reason, detail)``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


@dataclass
class Doc:
    """One source row on its way to a sample.

    Attributes:
        source: Where the row came from (``file:line``), for skip reports.
        data: Format-specific content that ``compose`` lays out (turns, texts ...).
        images: The row's images, in order (see :data:`ImageRef`).
        problem: Why the whole row is skipped, or None.
        optional: A bad image is dropped (counted in ``dropped``) instead of skipping the row.
        encoded: Filled in by the worker: JPEG bytes per image, None where dropped.
        dropped: Filled in by the worker: (reason, detail) of each dropped image.
    """

    source: str
    data: Any = None
    images: list[ImageRef] = field(default_factory=list)
    problem: Problem | None = None
    optional: bool = False
    encoded: list[bytes | None] = field(default_factory=list)
    dropped: list[Problem] = field(default_factory=list)


def image_roots(images_root: str | Path | Sequence[str | Path] | None, default: Path) -> list[Path]:
    """The folders relative image paths are looked up in, in order (``--images``, repeatable).

    Raises:
        FileNotFoundError: A given folder does not exist.
    """
    if images_root is None:
        return [default]
    given = [images_root] if isinstance(images_root, (str, Path)) else list(images_root)
    roots = [Path(r) for r in given]
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(f"images folder (--images) {root} does not exist")
    return roots


def find_image(value: Any, roots: list[Path]) -> ImageRef:
    """Resolve an image path against ``roots`` (the first that has it), or say why not."""
    text = "" if value is None else str(value).strip()
    if not text:
        return ("missing_image", "empty image path")
    if text.lower().startswith(REMOTE_PREFIXES):
        return ("remote_url", f"{text}: URLs cannot be fetched; download the images first")
    path = Path(text).expanduser()
    if path.is_absolute():
        return str(path)
    for root in roots:
        if (root / path).is_file():
            return str(root / path)
    return str(roots[0] / path)  # reads as missing_image, naming the first root


def source_files(
    source: str | Path | Sequence[str | Path], suffixes: tuple[str, ...]
) -> list[Path]:
    """Files given as paths or glob patterns (``--from`` may repeat), checked to exist.

    Raises:
        FileNotFoundError: A path or pattern matches no file.
        ValueError: A file's suffix is not one of ``suffixes``.
    """
    given = [source] if isinstance(source, (str, Path)) else list(source)
    files: list[Path] = []
    for item in given:
        text = str(item)
        matches = sorted(glob.glob(text)) if glob.has_magic(text) else [text]
        matches = [m for m in matches if Path(m).is_file()]
        if not matches:
            raise FileNotFoundError(f"--from {text}: no such file")
        files += [Path(m) for m in matches]
    for f in files:
        if f.suffix.lower() not in suffixes:
            raise ValueError(f"--from {f}: unsupported file type; give {'/'.join(suffixes)} files")
    return files


def load_images(doc: Doc, resize_short_side: int | None, jpeg_quality: int) -> Doc:
    """Read, check and JPEG-encode each image of ``doc`` (runs in pool workers)."""
    if doc.problem is not None:
        return doc
    for ref in doc.images:
        problem: Problem | None = None
        if isinstance(ref, tuple):
            problem = ref
        else:
            try:
                data = ref if isinstance(ref, bytes) else Path(ref).read_bytes()
            except OSError as e:
                problem = ("missing_image", f"{ref}: {e.strerror or type(e).__name__}")
        if problem is None:
            try:
                doc.encoded.append(encode_image(data, resize_short_side, jpeg_quality)[0])
                continue
            except Exception as e:  # any decode failure is a corrupt image, never a crash
                what = ref if isinstance(ref, str) else f"image {len(doc.encoded)}"
                problem = ("corrupt_image", f"{what}: {type(e).__name__}: {e}")
        if not doc.optional:
            doc.problem, doc.encoded = problem, []
            return doc
        doc.encoded.append(None)
        doc.dropped.append(problem)
    return doc


Compose = Callable[[Doc, str], dict[str, Any]]


def _write(compose: Compose, report: BuildReport, writer: ShardWriter, doc: Doc) -> None:
    """Write one loaded document, or count it as skipped."""
    for reason, _ in doc.dropped:
        report.dropped[reason] = report.dropped.get(reason, 0) + 1
    problem = doc.problem
    if problem is None:
        key = f"{report.written:09d}"
        try:
            sample = compose(doc, key)
        except Skip as s:
            problem = (s.reason, s.detail)
        else:
            writer.write({"__key__": key, **sample})
            report.written += 1
            return
    record_result(report, writer, Row(doc.source, "", problem))


def build_documents(
    docs: Iterable[Doc],
    out: str | Path,
    compose: Compose,
    meta: dict[str, Any],
    modalities: list[str],
    samples_per_shard: int,
    resize_short_side: int | None,
    jpeg_quality: int,
    workers: int,
    progress: bool,
    overwrite: bool,
    total: int | None = None,
) -> BuildReport:
    """Load the images of ``docs`` and write each as ``compose(doc, key)`` into shards.

    Args:
        docs: The rows, in source order (read lazily).
        out: Output shard folder.
        compose: Loaded doc and its key -> the sample's members (``jpg``, ``json`` ...);
            raises :class:`Skip` to skip it.
        meta: ``index.json`` meta (``kind``, source, build options ...); the skip counts are
            added as ``skipped`` and ``dropped``.
        modalities: Recorded in the index.
        samples_per_shard: Samples per ``.tar`` shard.
        resize_short_side: Downscale images whose short side is larger; None keeps sizes.
        jpeg_quality: Quality of re-encoded JPEGs.
        workers: Processes reading images; 1 works in this process.
        progress: Show a progress bar.
        overwrite: Replace shards already in ``out``.
        total: Number of rows when known (for the progress bar).

    Returns:
        The :class:`~mmpt.shards.build.BuildReport`.
    """
    check_build_params(samples_per_shard, resize_short_side, jpeg_quality, workers)
    out = Path(out)
    prepare_out_dir(out, overwrite)
    report = BuildReport(out=str(out))
    work = functools.partial(
        load_images, resize_short_side=resize_short_side, jpeg_quality=jpeg_quality
    )
    write = functools.partial(_write, compose)
    writer = ShardWriter(out, samples_per_shard, modalities=modalities, meta=meta)
    with writer:
        write_rows(docs, work, writer, report, workers, progress, total, write=write, chunksize=4)
        writer.index.meta["skipped"] = dict(report.skipped)
        writer.index.meta["dropped"] = dict(report.dropped)
    report.shards = [str(out / s.name) for s in writer.index.shards]
    warn_skipped(report, meta.get("source", out))
    return report


def interleaved_sample(doc: Doc, key: str, parts: list[tuple[str, Any]]) -> dict[str, Any]:
    """An interleaved sample from ``(kind, value)`` parts: ``("text", str)``/``("image", i)``.

    Image ``i`` is ``doc.encoded[i]``; dropped images leave no placeholder. The sample holds
    ``0.jpg`` ... and ``json`` with the parallel lists ``texts`` and ``images``.

    Raises:
        Skip: ``no_image`` when no image is left.
    """
    texts: list[str | None] = []
    names: list[str | None] = []
    sample: dict[str, Any] = {}
    for kind, value in parts:
        if kind == "text":
            texts.append(value)
            names.append(None)
        elif doc.encoded[value] is not None:
            name = f"{len(sample)}.jpg"
            sample[name] = doc.encoded[value]
            texts.append(None)
            names.append(name)
    if not sample:
        raise Skip("no_image", f"none of its {len(doc.images)} image(s) could be used")
    sample["json"] = {"texts": texts, "images": names, "key": key, **(doc.data.get("meta") or {})}
    return sample


def numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a text file's non-blank lines."""
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, line

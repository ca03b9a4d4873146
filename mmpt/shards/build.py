"""Build img2dataset-style image-text shards from a CSV/JSONL table or a folder of pairs."""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mmpt.shards.image_encode import encode_image as encode_image
from mmpt.shards.index import INDEX_NAME
from mmpt.shards.sources import TABLE_SUFFIXES, Row, folder_rows, table_rows
from mmpt.shards.writer import ShardWriter

logger = logging.getLogger(__name__)

MAX_EXAMPLES = 10  # skipped items kept in the report and warned about one by one


@dataclass
class BuildReport:
    """What a build wrote and what it skipped.

    Attributes:
        out: The output shard folder.
        written: Samples written.
        skipped: Skipped sample counts by reason (``missing_image``, ``corrupt_image``,
            ``empty_caption``, ``missing_caption``, ``remote_url``, ``bad_row``).
        skipped_examples: The first few skipped items: ``source``, ``reason``, ``detail``.
        shards: Paths of the written ``.tar`` files.
        dropped: Parts dropped from documents, by reason (the images of an interleaved
            document: ``missing_image``, ``below_min_sim`` ...); a document left with no
            image is also counted in ``skipped`` (``no_image``).

    """

    out: str
    written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: list[dict[str, str]] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def total_skipped(self) -> int:
        """Number of skipped items over all reasons."""
        return sum(self.skipped.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, with ``total_skipped``."""
        return {**asdict(self), "total_skipped": self.total_skipped}


def _process(row: Row, resize_short_side: int | None, jpeg_quality: int) -> Row:
    """Check, and where needed resize and re-encode, one image (runs in pool workers)."""
    data = read_item(
        row, row.url, row.caption, ("empty_caption", "caption is empty"), "missing_image"
    )
    if data is None:
        return row
    try:
        row.jpg, row.size, row.original_size = encode_image(data, resize_short_side, jpeg_quality)
    except Exception as e:  # any decode failure means a corrupt image: skip it, never crash
        row.problem = ("corrupt_image", f"{type(e).__name__}: {e}")
    return row


def build_progress(enabled: bool, total: int | None) -> Any:
    """A rich progress bar over ``total`` items (a no-op context when not ``enabled``)."""
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )
    bar.add_task("building shards", total=total)
    return bar


def build_image_text_shards(
    source: str | Path,
    out: str | Path,
    images_root: str | Path | None = None,
    samples_per_shard: int = 10000,
    image_column: str | None = None,
    caption_column: str | None = None,
    resize_short_side: int | None = None,
    jpeg_quality: int = 95,
    workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> BuildReport:
    """Write image-text pairs as img2dataset-compatible WebDataset shards plus ``index.json``.

    Each sample is ``<key>.jpg``, ``<key>.txt`` and ``<key>.json`` (key, caption, url,
    width, height, original_width, original_height, status), keys ``000000000``,
    ``000000001`` ... in source order. An upright RGB/greyscale JPEG that needs no resize
    is copied byte for byte after a full decode check; anything else is converted to RGB
    (transparency onto white, EXIF orientation applied) and re-encoded as JPEG. A missing
    or undecodable image, or an empty caption, is skipped, counted by reason in the
    report and logged as a warning.

    Args:
        source: A ``.csv``/``.tsv`` file with a header row, a ``.jsonl`` file, or a folder of
            images with same-stem ``.txt`` captions (searched recursively).
        out: Output folder for the shards.
        images_root: Folder that relative image paths in a table resolve against; default
            the table's own folder.
        samples_per_shard: Samples per ``.tar`` shard.
        image_column: Table column with image paths; default the first of
            :data:`~mmpt.shards.sources.IMAGE_COLUMNS` present.
        caption_column: Table column with captions; default the first of
            :data:`~mmpt.shards.sources.CAPTION_COLUMNS` present.
        resize_short_side: Downscale images whose shorter side is larger than this (keeping
            the aspect ratio); never upscales. None keeps sizes.
        jpeg_quality: Quality for re-encoded JPEGs (1-100).
        workers: Processes decoding and encoding images; 1 works in this process.
        progress: Show a Rich progress bar on stderr.
        overwrite: Replace shards already in ``out`` instead of failing.

    Returns:
        A :class:`BuildReport`.

    Raises:
        FileNotFoundError: ``source`` or ``images_root`` does not exist.
        ValueError: Unsupported source, missing column, bad parameter, or ``out`` already
            holds shards.

    """
    source, out = Path(source), Path(out)
    _check_args(source, images_root, samples_per_shard, resize_short_side, jpeg_quality, workers)
    prepare_out_dir(out, overwrite)
    rows, columns, total = open_source(
        source, images_root, folder_rows,
        lambda table, root: table_rows(table, root, image_column, caption_column),
    )  # fmt: skip
    params = {
        "images_root": None if images_root is None else str(images_root),
        **columns,
        "samples_per_shard": samples_per_shard,
        "resize_short_side": resize_short_side,
        "jpeg_quality": jpeg_quality,
    }
    meta = {"kind": "image-text", "source": str(source.resolve()), "build": params}
    report = BuildReport(out=str(out))
    work = functools.partial(
        _process, resize_short_side=resize_short_side, jpeg_quality=jpeg_quality
    )
    writer = ShardWriter(out, samples_per_shard, modalities=["image", "text"], meta=meta)
    with writer:
        write_rows(rows, work, writer, report, workers, progress, total, chunksize=8)
        writer.index.meta["skipped"] = dict(report.skipped)
    report.shards = [str(out / s.name) for s in writer.index.shards]
    warn_skipped(report, source)
    return report


def _check_args(
    source: Path,
    images_root: str | Path | None,
    samples_per_shard: int,
    resize_short_side: int | None,
    jpeg_quality: int,
    workers: int,
) -> None:
    check_source(
        source, "a .csv/.tsv/.jsonl file", "image", images_root, "images folder (--images)"
    )
    check_build_params(samples_per_shard, resize_short_side, jpeg_quality, workers)


def check_build_params(
    samples_per_shard: int, resize_short_side: int | None, jpeg_quality: int, workers: int
) -> None:
    """The range checks every image builder shares, each naming its flag.

    Raises:
        ValueError: A value out of range.
    """
    short_ok = resize_short_side is None or resize_short_side >= 1
    checks = [
        ("samples_per_shard (--samples-per-shard)", samples_per_shard, samples_per_shard >= 1),
        ("resize_short_side (--resize-short-side)", resize_short_side, short_ok),
        ("jpeg_quality (1-100)", jpeg_quality, 1 <= jpeg_quality <= 100),
        ("workers (--workers)", workers, workers >= 1),
    ]  # fmt: skip
    check_ranges(checks)


def record_result(report: BuildReport, writer: ShardWriter, res: Row) -> None:
    """Write one processed item, or count and log it as skipped."""
    if res.problem is not None:
        reason, detail = res.problem
        report.skipped[reason] = report.skipped.get(reason, 0) + 1
        if len(report.skipped_examples) < MAX_EXAMPLES:
            report.skipped_examples.append({"source": res.url, "reason": reason, "detail": detail})
            logger.warning("skipping %s: %s (%s)", res.url, reason, detail)
        return
    key = f"{report.written:09d}"
    (w, h), (ow, oh) = res.size, res.original_size
    info = {"key": key, "caption": res.caption, "url": res.url, "width": w, "height": h,
            "original_width": ow, "original_height": oh, "status": "success"}  # fmt: skip
    writer.write({"__key__": key, "jpg": res.jpg, "txt": res.caption, "json": info})
    report.written += 1


def prepare_out_dir(out: str | Path, overwrite: bool = False) -> None:
    """Make sure ``out`` holds no shards from an earlier run, deleting them if ``overwrite``.

    Raises:
        ValueError: ``out`` already holds ``.tar`` files and ``overwrite`` is False.

    """
    out = Path(out)
    existing = sorted(out.glob("*.tar")) if out.is_dir() else []
    if existing and not overwrite:
        raise ValueError(
            f"{out} already holds {len(existing)} shard(s); choose an empty --out folder or "
            "pass overwrite=True (--overwrite) to replace them"
        )
    for path in [*existing, out / INDEX_NAME] if existing else []:
        path.unlink(missing_ok=True)


def write_rows(
    rows: Iterable[Any],
    work: Callable[[Any], Any],
    writer: ShardWriter,
    report: BuildReport,
    workers: int,
    progress: bool,
    total: int | None,
    *,
    write: Callable[[Any, ShardWriter, Any], None] = record_result,
    initializer: Callable[[], None] | None = None,
    chunksize: int = 1,
    batched: bool = False,
) -> None:
    """Run ``work`` over ``rows`` (in a pool when ``workers > 1``) and write each result.

    Results come back in the order of ``rows``; each goes to ``write(report, writer, result)``
    (default :func:`record_result`) and advances a progress bar over ``total`` items (None:
    unknown) by one. ``initializer`` runs in each pool worker, ``chunksize`` items go to a
    worker at a time, and with ``batched`` ``work`` returns a list of results.
    """
    # Workers come from a fork server, not a fork of this process: a fork copies whatever
    # locks this process's other threads hold (pyarrow's jemalloc background thread deadlocked
    # forked workers in their first malloc). The pool starts before the progress bar.
    with (
        pool_context().Pool(workers, initializer)
        if workers > 1
        else contextlib.nullcontext() as pool,
        build_progress(progress, total) as bar,
    ):
        for res in pool.imap(work, rows, chunksize) if pool else map(work, rows):
            for item in res if batched else (res,):
                write(report, writer, item)
                if bar is not None:
                    bar.advance(bar.task_ids[0])


def pool_context() -> multiprocessing.context.BaseContext:
    """``forkserver`` where the platform has it (Linux, macOS), else the default context."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else None)


def warn_skipped(
    report: BuildReport, source: str | Path, what: str = "items", log: logging.Logger = logger
) -> None:
    """Log one warning that sums up the skipped ``what`` by reason, if any were skipped."""
    if report.skipped:
        n = report.total_skipped
        log.warning("skipped %d of %d %s from %s: %s", n, n + report.written, what, source,
                    report.skipped)  # fmt: skip


def check_ranges(checks: list[tuple[str, Any, bool]]) -> None:
    """Raise for the first ``(name, value, ok)`` that is not ``ok``.

    Raises:
        ValueError: ``"{name} is out of range: got {value}"``.

    """
    for name, value, ok in checks:
        if not ok:
            raise ValueError(f"{name} is out of range: got {value}")


def one_torch_thread() -> None:
    """Pool initializer: one torch thread, as in DataLoader workers.

    A forked child whose parent already ran a parallel torch op would otherwise wait forever
    on the parent's GNU OpenMP thread team at its first parallel op.
    """
    import torch

    torch.set_num_threads(1)


def check_source(
    source: Path, given: str, kind: str, root: str | Path | None, root_name: str
) -> None:
    """Check a table-or-folder source and the folder its relative paths resolve against.

    Args:
        source: The table file or folder of pairs.
        given: What a table source is, as told in the error (``"a .csv/.tsv/.jsonl file"``).
        kind: What each pair holds besides its ``.txt`` (``"image"``).
        root: The folder relative paths resolve against, if given.
        root_name: How the error names ``root`` (``"images folder (--images)"``).

    Raises:
        FileNotFoundError: ``source`` or ``root`` does not exist.
        ValueError: ``source`` is a file that is not a table.

    """
    if not source.exists():
        raise FileNotFoundError(
            f"{source} does not exist; give {given} or a folder of {kind} + .txt pairs"
        )
    if source.is_file() and source.suffix.lower() not in TABLE_SUFFIXES:
        raise ValueError(
            f"{source}: unsupported source type {source.suffix!r}; give a "
            f"{'/'.join(TABLE_SUFFIXES)} file or a folder of {kind} + same-stem .txt pairs"
        )
    if root is not None and not Path(root).is_dir():
        raise FileNotFoundError(f"{root_name} {root} does not exist")


def open_source(
    source: Path,
    root: str | Path | None,
    folder: Callable[[Path], list[Any]],
    table: Callable[[Path, Path], tuple[Iterator[Any], dict[str, str]]],
) -> tuple[Iterator[Any], dict[str, str], int | None]:
    """Rows of a folder (``folder(source)``) or a table (``table(source, root)``).

    Returns:
        The rows, the table columns chosen (none for a folder) and the number of rows when
        known in advance (a folder's).

    """
    if source.is_dir():
        items = folder(source)
        return iter(items), {}, len(items)
    rows, columns = table(source, Path(root) if root is not None else source.parent)
    return rows, columns, None


def read_item(row: Any, path: str, text: str, empty: tuple[str, str], missing: str) -> bytes | None:
    """Read one item's file, or set ``row.problem`` and return None (runs in pool workers).

    An item whose ``row.problem`` is already set, or whose ``text`` is empty (the ``empty``
    problem), is not read; an unreadable file sets the ``missing`` reason.
    """
    if row.problem is None and not text:
        row.problem = empty
    if row.problem is not None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        row.problem = (missing, e.strerror or type(e).__name__)
        return None

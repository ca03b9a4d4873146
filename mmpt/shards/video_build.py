"""Build EgoClip-style video-text shards: cut narrated time windows out of long source videos."""

from __future__ import annotations

import functools
import io
import itertools
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from mmpt.shards.build import (
    BuildReport,
    check_ranges,
    one_torch_thread,
    prepare_out_dir,
    record_result,
    warn_skipped,
    write_rows,
)
from mmpt.shards.sources import TABLE_SUFFIXES, Row, read_records
from mmpt.shards.writer import ShardWriter

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("video_uid", "clip_start", "clip_end", "clip_text")
GROUP_ROWS = 16  # consecutive rows of one source video cut by one worker task (one probe)
CHUNK_FRAMES = 64  # frames decoded at a time, so long windows never sit in memory whole
X264_OPTIONS = {"preset": "medium"}  # ffmpeg's defaults; crf is a parameter


@dataclass
class VideoBuildReport(BuildReport):
    """What a video-text build wrote, skipped and clamped.

    Skip reasons: ``missing_video``, ``corrupt_video``, ``empty_narration``,
    ``empty_window`` (``clip_end <= clip_start``), ``duplicate_key`` and ``bad_row``
    (unparsable times or tags, no ``video_uid``, a tag id outside the vocabulary).

    Attributes:
        clamped: Written clips whose window reached past an end of the source video and was
            cut there (or moved inside it) by :func:`~mmpt.datamodules.video.clip_frames`.

    """

    clamped: int = 0


@dataclass
class ClipRow:
    """One table row; a worker fills in the cut clip, or the problem that skips it."""

    where: str  # "table:line", for the report
    key: str = ""
    video_uid: str = ""
    video: str = ""  # source path as given (relative to the videos root)
    path: str = ""  # source path resolved
    start: float = 0.0
    end: float = 0.0
    narration: str = ""
    noun_ids: list[int] = field(default_factory=list)
    verb_ids: list[int] = field(default_factory=list)
    problem: tuple[str, str] | None = None  # (reason, detail)
    mp4: bytes = b""
    info: dict[str, Any] = field(default_factory=dict)
    clamped: bool = False


def output_size(width: int, height: int, short: int | None = None) -> tuple[int, int]:
    """Size of the re-encoded clip: even sides (yuv420p), the short side ``short`` if given.

    Args:
        width: Source frame width.
        height: Source frame height.
        short: Target short side (even), keeping the aspect ratio; None keeps the size.

    Returns:
        ``(width, height)``, both even and at least 2.

    """

    def even(x: float) -> int:
        return max(2, 2 * round(x / 2))

    if short is None:
        return even(width), even(height)
    if height <= width:
        return even(width * short / height), short
    return short, even(height * short / width)


def _tags(value: Any) -> list[int]:
    """EgoClip tag list (``"[3, 17]"``, a JSON list, or empty) -> ints."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    tags = json.loads(value) if isinstance(value, str) else value
    if not isinstance(tags, list) or not all(isinstance(t, int) for t in tags):
        raise ValueError(f"tags must be a list of integers, got {value!r}")
    return tags


def _parse(
    index: int, where: str, rec: dict[str, Any] | None, root: Path, vocab: dict[str, list[str]]
) -> ClipRow:
    """One record -> :class:`ClipRow`; problems found without opening the video are set here."""
    row = ClipRow(where=where, key=f"{index:09d}")
    if rec is None:
        row.problem = ("bad_row", "not a JSON object")
        return row
    row.video_uid = str(rec.get("video_uid") or "").strip()
    row.video = str(rec.get("video_path") or "").strip() or f"{row.video_uid}.mp4"
    row.path = str(Path(row.video) if Path(row.video).is_absolute() else root / row.video)
    row.narration = str(rec.get("clip_text") or "").strip()
    clip_uid = str(rec.get("clip_uid") or "").strip()
    row.key = clip_uid or row.key
    try:
        row.start, row.end = float(rec["clip_start"]), float(rec["clip_end"])
        row.noun_ids, row.verb_ids = _tags(rec.get("tag_noun")), _tags(rec.get("tag_verb"))
    except (TypeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        row.problem = ("bad_row", f"{type(e).__name__}: {e}")
        return row
    if not row.video_uid and not str(rec.get("video_path") or "").strip():
        row.problem = ("bad_row", "no video_uid")
    elif "." in row.key or "/" in row.key:  # WebDataset splits keys at dots
        row.problem = ("bad_row", f"clip_uid {row.key!r} holds '.' or '/'")
    elif not (math.isfinite(row.start) and math.isfinite(row.end)):
        row.problem = ("bad_row", f"non-finite window [{row.start}, {row.end}]")
    elif row.end <= row.start:
        row.problem = ("empty_window", f"clip_end {row.end} <= clip_start {row.start}")
    elif not row.narration:
        row.problem = ("empty_narration", "clip_text is empty")
    for name, ids in (("nouns", row.noun_ids), ("verbs", row.verb_ids)):
        n = len(vocab.get(name, ()))
        if row.problem is None and name in vocab and any(not 0 <= i < n for i in ids):
            row.problem = ("bad_row", f"{name} {ids} outside the {n}-name --{name} vocabulary")
    return row


def _table(source: Path, root: Path, vocab: dict[str, list[str]]) -> Iterator[ClipRow]:
    """Rows of an EgoClip-style table, with duplicate keys flagged (checks the header now)."""
    records = read_records(source)
    first = next(records, None)
    if first is None:
        raise ValueError(f"{source} has no rows; it needs a header row (TSV/CSV) or JSON objects")
    if first[1] is None:
        raise ValueError(f"{source}:{first[0]} is not a JSON object; give one object per line")
    missing = [c for c in REQUIRED_COLUMNS if c not in first[1]]
    if missing:
        raise ValueError(
            f"{source}: no column(s) {missing}; columns are: {list(first[1])}. An EgoClip-style "
            f"table needs {', '.join(REQUIRED_COLUMNS)} (optional: tag_noun, tag_verb, "
            "video_path, clip_uid)"
        )

    def rows() -> Iterator[ClipRow]:
        seen: set[str] = set()
        for i, (line, rec) in enumerate(itertools.chain([first], records)):
            row = _parse(i, f"{source}:{line}", rec, root, vocab)
            if row.problem is None and row.key in seen:
                row.problem = ("duplicate_key", f"clip_uid {row.key!r} appeared before")
            seen.add(row.key)
            yield row

    return rows()


def _groups(rows: Iterator[ClipRow]) -> Iterator[list[ClipRow]]:
    """Runs of at most :data:`GROUP_ROWS` consecutive rows with the same source video."""
    for _, run in itertools.groupby(rows, key=lambda r: r.path):
        run_iter = iter(run)
        while chunk := list(itertools.islice(run_iter, GROUP_ROWS)):
            yield chunk


def _encode_window(
    data: bytes, first: int, end: int, fps: float, short: int | None, crf: int
) -> tuple[bytes, tuple[int, int]]:
    """Decode frames ``[first, end)`` in chunks and re-encode them as a libx264 yuv420p mp4."""
    import av

    from mmpt.datamodules.video import read_frames

    buf, stream = io.BytesIO(), None
    with av.open(buf, mode="w", format="mp4") as container:
        for a in range(first, end, CHUNK_FRAMES):
            frames = read_frames(data, list(range(a, min(a + CHUNK_FRAMES, end))), "pyav")
            for rgb in frames.permute(0, 2, 3, 1).contiguous().numpy():
                if stream is None:
                    rate = Fraction(fps).limit_denominator(100000)  # 29.97... -> 30000/1001
                    stream = container.add_stream("libx264", rate=rate)
                    stream.width, stream.height = output_size(rgb.shape[1], rgb.shape[0], short)
                    stream.pix_fmt = "yuv420p"
                    stream.codec_context.thread_count = 1  # same bytes for any --workers
                    stream.options = {**X264_OPTIONS, "crf": str(crf)}
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
                    width=stream.width, height=stream.height, format="yuv420p",
                    interpolation="BICUBIC",
                )  # fmt: skip
                container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buf.getvalue(), (stream.width, stream.height)


def _cut_group(rows: list[ClipRow], reencode_short: int | None, crf: int) -> list[ClipRow]:
    """Cut every row's window out of their shared source video (runs in pool workers)."""
    from mmpt.datamodules.video import clip_frames, probe

    todo = [r for r in rows if r.problem is None]
    if not todo:
        return rows
    try:
        data = Path(todo[0].path).read_bytes()
    except OSError as e:
        for r in todo:
            r.problem = ("missing_video", f"{r.path}: {e.strerror or type(e).__name__}")
        return rows
    try:
        info = probe(data, "pyav")  # PyAV: reads every frame size (decord 0.6 does not)
    except Exception as e:  # any failure to open means an undecodable video
        for r in todo:
            r.problem = ("corrupt_video", f"{r.path}: {type(e).__name__}: {e}")
        return rows
    for r in todo:
        try:
            first, end, r.clamped = clip_frames(info, r.start, r.end)
            r.mp4, (w, h) = _encode_window(data, first, end, info.fps, reencode_short, crf)
            out = probe(r.mp4, "pyav")
        except Exception as e:  # a frame that fails to decode: skip the clip, never crash
            r.problem = ("corrupt_video", f"{r.path}: {type(e).__name__}: {e}")
            continue
        r.info = {
            "key": r.key, "video_uid": r.video_uid, "clip_start": r.start, "clip_end": r.end,
            "narration": r.narration, "noun_ids": r.noun_ids, "verb_ids": r.verb_ids,
            "fps": out.fps, "num_frames": out.num_frames, "width": w, "height": h,
            "source": r.video, "source_frames": [first, end], "source_fps": info.fps,
            "clamped": r.clamped,
        }  # fmt: skip
    return rows


def _check_args(
    source: Path,
    videos_root: str | Path | None,
    samples_per_shard: int,
    reencode_short: int | None,
    crf: int,
    workers: int,
) -> None:
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist; give an EgoClip-style .tsv/.csv/.jsonl")
    if source.suffix.lower() not in TABLE_SUFFIXES:
        raise ValueError(
            f"{source}: unsupported source type {source.suffix!r}; give a "
            f"{'/'.join(TABLE_SUFFIXES)} table with {', '.join(REQUIRED_COLUMNS)}"
        )
    if videos_root is not None and not Path(videos_root).is_dir():
        raise FileNotFoundError(f"videos folder (--videos) {videos_root} does not exist")
    checks = [
        ("samples_per_shard (--samples-per-shard)", samples_per_shard, samples_per_shard >= 1),
        ("reencode_short (--reencode-short, even)", reencode_short,
         reencode_short is None or (reencode_short >= 2 and reencode_short % 2 == 0)),
        ("crf (0-51)", crf, 0 <= crf <= 51),
        ("workers (--workers)", workers, workers >= 1),
    ]  # fmt: skip
    check_ranges(checks)
    import av

    try:
        av.codec.Codec("libx264", "w")
    except ValueError as e:
        raise ValueError("this PyAV/FFmpeg build has no libx264 encoder") from e


def _vocab(path: str | Path) -> list[str]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]


def build_video_text_shards(
    source: str | Path,
    out: str | Path,
    videos_root: str | Path | None = None,
    samples_per_shard: int = 1000,
    reencode_short: int | None = None,
    crf: int = 23,
    nouns: str | Path | None = None,
    verbs: str | Path | None = None,
    workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> VideoBuildReport:
    """Cut one clip per row of an EgoClip-style table out of its source video, as shards.

    The table has ``video_uid``, ``clip_start`` and ``clip_end`` (seconds in the source
    video) and ``clip_text`` (the narration), optionally ``tag_noun``/``tag_verb``
    (EgoClip lists such as ``"[3, 17]"``), ``video_path`` (default ``<video_uid>.mp4``)
    and ``clip_uid``. Each sample is ``<key>.mp4`` (frames ``clip_frames(...)`` of the
    source, decoded with PyAV and re-encoded as libx264 yuv420p at the source's frame
    rate), ``<key>.txt`` (narration) and ``<key>.json`` (``video_uid``, ``clip_start``,
    ``clip_end`` as given, ``narration``, ``noun_ids``, ``verb_ids``, ``fps`` and
    ``num_frames`` of the written clip, ``width``, ``height``, ``source``,
    ``source_frames``, ``source_fps``, ``clamped``). The key is ``clip_uid`` when given,
    else the 0-based row index as ``000000000``; keys keep table order whatever
    ``workers``. Windows past an end of the video are clamped, kept and counted; other
    problems skip the row, counted by reason (:class:`VideoBuildReport`).

    Args:
        source: A ``.tsv``/``.csv`` file with a header row, or a ``.jsonl`` file.
        out: Output folder for the shards.
        videos_root: Folder that relative video paths resolve against; default the table's.
        samples_per_shard: Samples per ``.tar`` shard.
        reencode_short: Scale clips so the short side is this (even; up or down, keeping
            the aspect ratio; the long side rounded to even). None keeps the size (odd
            sides rounded to even).
        crf: libx264 constant rate factor (ffmpeg's default 23; lower is better quality).
        nouns: File with one noun name per line (tag ids index it); stored in the index.
        verbs: File with one verb name per line; stored in the index.
        workers: Processes decoding and encoding; 1 works in this process.
        progress: Show a Rich progress bar on stderr.
        overwrite: Replace shards already in ``out`` instead of failing.

    Returns:
        A :class:`VideoBuildReport`.

    Raises:
        FileNotFoundError: ``source``, ``videos_root`` or a vocabulary file does not exist.
        ValueError: Unsupported source, missing column, bad parameter, no libx264, or
            ``out`` already holds shards.

    """
    source, out = Path(source), Path(out)
    _check_args(source, videos_root, samples_per_shard, reencode_short, crf, workers)
    vocab = {name: _vocab(p) for name, p in (("nouns", nouns), ("verbs", verbs)) if p is not None}
    root = Path(videos_root) if videos_root is not None else source.parent
    rows = _table(source, root, vocab)
    prepare_out_dir(out, overwrite)
    params = {
        "videos_root": None if videos_root is None else str(videos_root),
        "samples_per_shard": samples_per_shard,
        "reencode_short": reencode_short,
        "codec": "libx264",
        "pix_fmt": "yuv420p",
        "x264": {**X264_OPTIONS, "crf": crf},
    }
    meta = {"kind": "video-text", "source": str(source.resolve()), "build": params, **vocab}
    report = VideoBuildReport(out=str(out))
    work = functools.partial(_cut_group, reencode_short=reencode_short, crf=crf)
    writer = ShardWriter(out, samples_per_shard, modalities=["video", "text"], meta=meta)
    with writer:
        write_rows(_groups(rows), work, writer, report, workers, progress, None, write=_write,
                   initializer=one_torch_thread, batched=True)  # fmt: skip
        writer.index.meta |= {"skipped": dict(report.skipped), "clamped": report.clamped}
    report.shards = [str(out / s.name) for s in writer.index.shards]
    warn_skipped(report, source, "rows", logger)
    return report


def _write(report: VideoBuildReport, writer: ShardWriter, row: ClipRow) -> None:
    """Write one cut clip, or count and log its row as skipped (as the image-text build)."""
    if row.problem is not None:
        record_result(report, writer, Row(row.where, "", row.problem))
        return
    writer.write({"__key__": row.key, "mp4": row.mp4, "txt": row.narration, "json": row.info})
    report.written += 1
    report.clamped += row.clamped

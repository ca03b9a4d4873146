"""Build audio-text shards (speech + transcripts, sounds + captions) from a table or folder."""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmpt.shards.build import (
    BuildReport,
    check_ranges,
    check_source,
    one_torch_thread,
    open_source,
    prepare_out_dir,
    read_item,
    record_result,
    warn_skipped,
    write_rows,
)
from mmpt.shards.sources import REMOTE_PREFIXES, Row, folder_rows, open_table
from mmpt.shards.writer import ShardWriter

if TYPE_CHECKING:
    from mmpt.datamodules.audio import Resampler

logger = logging.getLogger(__name__)

AUDIO_COLUMNS = ("audio", "path", "audio_path", "file", "filepath")
TEXT_COLUMNS = ("transcript", "text", "sentence", "caption")
#: Formats stored byte for byte when not resampling; others are re-encoded as FLAC.
COPY_SUFFIXES = (".flac", ".wav", ".mp3", ".ogg", ".opus")
AUDIO_SUFFIXES = (*COPY_SUFFIXES, ".m4a", ".aac", ".webm")
#: Suffixes whose decoding libsndfile settles alone (no PyAV fallback that might guess).
_SNDFILE_ONLY = (".flac", ".wav")


@dataclass
class AudioBuildReport(BuildReport):
    """What an audio-text build wrote and skipped.

    Skip reasons: ``missing_audio``, ``corrupt_audio``, ``empty_audio`` (0 frames),
    ``empty_transcript``, ``missing_transcript`` (folder mode: no ``.txt``), ``remote_url``
    and ``bad_row``.

    Attributes:
        hours: Total duration of the written clips in hours.
        sample_rates: Written clips per sample rate (``{"16000": 12}``).

    """

    hours: float = 0.0
    sample_rates: dict[str, int] = field(default_factory=dict)


@dataclass
class AudioRow:
    """One source item; a worker fills in the audio bytes, or the problem that skips it."""

    path: str
    transcript: str
    fields: dict[str, Any] = field(default_factory=dict)
    problem: tuple[str, str] | None = None  # (reason, detail)
    data: bytes = b""
    ext: str = ""


@functools.cache
def _resampler() -> Resampler:
    """This process's resampler (kernels cached per rate pair; one per pool worker)."""
    from mmpt.datamodules.audio import Resampler

    return Resampler()


def encode_pcm16(audio: np.ndarray, rate: int, fmt: str = "FLAC") -> bytes:
    """Encode float samples (frames,) or (frames, channels) in [-1, 1] as 16-bit audio.

    Args:
        audio: Samples; values outside [-1, 1] are clipped.
        rate: Sample rate in Hz.
        fmt: A libsndfile container: ``"FLAC"`` or ``"WAV"``.

    Returns:
        The file's bytes; same samples, same bytes.

    """
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(audio, -1.0, 1.0), rate, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def _process(row: AudioRow, resample: int | None) -> AudioRow:
    """Check, and where needed resample and re-encode, one file (runs in pool workers)."""
    empty = ("empty_transcript", "transcript is empty")
    data = read_item(row, row.path, row.transcript, empty, "missing_audio")
    if data is None:
        return row
    from mmpt.datamodules.audio import EmptyAudio, decode_audio

    suffix = Path(row.path).suffix.lower()
    try:  # ext without the dot; wav/flac never fall back to PyAV
        wave, rate = decode_audio(data, suffix[1:], fallback=suffix not in _SNDFILE_ONLY)
    except EmptyAudio:
        wave, rate = None, 0
    except Exception as e:  # any decode failure means a corrupt file: skip it, never crash
        detail = getattr(e, "error_string", None) or str(e)  # libsndfile's, without the repr
        row.problem = ("corrupt_audio", f"{type(e).__name__}: {detail}")
        return row
    if wave is None or rate <= 0:
        row.problem = ("empty_audio", "no audio frames")
        return row
    source_info = {"source_sample_rate": rate, "source_channels": int(wave.shape[0])}
    if resample is not None:  # downmix to mono, then resample
        wave, rate = _resampler()(wave.mean(dim=0, keepdim=True), rate, resample), resample
    audio = np.ascontiguousarray(wave.T.numpy())  # (frames, channels)
    if resample is None and suffix in COPY_SUFFIXES:
        row.data, row.ext = data, suffix[1:]
    else:
        row.data, row.ext = encode_pcm16(audio, rate), "flac"
    frames, channels = audio.shape
    row.fields |= source_info | {
        "sample_rate": rate, "channels": channels, "num_samples": frames,
        "duration": round(frames / rate, 6),
    }  # fmt: skip
    return row


def _table(
    source: Path, root: Path, audio_column: str | None, text_column: str | None
) -> tuple[Iterator[AudioRow], dict[str, str]]:
    """Rows of a table (checks the header now) and the columns chosen."""
    records, columns = open_table(source, {
        "audio_column": (audio_column, AUDIO_COLUMNS, "--audio-column"),
        "text_column": (text_column, TEXT_COLUMNS, "--text-column"),
    })  # fmt: skip
    path_col, text_col = columns["audio_column"], columns["text_column"]

    def rows() -> Iterator[AudioRow]:
        for n, rec in records:
            if rec is None:
                yield AudioRow(f"{source}:{n}", "", problem=("bad_row", "not a JSON object"))
                continue
            given = str(rec.get(path_col) or "").strip()
            text = str(rec.get(text_col) or "").strip()
            extra = {k: v for k, v in rec.items() if k not in (path_col, text_col)}
            row = AudioRow(str(root / Path(given).expanduser()), text, extra)
            row.fields["source"] = given
            if not given:
                row.path, row.problem = f"{source}:{n}", ("missing_audio", "empty audio path")
            elif given.lower().startswith(REMOTE_PREFIXES):
                row.path, row.problem = given, ("remote_url", "download it first")
            yield row

    return rows(), columns


def _folder(source: Path) -> list[AudioRow]:
    """Audio files under ``source`` with same-stem ``.txt`` transcripts."""
    rows = []
    for r in folder_rows(source, AUDIO_SUFFIXES, "audio file"):
        problem = r.problem and ("missing_transcript", r.problem[1])
        rel = str(Path(r.url).relative_to(source))
        rows.append(AudioRow(r.url, r.caption, {"source": rel}, problem))
    return rows


def build_audio_text_shards(
    source: str | Path,
    out: str | Path,
    audio_root: str | Path | None = None,
    samples_per_shard: int = 2000,
    audio_column: str | None = None,
    text_column: str | None = None,
    resample: int | None = None,
    workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> AudioBuildReport:
    """Write audio clips with their transcripts (or captions) as WebDataset shards.

    Each sample is ``<key>.<ext>`` and ``<key>.json``, keys ``000000000`` ... in source
    order. The audio is the original file byte for byte when ``resample`` is None and it
    is FLAC/WAV/MP3/OGG/Opus (other formats become FLAC at their own rate); with
    ``resample`` it is decoded, downmixed to mono, resampled and written as 16-bit FLAC.
    The json holds every other field of the row (``language``, ``speaker``, ``label`` ...),
    ``transcript``, ``caption`` (the transcript unless the row has its own), ``key``,
    ``source`` (the path as given) and the written audio's ``sample_rate``, ``channels``,
    ``num_samples`` and ``duration`` (seconds), plus ``source_sample_rate`` and
    ``source_channels``. Every file is decoded in full
    (:func:`mmpt.datamodules.audio.decode_audio`: libsndfile, else PyAV); a missing,
    undecodable or empty file, or an empty transcript, is skipped, counted by reason in the
    report and logged. ``index.json`` ``meta`` holds the build parameters, skipped counts,
    total ``hours`` and the ``sample_rates`` histogram.

    Args:
        source: A ``.jsonl``/``.csv``/``.tsv`` table, or a folder of audio files with
            same-stem ``.txt`` transcripts (searched recursively).
        out: Output folder for the shards.
        audio_root: Folder that relative audio paths resolve against; default the table's.
        samples_per_shard: Samples per ``.tar`` shard.
        audio_column: Table column with audio paths; default the first of
            :data:`AUDIO_COLUMNS` present.
        text_column: Table column with the text; default the first of :data:`TEXT_COLUMNS`.
        resample: Target sample rate in Hz (mono 16-bit FLAC); None keeps the files.
        workers: Processes decoding and encoding; 1 works in this process.
        progress: Show a Rich progress bar on stderr.
        overwrite: Replace shards already in ``out`` instead of failing.

    Returns:
        An :class:`AudioBuildReport`.

    Raises:
        FileNotFoundError: ``source`` or ``audio_root`` does not exist.
        ValueError: Unsupported source, missing column, bad parameter, or ``out`` already
            holds shards.

    """
    source, out = Path(source), Path(out)
    _check_args(source, audio_root, samples_per_shard, resample, workers)
    rows, columns, total = open_source(
        source, audio_root, _folder,
        lambda table, root: _table(table, root, audio_column, text_column),
    )  # fmt: skip
    prepare_out_dir(out, overwrite)
    params = {
        "audio_root": None if audio_root is None else str(audio_root),
        **columns,
        "samples_per_shard": samples_per_shard,
        "resample": resample,
    }
    meta = {"kind": "audio-text", "source": str(source.resolve()), "build": params}
    report = AudioBuildReport(out=str(out))
    writer = ShardWriter(out, samples_per_shard, modalities=["audio", "text"], meta=meta)
    work = functools.partial(_process, resample=resample)
    with writer:
        write_rows(rows, work, writer, report, workers, progress, total, write=_write,
                   initializer=one_torch_thread, chunksize=4)  # fmt: skip
        report.sample_rates = dict(sorted(report.sample_rates.items(), key=lambda kv: int(kv[0])))
        writer.index.meta |= {"skipped": dict(report.skipped), "hours": report.hours,
                              "sample_rates": report.sample_rates}  # fmt: skip
    report.shards = [str(out / s.name) for s in writer.index.shards]
    warn_skipped(report, source, log=logger)
    return report


def _write(report: AudioBuildReport, writer: ShardWriter, row: AudioRow) -> None:
    """Write one clip, or count and log it as skipped (as the image-text build)."""
    if row.problem is not None:
        record_result(report, writer, Row(row.path, "", row.problem))
        return
    key = f"{report.written:09d}"
    info = {"caption": row.transcript, **row.fields, "transcript": row.transcript}
    writer.write({"__key__": key, row.ext: row.data, "json": {"key": key, **info}})
    report.written += 1
    rate = str(row.fields["sample_rate"])
    report.sample_rates[rate] = report.sample_rates.get(rate, 0) + 1
    report.hours += row.fields["duration"] / 3600


def _check_args(
    source: Path,
    audio_root: str | Path | None,
    samples_per_shard: int,
    resample: int | None,
    workers: int,
) -> None:
    check_source(source, "a .jsonl/.csv/.tsv table", "audio", audio_root, "audio folder (--audio)")
    checks = [
        ("samples_per_shard (--samples-per-shard)", samples_per_shard, samples_per_shard >= 1),
        ("resample (--resample, Hz)", resample, resample is None or resample >= 1000),
        ("workers (--workers)", workers, workers >= 1),
    ]  # fmt: skip
    check_ranges(checks)

"""Audio decode + resample benchmark: mmpt's audio pipeline vs the loop a user would write.

Synthetic speech-like clips (harmonics of a moving pitch, syllable envelope, noise; 2-8 s),
half at 44.1 kHz and half at 22.05 kHz, are encoded once (FLAC, or ``--format wav|mp3``) and
stored both as loose files and as ``.tar`` shards (``ShardWriter``: audio + ``json`` caption).
Target: 16 kHz mono, ``--max-seconds`` 10 (no clip is cropped). Five pipelines, same bytes:

- **plain loop** (naive baseline A): per file ``soundfile.read(dtype="float32")`` -> channel
  mean -> ``torchaudio.functional.resample(wave, sr, 16000)``, which rebuilds the sinc kernel
  per call.
- **cached loop** (strong baseline A): the same, with one ``torchaudio.transforms.Resample``
  per source rate, built once and reused.
- **mmpt AudioReader** (mmpt A): ``AudioReader.read(file bytes)`` (cached kernels), 1 process.
- **DataLoader, files** (baseline B): map-style Dataset of the cached loop's function,
  shuffled, ``--workers`` W, ``--batch-size`` B, a collate that pads to the longest clip.
- **mmpt ShardStream** (mmpt B): ``AudioTextDataModule`` (training stream) over the shards with
  ``make_loader``, W workers, batch B, length bucketing (``--bucket-batches``).

Pipelines alternate; each runs ``--repeats`` times and the median (min-max) is reported;
speedups are per repeat (a pipeline's pass against its baseline's in the same repeat). B
rates count from loader creation (worker start-up included) to the last batch. Padding fraction
= padded samples / all samples of the padded batches. Before timing, the script checks that
mmpt's waveforms (``AudioReader`` and the stream's first batch) equal the plain loop's within
1e-4 (max abs) and exits non-zero if not.

    python scripts/bench_audio.py --threads 1 --workers 2 --json /tmp/bench_audio.json
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
import torchaudio
from rich.console import Console
from rich.table import Table

from mmpt.datamodules.audio import AudioReader
from mmpt.datamodules.audio_text import AudioTextDataModule
from mmpt.datamodules.loader import make_loader
from mmpt.datamodules.streams import StreamConfig
from mmpt.preprocess import AudioPreprocess, Preprocess
from mmpt.shards import ShardWriter

RATES = (44100, 22050)
TARGET_SR = 16000
TOLERANCE = 1e-4
PIPELINES = {  # name -> (label, its baseline or None)
    "plain_loop": ("plain loop (sf.read + F.resample)", None),
    "cached_loop": ("cached loop (sf.read + cached Resample)", "plain_loop"),
    "mmpt_reader": ("mmpt AudioReader", "cached_loop"),
    "dataloader_files": ("DataLoader, loose files, pad", None),
    "mmpt_stream": ("mmpt ShardStream, tar, buckets", "dataloader_files"),
}
console = Console(width=130, highlight=False, markup=False)


def speech_like(seconds: float, rate: int, rng: np.random.Generator) -> np.ndarray:
    """Harmonics (< 4 kHz) of a gliding pitch, formant bump, ~4 Hz syllable envelope, noise."""
    t = np.arange(int(seconds * rate)) / rate
    base = rng.uniform(90, 240)
    drift = np.cumsum(rng.normal(0, 0.3, t.size // 800 + 2)).repeat(800)[: t.size]
    f0 = base * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t) + 0.02 * drift)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    wave = np.zeros_like(t)
    for k in range(1, int(4000 / (1.3 * base)) + 1):  # voiced energy up to ~4 kHz
        amp = 1 / k * (1 + 2 * np.exp(-(((k * base - rng.uniform(400, 900)) / 300) ** 2)))
        wave += amp * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
    envelope = np.clip(np.sin(2 * np.pi * rng.uniform(3, 5) * t + rng.uniform(0, 6)), 0.05, 1)
    wave = wave * envelope + rng.normal(0, 0.02 * np.abs(wave).max(), t.size)
    return (0.7 * wave / np.abs(wave).max()).astype(np.float32)


def encode(wave: np.ndarray, rate: int, fmt: str) -> bytes:
    if fmt != "mp3":
        buf = io.BytesIO()
        sf.write(buf, wave, rate, format=fmt.upper(), subtype="PCM_16")
        return buf.getvalue()
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp3") as out:
        stream = out.add_stream("libmp3lame", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(wave[None], format="flt", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return buf.getvalue()


def make_data(root: Path, a: argparse.Namespace) -> tuple[list[Path], Path, float]:
    """Loose files under ``root/files`` and shards under ``root/shards``; total seconds."""
    rng = np.random.default_rng(a.seed)
    (root / "files").mkdir()
    files, seconds = [], 0.0
    per_shard = max(1, math.ceil(a.clips / a.shards))
    with ShardWriter(root / "shards", samples_per_shard=per_shard, modalities=["audio"]) as w:
        for i in range(a.clips):
            dur = float(rng.uniform(*a.durations))
            rate = RATES[i % 2]
            data = encode(speech_like(dur, rate, rng), rate, a.format)
            path = root / "files" / f"{i:06d}.{a.format}"
            path.write_bytes(data)
            files.append(path)
            caption = {"caption": f"synthetic voice {i}, {dur:.1f} s at {rate} Hz"}
            w.write({"__key__": f"{i:06d}", a.format: data, "json": caption})
            seconds += dur
    return files, root / "shards", seconds


def plain_load(path: str | Path) -> torch.Tensor:
    """What a user writes: read, downmix, resample (kernel recomputed every call)."""
    wave, sr = sf.read(str(path), dtype="float32", always_2d=True)
    mono = torch.from_numpy(wave.T).mean(dim=0)
    return torchaudio.functional.resample(mono, sr, TARGET_SR)


_RESAMPLERS: dict[int, torchaudio.transforms.Resample] = {}


def cached_load(path: str | Path) -> torch.Tensor:
    """What a careful user writes: the same, with one ``Resample`` module per source rate."""
    wave, sr = sf.read(str(path), dtype="float32", always_2d=True)
    mono = torch.from_numpy(wave.T).mean(dim=0)
    if sr == TARGET_SR:
        return mono
    if sr not in _RESAMPLERS:
        _RESAMPLERS[sr] = torchaudio.transforms.Resample(sr, TARGET_SR)
    return _RESAMPLERS[sr](mono)


class FileDataset(torch.utils.data.Dataset):
    def __init__(self, files: list[Path]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:  # the user's map-style Dataset
        return cached_load(self.files[i])


def pad_collate(clips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([c.shape[0] for c in clips])  # what a user's collate_fn does
    return torch.nn.utils.rnn.pad_sequence(clips, batch_first=True), lengths


def set_threads(threads: int, worker_id: int) -> None:
    torch.set_num_threads(threads)  # worker_init_fn (a DataLoader worker starts with 1 thread)


def audio_pre(a: argparse.Namespace) -> AudioPreprocess:
    return AudioPreprocess(sample_rate=TARGET_SR, max_seconds=a.max_seconds)


def baseline_loader(files: list[Path], a: argparse.Namespace, seed: int) -> Any:
    return torch.utils.data.DataLoader(
        FileDataset(files), batch_size=a.batch_size, shuffle=True, num_workers=a.workers,
        collate_fn=pad_collate, generator=torch.Generator().manual_seed(seed),
        worker_init_fn=functools.partial(set_threads, a.threads) if a.workers else None,
    )  # fmt: skip


def mmpt_loader(shard_dir: Path, a: argparse.Namespace, seed: int, workers: int) -> Any:
    cfg = StreamConfig(urls=str(shard_dir), shuffle_buffer=a.shuffle_buffer)
    dm = AudioTextDataModule(
        train=cfg, batch_size=a.batch_size, num_workers=workers, seed=seed,
        bucket_batches=a.bucket_batches, preprocess=Preprocess(image=None, audio=audio_pre(a)),
    )  # fmt: skip
    dm.setup("fit")
    loader = make_loader(dm.train_stream, workers)
    if loader.num_workers:
        loader.worker_init_fn = functools.partial(set_threads, a.threads)
    return loader


def run_clips(clips: Iterable[torch.Tensor]) -> dict[str, float]:
    t0 = time.perf_counter()
    n = samples = 0
    for clip in clips:
        n, samples = n + 1, samples + clip.shape[0]
    return {"clips": n, "samples": samples, "padded_slots": 0, "s": time.perf_counter() - t0}


def run_batches(make: Any) -> dict[str, float]:
    t0 = time.perf_counter()
    n = samples = slots = 0
    for batch in make():
        audio, lengths = batch if isinstance(batch, tuple) else (batch.audio, batch.audio_lengths)
        n, samples, slots = n + len(lengths), samples + int(lengths.sum()), slots + audio.numel()
    return {"clips": n, "samples": samples, "padded_slots": slots, "s": time.perf_counter() - t0}


def check(files: list[Path], shard_dir: Path, a: argparse.Namespace) -> dict[str, Any]:
    """Max |mmpt - plain loop| for the first clips (AudioReader) and the stream's 1st batch."""
    reader = AudioReader(audio_pre(a), train=False)
    diffs: dict[str, float] = {}
    for path in files[: a.check_clips]:
        ref, ours = plain_load(path), reader.read(path.read_bytes(), a.format)
        diffs[f"cached:{path.stem}"] = (ref - cached_load(path)).abs().max().item()
        same = ref.shape == ours.shape
        diffs[f"reader:{path.stem}"] = (ref - ours).abs().max().item() if same else math.inf
    batch = next(iter(mmpt_loader(shard_dir, a, a.seed, workers=0)))
    by_key = {p.stem: p for p in files}
    for row, n, key in zip(batch.audio, batch.audio_lengths, batch.keys, strict=True):
        ref = plain_load(by_key[key])
        same = int(n) == ref.shape[0] and not row[int(n) :].any()
        diffs[f"stream:{key}"] = (ref - row[: int(n)]).abs().max().item() if same else math.inf
    worst = max(diffs.values())
    return {"max_abs_diff": worst, "tolerance": TOLERANCE, "passed": worst <= TOLERANCE,
            "compared": len(diffs), "per_clip": diffs}  # fmt: skip


def machine() -> dict[str, Any]:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln]
    return {
        "cpu": names[0] if names else platform.processor() or platform.machine(),
        "usable_cores": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__,
        "torchaudio": torchaudio.__version__, "soundfile": sf.__version__,
        "libsndfile": sf.__libsndfile_version__,
    }  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clips", type=int, default=400)
    p.add_argument("--durations", type=float, nargs=2, default=(2.0, 8.0), metavar=("MIN", "MAX"))
    p.add_argument("--format", choices=("flac", "wav", "mp3"), default="flac")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--bucket-batches", type=int, default=4, help="batches per sorted buffer")
    p.add_argument("--shuffle-buffer", type=int, default=64, help="mmpt stream, per worker")
    p.add_argument("--max-seconds", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads, main and workers")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--check-clips", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, metavar="OUT", help="write the results here")
    a = p.parse_args(argv)
    if a.clips < 2 or a.repeats < 1 or a.batch_size < 1 or a.workers < 0 or a.threads < 1:
        p.error("need --clips >= 2, --repeats >= 1, --batch-size >= 1, --threads >= 1")
    return a


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns what ``--json`` writes (exits 1 if the check fails)."""
    a = parse_args(argv)
    command = "python " + shlex.join(["scripts/bench_audio.py", *(argv or sys.argv[1:])])
    threads = torch.get_num_threads()
    torch.set_num_threads(a.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="bench_audio_") as tmp:
            result = bench(a, command, Path(tmp))
    finally:
        torch.set_num_threads(threads)
    report(result)
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=2) + "\n")
    if not result["check"]["passed"]:
        raise SystemExit(f"correctness check FAILED: max |diff| {result['check']['max_abs_diff']}")
    return result


def bench(a: argparse.Namespace, command: str, root: Path) -> dict[str, Any]:
    load_start, t0 = os.getloadavg(), time.perf_counter()
    files, shard_dir, seconds = make_data(root, a)
    data_s = time.perf_counter() - t0
    console.print(f"data: {a.clips} {a.format} clips, {seconds:.0f} s of audio ({data_s:.1f} s)")
    checked = check(files, shard_dir, a)
    verdict = "ok" if checked["passed"] else "FAILED"
    console.print(f"check: max |mmpt - plain loop| = {checked['max_abs_diff']:.2e} over "
                  f"{checked['compared']} clips (1e-4) [{verdict}]")  # fmt: skip
    if not checked["passed"]:
        return {"command": command, "check": checked, "pipelines": []}
    reader = AudioReader(audio_pre(a), train=False)
    runs: dict[str, Any] = {
        "plain_loop": lambda r: run_clips(plain_load(f) for f in files),
        "cached_loop": lambda r: run_clips(cached_load(f) for f in files),
        "mmpt_reader": lambda r: run_clips(reader.read(f.read_bytes(), a.format) for f in files),
        "dataloader_files": lambda r: run_batches(lambda: baseline_loader(files, a, a.seed + r)),
        "mmpt_stream": lambda r: run_batches(
            lambda: mmpt_loader(shard_dir, a, a.seed + r, a.workers)
        ),
    }
    times: dict[str, list[dict[str, float]]] = {k: [] for k in runs}
    for r in range(a.repeats):
        for name in list(runs)[:: 1 if r % 2 == 0 else -1]:
            times[name].append(runs[name](r))
            x = times[name][-1]
            console.print(f"repeat {r + 1} {name}: {x['clips'] / x['s']:.1f} clips/s")
    rows = []
    for name, xs in times.items():
        rates = [x["clips"] / x["s"] for x in xs]
        audio = [x["samples"] / TARGET_SR / x["s"] for x in xs]
        slots, samples = sum(x["padded_slots"] for x in xs), sum(x["samples"] for x in xs)
        rows.append({
            "pipeline": name, "label": PIPELINES[name][0], "baseline": PIPELINES[name][1],
            "clips": xs[0]["clips"], "clips_per_s": statistics.median(rates),
            "clips_per_s_min": min(rates), "clips_per_s_max": max(rates),
            "audio_s_per_s": statistics.median(audio),
            "padding_fraction": (slots - samples) / slots if slots else None,
            "seconds": [round(x["s"], 3) for x in xs],
        })  # fmt: skip
    by = {r["pipeline"]: r for r in rows}
    for row in rows:
        base = row["baseline"]
        row["speedup"] = row["clips_per_s"] / by[base]["clips_per_s"] if base else None
        pairs = zip(times[row["pipeline"]], times[base] if base else [], strict=False)
        paired = [(x["clips"] / x["s"]) / (y["clips"] / y["s"]) for x, y in pairs]
        row["speedup_min"] = min(paired) if paired else None
        row["speedup_max"] = max(paired) if paired else None
    config = {k: v for k, v in vars(a).items() if k not in ("json", "durations")}
    config.update(durations=list(a.durations), rates=list(RATES), target_rate=TARGET_SR)
    return {
        "command": command, "machine": machine(),
        "load_avg_start": [round(x, 2) for x in load_start],
        "load_avg_end": [round(x, 2) for x in os.getloadavg()],
        "config": config, "audio_seconds": round(seconds, 2), "data_s": round(data_s, 2),
        "check": checked, "pipelines": rows,
    }  # fmt: skip


def report(r: dict[str, Any]) -> None:
    console.print(f"command: {r['command']}")
    if not r["pipelines"]:
        return
    m, c = r["machine"], r["config"]
    console.print(
        f"machine: {m['cpu']}, {m['usable_cores']} usable cores, torch threads {c['threads']}; "
        f"python {m['python']}, torch {m['torch']}, torchaudio {m['torchaudio']}, soundfile "
        f"{m['soundfile']} ({m['libsndfile']}); load avg {r['load_avg_start']} -> "
        f"{r['load_avg_end']}"
    )
    title = (
        f"{c['clips']} {c['format']} clips ({r['audio_seconds']:.0f} s, 44.1/22.05 kHz) -> "
        f"16 kHz mono; batch {c['batch_size']}, {c['workers']} workers; median of {c['repeats']}"
    )
    table = Table(title=title)
    for col in ("pipeline", "clips/s", "min-max", "audio s/s", "padding", "speedup"):
        table.add_column(col, justify="left" if col == "pipeline" else "right")
    for row in r["pipelines"]:
        pad = row["padding_fraction"]
        table.add_row(
            row["label"], f"{row['clips_per_s']:.1f}",
            f"{row['clips_per_s_min']:.1f}-{row['clips_per_s_max']:.1f}",
            f"{row['audio_s_per_s']:.0f}", "-" if pad is None else f"{pad:.1%}",
            "-" if row["speedup"] is None else
            f"{row['speedup']:.2f}x ({row['speedup_min']:.2f}-{row['speedup_max']:.2f})",
        )  # fmt: skip
    console.print(table)


if __name__ == "__main__":
    main()

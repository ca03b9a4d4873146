"""Video decoding benchmark: decord vs PyAV through ``VideoClipDecoder``, side by side.

Each measurement decodes every clip of a set once: probe, segment sampling of
``--num-frames`` frames (random per segment with ``--train``, middle frames with
``--eval``), decode, resize the short side and crop (:class:`VideoClipDecoder`), in a
DataLoader over a plain IterableDataset of the clips' mp4 bytes (held in memory, so no
shard I/O is timed). ``--workers 0`` is the single-process loop. Backends alternate inside
every repeat; the table gives the median clips/s over ``--repeat`` passes (min-max) and the
median per-clip decode time measured inside the worker.

Without ``--data`` two sets are generated into a temporary folder:

- ``synth-64``: ``mmpt.synth`` video-text train clips (``--small-clips``, default 300):
  64x64 px, 8 frames at 8 fps, libx264 CRF 23 (veryfast), decoded to 64 px (no resize).
- ``ego-256``: ``--real-clips`` (default 48) clips of 456x256 px (16:9, short side 256 as
  the pre-resized Ego4D chunks), 30 frames at 30 fps (1 s, about an EgoClip clip), libx264
  CRF 23 preset medium, one keyframe per clip with B-frames: a textured scene panning 4 px
  per frame plus per-frame noise; decoded to a 224 crop of the 256 short side.

    python scripts/bench_video.py --json /tmp/bench_video.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmpt.datamodules.video import VIDEO_BACKENDS, VideoClipDecoder
from mmpt.shards import ShardWriter, load_index


@dataclass
class ClipSet:
    name: str
    clips: list[bytes]
    size: int
    resize_short: int | None
    description: str


class RawClips(IterableDataset):
    """mp4 bytes -> (frames, decode ms); worker ``k`` of ``n`` takes clips ``k, k+n, ...``."""

    def __init__(self, clips: list[bytes], decoder: VideoClipDecoder) -> None:
        self.clips, self.decoder = clips, decoder

    def __iter__(self):
        info = get_worker_info()
        k, n = (info.id, info.num_workers) if info is not None else (0, 1)
        for data in self.clips[k::n]:
            t0 = time.perf_counter()
            frames, _ = self.decoder(data)
            yield frames, (time.perf_counter() - t0) * 1000


def read_clips(folder: Path) -> list[bytes]:
    import webdataset as wds

    urls = [str(folder / s.name) for s in load_index(folder).shards]
    return [s["mp4"] for s in wds.WebDataset(urls, shardshuffle=False) if "mp4" in s]


def ego_frames(rng: np.random.Generator, width: int, height: int, n: int) -> np.ndarray:
    """A smooth random texture panning 4 px per frame, plus per-frame noise: (n, H, W, 3)."""
    from PIL import Image

    span = width + 4 * n
    coarse = rng.integers(0, 256, (height // 16 + 1, span // 16 + 1, 3), dtype=np.uint8)
    texture = np.asarray(Image.fromarray(coarse).resize((span, height), Image.Resampling.BICUBIC))
    out = np.empty((n, height, width, 3), np.uint8)
    for t in range(n):
        noise = rng.integers(-6, 7, (height, width, 3))
        out[t] = np.clip(texture[:, 4 * t : 4 * t + width].astype(int) + noise, 0, 255)
    return out


def encode_x264(frames: np.ndarray, fps: int, preset: str) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as c:
        s = c.add_stream("libx264", rate=fps, options={"crf": "23", "preset": preset})
        s.height, s.width = frames.shape[1:3]
        s.pix_fmt = "yuv420p"
        s.codec_context.thread_count = 1
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    return buf.getvalue()


def make_ego_set(out: Path, clips: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    with ShardWriter(out, 500, modalities=["video", "text"], meta={"kind": "video-text"}) as w:
        for i in range(clips):
            mp4 = encode_x264(ego_frames(rng, 456, 256, 30), 30, "medium")
            w.write({"__key__": f"{i:09d}", "mp4": mp4, "txt": "#C C pans", "json": {"i": i}})
    return out


def clip_sets(a: argparse.Namespace, tmp: Path) -> list[ClipSet]:
    if a.data is not None:
        folder = a.data if (a.data / "index.json").is_file() else a.data / "train"
        size, short = a.size or 224, a.resize_short or (None if a.size else 256)
        return [ClipSet(folder.name, read_clips(folder), size, short, f"clips of {folder}")]
    from mmpt.synth import make_synthetic

    small = make_synthetic(
        "video-text", tmp / "synth", train_samples=a.small_clips, val_samples=1,
        mcq_samples=1, image_size=64, num_frames=8, fps=8, seed=a.seed,
    )  # fmt: skip
    ego = make_ego_set(tmp / "ego", a.real_clips, a.seed)
    sets = [
        ClipSet("synth-64", read_clips(Path(small["train"])), 64, None,
                "mmpt.synth video-text train clips, 64x64, 8 frames at 8 fps, libx264 CRF 23"),
        ClipSet("ego-256", read_clips(ego), 224, 256,
                "456x256, 30 frames at 30 fps, libx264 CRF 23 medium, panning texture + noise"),
    ]  # fmt: skip
    for s in sets:
        kb = statistics.mean(len(c) for c in s.clips) / 1024
        s.description += f"; {len(s.clips)} clips, mean {kb:.1f} KB"
    return sets


def make_loader(s: ClipSet, backend: str, num_frames: int, train: bool, workers: int):
    decoder = VideoClipDecoder(num_frames, train, backend, s.size, s.resize_short)
    return DataLoader(
        RawClips(s.clips, decoder), batch_size=None, num_workers=workers,
        persistent_workers=workers > 0,
    )  # fmt: skip


def measure(s: ClipSet, loader: DataLoader, num_frames: int) -> tuple[float, list[float]]:
    """One pass over the set: (clips/s, per-clip decode ms measured in the worker)."""
    t0 = time.perf_counter()
    ms = []
    for frames, t in loader:
        assert frames.shape == (num_frames, 3, s.size, s.size), frames.shape
        ms.append(t)
    return len(ms) / (time.perf_counter() - t0), ms


def sanity(s: ClipSet, backends: list[str], num_frames: int) -> dict[str, Any]:
    """Both backends on the first clip in eval mode: same indices, pixel difference."""
    out = {
        b: VideoClipDecoder(num_frames, False, b, s.size, s.resize_short)(s.clips[0])
        for b in backends
    }
    frames = [f.int() for f, _ in out.values()]
    return {
        "same_indices": len({tuple(m["indices"]) for _, m in out.values()}) == 1,
        "max_abs_diff": int(max((f - frames[0]).abs().max() for f in frames)),
    }


def machine() -> dict[str, Any]:
    import av
    import decord

    return {
        "cpu": platform.processor() or platform.machine(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "gpu": torch.cuda.is_available(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "decord": decord.__version__,
        "av": av.__version__,
    }


def run(a: argparse.Namespace, sets: list[ClipSet]) -> list[dict[str, Any]]:
    """Per configuration: start persistent loaders, one untimed warm-up pass each, then
    ``--repeat`` timed passes with the backend order alternating."""
    rows = []
    for s in sets:
        for n in a.num_frames:
            for w in a.workers:
                loaders = {b: make_loader(s, b, n, a.train, w) for b in a.backends}
                for b in a.backends:
                    measure(s, loaders[b], n)  # warm-up: worker start-up, imports, caches
                rates: dict[str, list[float]] = {b: [] for b in a.backends}
                times: dict[str, list[float]] = {b: [] for b in a.backends}
                for r in range(a.repeat):
                    for b in a.backends if r % 2 == 0 else a.backends[::-1]:
                        rate, ms = measure(s, loaders[b], n)
                        rates[b].append(rate)
                        times[b].extend(ms)
                del loaders  # stops the persistent workers
                for b in a.backends:
                    rows.append({
                        "set": s.name, "backend": b, "num_frames": n, "workers": w,
                        "mode": "train" if a.train else "eval", "clips": len(s.clips),
                        "clips_per_s": statistics.median(rates[b]),
                        "clips_per_s_min": min(rates[b]), "clips_per_s_max": max(rates[b]),
                        "ms_per_clip_median": statistics.median(times[b]),
                    })  # fmt: skip
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'set':<10} {'backend':<7} {'frames':>6} {'workers':>7} {'clips/s (min-max)':>22} "
          f"{'ms/clip med':>11}")  # fmt: skip
    for r in rows:
        rate = f"{r['clips_per_s']:.1f} ({r['clips_per_s_min']:.1f}-{r['clips_per_s_max']:.1f})"
        print(f"{r['set']:<10} {r['backend']:<7} {r['num_frames']:>6} {r['workers']:>7} "
              f"{rate:>22} {r['ms_per_clip_median']:>11.2f}")  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, help="shard folder (or a synth root: its train/)")
    p.add_argument("--small-clips", type=int, default=300, help="synth-64 clips (default 300)")
    p.add_argument("--real-clips", type=int, default=48, help="ego-256 clips (default 48)")
    p.add_argument("--num-frames", type=int, nargs="+", default=[4, 16])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--train", dest="train", action="store_true", default=True,
                      help="random frame per segment, random crop (default)")  # fmt: skip
    mode.add_argument("--eval", dest="train", action="store_false",
                      help="middle frame per segment, centre crop")  # fmt: skip
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--backends", nargs="+", default=list(VIDEO_BACKENDS), choices=VIDEO_BACKENDS)
    p.add_argument("--size", type=int, help="crop side for --data (default 224)")
    p.add_argument("--resize-short", type=int, help="short side for --data (default 256)")
    p.add_argument("--repeat", type=int, default=3, help="passes per configuration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # workers decode on one thread each, as in training
    try:
        return bench(a, argv)
    finally:
        torch.set_num_threads(threads)


def bench(a: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    command = "python scripts/bench_video.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mmpt_bench_video_") as tmp:
        t0 = time.perf_counter()
        sets = clip_sets(a, Path(tmp))
        gen_s = time.perf_counter() - t0
        checks = {s.name: sanity(s, a.backends, min(a.num_frames)) for s in sets}
        t0 = time.perf_counter()
        rows = run(a, sets)
        bench_s = time.perf_counter() - t0
    result = {
        "command": command,
        "machine": machine(),
        "load_avg_start": [round(x, 2) for x in load_start],
        "load_avg_end": [round(x, 2) for x in os.getloadavg()],
        "sets": {s.name: s.description for s in sets},
        "sanity": checks,
        "generate_s": round(gen_s, 1),
        "bench_s": round(bench_s, 1),
        "rows": rows,
    }
    print(command)
    m = result["machine"]
    print(f"machine: {m['cpu']}, {m['usable_cores']} usable cores, gpu={m['gpu']}; python "
          f"{m['python']}, torch {m['torch']}, decord {m['decord']}, av {m['av']}")  # fmt: skip
    print(f"load avg at start {result['load_avg_start']}, at end {result['load_avg_end']}")
    for name, desc in result["sets"].items():
        print(f"{name}: {desc}; backends agree: {checks[name]}")
    print(f"mode {'train' if a.train else 'eval'}; {a.repeat} repeat(s); generation {gen_s:.1f} s, "
          f"benchmark {bench_s:.1f} s")  # fmt: skip
    print_table(rows)
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

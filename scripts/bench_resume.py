"""Mid-epoch resume benchmark: mmpt's stream fast-forward vs open_clip's epoch restart.

On real image-text JPEG shards, through ``ImageTextDataModule`` (its sample function, collate,
``train_dataloader`` and ``state_dict``/``load_state_dict``), with ``--workers`` workers:

1. one uninterrupted epoch: time to its first batch (what open_clip's restart costs at any
   resume point, since its epoch's data starts over) and the steady decode + collate rate;
   the stream position is saved after 25%, 50% and 90% of its batches, as a checkpoint would;
2. a fresh datamodule resumed from each saved position: time to its first batch. Each worker
   rebuilds its raw stream and fast-forwards it (tar reads and the shuffle buffer, no decode);
   the extra time over the fresh epoch's first batch is the fast-forward;
3. the fast-forward rate (raw samples skipped per second per worker) next to the decode rate;
4. a check: the resumed run's keys plus the keys before the stop are the epoch's keys, once.

First-batch times are the median of ``--repeats`` runs (min-max); the first resumed run of
each point goes on to the end of the epoch for the check. One untimed first batch warms up
the page cache and lazy imports first.

    python scripts/bench_resume.py
"""

from __future__ import annotations

import argparse
import gc
import io
import os
import pickle
import platform
import random
import shlex
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmpt.datamodules.image_text import ImageTextDataModule
from mmpt.datamodules.stages import SkipCounter, read_shards, shuffle
from mmpt.datamodules.streams import StreamConfig
from mmpt.models.encoders.tokenizers import OpenCLIPTokenizer
from mmpt.preprocess import ImagePreprocess, Preprocess

WORDS = (
    "a photo of the red blue small large old new dog cat car house tree beach city street man "
    "woman child on in with at near front view sunset night garden table wooden vintage modern"
)


def synth_jpeg(w: int, h: int, rng: np.random.Generator) -> bytes:
    """A photo-like JPEG: smooth gradients, a wave pattern and noise."""
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
    c0, cx, cy = rng.uniform(0, 255, (3, 1, 1, 3)).astype(np.float32)
    fx, fy = rng.uniform(1, 8, 2)
    img = 0.4 * c0 + 0.6 * cx * x + 0.6 * cy * y - 0.3 * cx * y
    img = img + 40 * np.sin(2 * np.pi * fx * x) * np.cos(2 * np.pi * fy * y)
    img = img + rng.normal(0, 6, (h, w, 3)).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def make_shards(args: argparse.Namespace) -> tuple[Path, float]:
    """Write the shards once under ``--data`` and reuse them; returns (folder, mean JPEG KB)."""
    from mmpt.shards import ShardWriter

    lo, hi = args.min_px, args.max_px
    out = Path(args.data) / f"n{args.samples}-per{args.per_shard}-px{lo}-{hi}"
    if not (out / "index.json").exists():
        print(f"writing {args.samples} samples ({lo}-{hi} px JPEG) to {out} ...", flush=True)
        rng = np.random.default_rng(0)
        with ShardWriter(out, samples_per_shard=args.per_shard) as writer:
            for i in range(args.samples):
                w, h = (int(v) for v in rng.integers(lo, hi + 1, 2))
                caption = " ".join(rng.choice(WORDS.split(), int(rng.integers(4, 20))))
                sample = {"jpg": synth_jpeg(w, h, rng), "txt": caption}
                writer.write({"__key__": f"{i:09d}", **sample, "json": {"caption": caption}})
    tars = sorted(out.glob("*.tar"))
    kb = sum(p.stat().st_size for p in tars) / args.samples / 1024
    return out, kb


def make_dm(shard_dir: Path, args: argparse.Namespace) -> ImageTextDataModule:
    """The training datamodule, as ``mmpt fit`` builds it (CLIP preprocessing and tokenizer)."""
    pre = Preprocess(image=ImagePreprocess(size=args.image_size), tokenizer=OpenCLIPTokenizer(77))
    train = StreamConfig(urls=str(shard_dir), shuffle_buffer=args.shuffle_buffer)
    dm = ImageTextDataModule(
        train=train, batch_size=args.batch_size, num_workers=args.workers, preprocess=pre
    )
    dm.setup("fit")
    return dm


def shut(it: Any) -> None:
    """Stop a loader iterator's workers now, so they do not run into the next timing."""
    stop = getattr(it, "_shutdown_workers", None)
    if stop is not None:
        stop()
    gc.collect()


def run_epoch(
    shard_dir: Path,
    args: argparse.Namespace,
    state: dict[str, Any] | None = None,
    saves: dict[int, Any] | None = None,
    full: bool = True,
) -> dict[str, Any]:
    """Epoch 0 of a fresh datamodule, resumed from ``state`` if given.

    Args:
        shard_dir: The shards.
        args: Sizes and loader settings.
        state: A saved ``dm.state_dict()`` to resume from.
        saves: ``{batches taken: None}``; filled with the state after that many batches.
        full: Iterate to the end of the epoch (else stop after the first batch).

    Returns:
        ``first_s`` (from ``iter(loader)`` to the first batch), ``keys`` (per batch),
        ``rate`` (samples/s after the first batch), ``total`` (the epoch's batches).
    """
    dm = make_dm(shard_dir, args)
    if state is not None:
        dm.load_state_dict(pickle.loads(pickle.dumps(state)))  # as a checkpoint round trip
    loader = dm.train_dataloader()
    dm.set_epoch(0)
    total = len(dm.train_stream)
    t0 = time.perf_counter()
    it = iter(loader)
    keys: list[list[str]] = []
    first = t1 = None
    for batch in it:
        if first is None:
            t1 = time.perf_counter()
            first = t1 - t0
        dm.position.record(batch)  # what on_after_batch_transfer does in training
        dm.normalize(batch)
        keys.append(list(batch.keys))
        if saves is not None and len(keys) in saves:
            saves[len(keys)] = dm.state_dict()
        if not full:
            break
    end = time.perf_counter()
    shut(it)
    after = sum(len(k) for k in keys[1:])
    rate = after / (end - t1) if after and t1 is not None else None
    return {"first_s": first, "keys": keys, "rate": rate, "total": total}


def raw_read_rate(shard_dir: Path, args: argparse.Namespace) -> float:
    """Raw samples/s of one worker's tar reading + shuffle buffer, in this process, no decode."""
    tars = sorted(str(p) for p in shard_dir.glob("*.tar"))[:: max(1, args.workers)]
    t0 = time.perf_counter()
    samples = shuffle(read_shards(tars, SkipCounter()), args.shuffle_buffer, random.Random(0))
    n = sum(1 for _ in samples)
    return n / (time.perf_counter() - t0)


def machine() -> str:
    """CPU, usable cores and library versions."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln]
    cpu = names[0] if names else platform.processor() or platform.machine()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{cpu}; {cores} usable cores (os.cpu_count={os.cpu_count()}); "
        f"load average {os.getloadavg()[0]:.2f}; python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


def check(before: list[list[str]], rest: list[list[str]], whole: list[list[str]]) -> str:
    """``before + rest`` holds the uninterrupted epoch's keys, each once (else says why)."""
    got = Counter(k for b in before + rest for k in b)
    want = Counter(k for b in whole for k in b)
    n0, n1 = sum(map(len, before)), sum(map(len, rest))
    if got == want and set(got.values()) == {1}:
        return f"yes: {n0} + {n1} = {len(want)} keys, each once"
    twice = sum(1 for v in got.values() if v > 1)
    return f"NO: {n0} + {n1} keys, {twice} repeated, {len(set(want) - set(got))} missing"


def spread(xs: list[float]) -> str:
    """Median (min-max)."""
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


def bench(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Run every measurement and print the tables; returns the numbers."""
    shard_dir, kb = make_shards(args)
    print(f"shards: {shard_dir} ({args.samples} samples, {kb:.1f} KB per JPEG)", flush=True)
    dm = make_dm(shard_dir, args)
    dm.train_dataloader()  # sets the stream's worker count, so its length
    total = len(dm.train_stream)
    stops = {f: max(1, min(total - 1, round(f * total))) for f in args.fractions}
    saves: dict[int, Any] = dict.fromkeys(stops.values())
    run_epoch(shard_dir, args, full=False)  # untimed warm-up: page cache, lazy imports
    whole = run_epoch(shard_dir, args, saves=saves)
    if len(whole["keys"]) != total:
        raise SystemExit(f"the epoch made {len(whole['keys'])} batches, expected {total}")
    fresh = [whole["first_s"]]
    resumed: dict[float, list[float]] = {f: [] for f in args.fractions}
    checks: dict[float, str] = {}
    for r in range(args.repeats):
        if r:
            fresh.append(run_epoch(shard_dir, args, full=False)["first_s"])
        for f, k in stops.items():
            out = run_epoch(shard_dir, args, state=saves[k], full=r == 0)
            resumed[f].append(out["first_s"])
            if r == 0:
                checks[f] = check(whole["keys"][:k], out["keys"], whole["keys"])
        print(f"repeat {r + 1}/{args.repeats} done", flush=True)
    raw = raw_read_rate(shard_dir, args)

    decode = whole["rate"]
    per_worker = decode / max(1, args.workers)
    t_fresh = statistics.median(fresh)
    n_epoch = sum(map(len, whole["keys"]))
    fresh_check = "yes: each once" if set(Counter(sum(whole["keys"], [])).values()) == {1} else "NO"
    rows = [
        {
            "point": "epoch start (fresh; = open_clip's restart)",
            "fraction": 0.0,
            "trained": 0,
            "first_s": fresh,
            "ff_s": None,
            "skipped": 0,
            "rate": None,
            "check": f"{fresh_check} ({n_epoch} keys)",
        }
    ]
    for f, k in stops.items():
        workers = saves[k]["ranks"][0]["workers"].values()
        skipped = statistics.mean(w["main"] - len(w["main_redo"]) for w in workers)
        ff = statistics.median(resumed[f]) - t_fresh
        rows.append(
            {
                "point": f"resume at {f:.0%} (mmpt fast-forward)",
                "fraction": f,
                "trained": sum(map(len, whole["keys"][:k])),
                "first_s": resumed[f],
                "ff_s": ff,
                "skipped": skipped,
                "rate": skipped / ff if ff > 0 else None,
                "check": checks[f],
            }
        )
    ff_rates = [r["rate"] for r in rows if r["rate"] is not None]
    ff_rate = statistics.median(ff_rates) if ff_rates else None
    marginal = None  # slope between the first and last resume point: no fixed costs in it
    if len(rows) > 2:
        a, b = rows[1], rows[-1]
        dt = statistics.median(b["first_s"]) - statistics.median(a["first_s"])
        marginal = (b["skipped"] - a["skipped"]) / dt if dt > 0 else None

    print(f"\ncommand: {command}\nmachine: {machine()}\n")
    print(
        "| start | samples trained before | 1st batch s, median (min-max) | fast-forward s "
        "| raw samples skipped / worker | skipped / s / worker | open_clip restart instead "
        "| check: before + resumed = all keys once |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---|")
    for r in rows:
        ff = "-" if r["ff_s"] is None else f"{r['ff_s']:.2f}"
        rate = "-" if r["rate"] is None else f"{r['rate']:,.0f}"
        redo = "-"
        if r["trained"]:
            redo = f"repeats {r['trained']} samples (>= {r['trained'] / decode:.1f} s of decode)"
        print(
            f"| {r['point']} | {r['trained']} | {spread(r['first_s'])} | {ff} "
            f"| {r['skipped']:.0f} | {rate} | {redo} | {r['check']} |"
        )
    per_m = 1e6 / ff_rate if ff_rate else None
    print("\n| rate | samples/s |\n|---|---:|")
    print(f"| normal iteration: decode + collate, {args.workers} workers | {decode:,.0f} |")
    print(f"| normal iteration, per worker | {per_worker:,.0f} |")
    print(f"| fast-forward, per worker (median of the resume rows) | {ff_rate or 0:,.0f} |")
    if marginal:
        pts = f"{rows[1]['fraction']:.0%} -> {rows[-1]['fraction']:.0%}"
        print(f"| fast-forward, per worker, marginal (slope {pts}) | {marginal:,.0f} |")
    print(f"| raw tar read + shuffle buffer, 1 process, no decode | {raw:,.0f} |")
    if ff_rate:
        print(f"| fast-forward / decode, per worker | {ff_rate / per_worker:.1f}x |")
        print(f"| fast-forward seconds per 1M samples per worker | {per_m:.0f} s |")
    ok = all(r["check"].startswith("yes") for r in rows)
    if not ok:
        print("\nCHECK FAILED: a resumed epoch did not give every key once")
    return {
        "command": command,
        "machine": machine(),
        "rows": rows,
        "decode_rate": decode,
        "decode_rate_per_worker": per_worker,
        "fast_forward_rate": ff_rate,
        "fast_forward_marginal_rate": marginal,
        "raw_read_rate": raw,
        "seconds_per_million_per_worker": per_m,
        "batches": total,
        "checks_passed": ok,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options (``--quick``: tiny sizes for the tests)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="/tmp/mmpt_bench_resume", help="shard cache folder")
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--min-px", type=int, default=64, help="smallest JPEG side")
    p.add_argument("--max-px", type=int, default=128, help="largest JPEG side")
    p.add_argument("--image-size", type=int, default=64, help="model input size")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 0.9])
    p.add_argument("--repeats", type=int, default=3, help="first-batch timings per point")
    p.add_argument("--main-threads", type=int, default=1, help="torch threads of this process")
    p.add_argument("--quick", action="store_true", help="tiny sizes (tests)")
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.per_shard, args.min_px, args.max_px = 320, 40, 24, 40
        args.image_size, args.batch_size, args.shuffle_buffer, args.repeats = 32, 8, 40, 1
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; exits non-zero when a check fails (from the command line)."""
    args = parse_args(argv)
    torch.set_num_threads(args.main_threads)  # more only fights the workers for the cores
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "scripts/bench_resume.py", *given])
    return bench(args, command)


if __name__ == "__main__":
    sys.exit(0 if main()["checks_passed"] else 1)

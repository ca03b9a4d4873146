"""Data-loading benchmark: mmpt's image-text pipeline vs open_clip's and a tuned WebDataset one.

All three pipelines read the same img2dataset-layout shards and do the same work per sample (JPEG
decode, RandomResizedCrop scale (0.9, 1.0) bicubic, CLIP mean/std normalisation, open_clip BPE
tokenization to 77 ids); mmpt's per-batch ``dm.normalize`` (and the tuned baseline's own
normalisation) runs on the CPU in the timed loop. The tuned baseline (``bench_dataloader_tuned``)
is what a careful user writes by hand: draft decode, one fused crop+resize to uint8, one
tokenizer call per batch. Each pipeline is run ``--repeats`` times, interleaved, and the median
with min/max is printed; ratios are mmpt's rate over a baseline's in the same repeat.
Samples/s count batches after ``--warmup-batches``; "incl. start-up" counts from loader creation.

    python scripts/bench_dataloader.py --regime both --workers 2
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import PIL
import torch
import torchvision
import webdataset as wds
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dataloader_tuned import normalize, tuned_loader  # noqa: E402

from mmpt.datamodules.decode import decode_image
from mmpt.datamodules.image_text import ImageTextDataModule
from mmpt.datamodules.loader import make_loader
from mmpt.datamodules.streams import StreamConfig
from mmpt.datamodules.transforms import ImageTransform, normalize_images
from mmpt.models.encoders.tokenizers import OpenCLIPTokenizer
from mmpt.preprocess import CLIP_MEAN, CLIP_STD, ImagePreprocess, Preprocess

# regime -> (source sizes (w, h) drawn from, target size, default sample count)
REGIMES: dict[str, tuple[list[tuple[int, int]], int, int]] = {
    "web": ([(512, 384), (640, 480), (800, 600), (600, 800), (384, 512)], 224, 2000),
    "small": ([(64, 64)], 32, 10000),
}
WORDS = (
    "a photo of the red blue small large old new dog cat car house tree beach city street man "
    "woman child on in with at near front view sunset night garden table wooden vintage modern "
    "kitchen river mountain sale for free shipping best quality image stock white black"
)
console = Console(width=120, highlight=False)


def synth_jpeg(w: int, h: int, rng: np.random.Generator, noise: np.ndarray) -> bytes:
    """Smooth gradients + waves + noise: compresses like a photo (~25-80 KB at 384-800 px)."""
    y, x = (
        np.linspace(0, 1, h, dtype=np.float32)[:, None, None],
        np.linspace(0, 1, w)[None, :, None],
    )
    c0, cx, cy = rng.uniform(0, 255, (3, 1, 1, 3)).astype(np.float32)
    fx, fy, ph = rng.uniform(1, 12, 3).astype(np.float32)
    img = 0.4 * c0 + 0.6 * cx * x + 0.6 * cy * y - 0.3 * cx * y
    img = img + 40 * np.sin(2 * np.pi * (fx * x + ph)) * np.cos(2 * np.pi * fy * y)
    oy, ox = rng.integers(0, noise.shape[0] - h + 1), rng.integers(0, noise.shape[1] - w + 1)
    img = np.clip(img + noise[oy : oy + h, ox : ox + w], 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def make_shards(root: Path, regime: str, n: int, seed: int = 0) -> Path:
    """Write ``n`` samples in 8 shards under ``root/<regime>-<n>`` once; reuse them after."""
    from mmpt.shards import ShardWriter

    out = root / f"{regime}-{n}"
    if (out / "index.json").exists():
        return out
    sizes = REGIMES[regime][0]
    rng = np.random.default_rng(seed)
    side = max(max(s) for s in sizes)
    noise = rng.normal(0, 6, (side, side, 3)).astype(np.float32)
    console.print(f"writing {n} {regime} samples to {out} ...")
    with ShardWriter(out, samples_per_shard=-(-n // 8)) as writer:
        for i in range(n):
            w, h = sizes[rng.integers(len(sizes))]
            caption = " ".join(rng.choice(WORDS.split(), rng.integers(4, 25)))
            jpg = synth_jpeg(w, h, rng, noise)
            meta = {"caption": caption, "width": w, "height": h}
            writer.write({"__key__": f"{i:09d}", "jpg": jpg, "txt": caption, "json": meta})
    return out


def baseline_loader(urls: list[str], size: int, bs: int, workers: int, buf: int) -> Any:
    """The pipeline open_clip_train/data.py builds for training (non-resampled), same buffer."""
    preprocess_img = open_clip.image_transform(size, is_train=True)
    tokenizer = SimpleTokenizer()  # what open_clip.get_tokenizer returns for OpenAI CLIP models

    def has_caption_and_image(sample: dict[str, Any]) -> bool:
        return "txt" in sample and any(k in sample for k in ("png", "jpg", "jpeg", "webp"))

    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(bufsize=buf, initial=buf),
        wds.select(has_caption_and_image),
        wds.decode("pilrgb", handler=wds.warn_and_continue),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.map_dict(image=preprocess_img, text=lambda text: tokenizer(text)[0]),
        wds.to_tuple("image", "text"),
        wds.batched(bs, partial=False),
    )
    return wds.WebLoader(
        pipeline,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        persistent_workers=workers > 0,
    )


def mmpt_module(shard_dir: Path, size: int, bs: int, workers: int, buf: int) -> Any:
    pre = Preprocess(image=ImagePreprocess(size=size), tokenizer=OpenCLIPTokenizer(77))
    train = StreamConfig(urls=str(shard_dir), shuffle_buffer=buf)
    dm = ImageTextDataModule(train=train, batch_size=bs, num_workers=workers, preprocess=pre)
    dm.setup("fit")
    return dm


def timed(batches: Iterable[Any], images: Callable[[Any], torch.Tensor], warmup: int) -> dict:
    """Iterate a loader; samples/s after ``warmup`` batches and from loader creation."""
    t0 = time.perf_counter()
    first = start = None
    total = after = 0
    for i, batch in enumerate(batches):
        n = images(batch).shape[0]
        total += n
        if i == 0:
            first = time.perf_counter() - t0
        if i == warmup - 1:
            start = time.perf_counter()
        elif i >= warmup:
            after += n
    end = time.perf_counter()
    if start is None or after == 0:
        raise SystemExit(f"only {i + 1} batches: lower --warmup-batches or raise --samples")
    return {"steady": after / (end - start), "e2e": total / (end - t0), "first_s": first}


def check_equivalence(shard_dir: Path, urls: list[str], size: int, bs: int) -> float:
    """Same shapes/dtypes after normalisation and same token ids; returns the eval-mode pixel
    mean |diff| (0-255 units) between mmpt's draft-decode path and open_clip's transform."""
    base_imgs, base_txt = next(iter(baseline_loader(urls, size, bs, 0, 100)))
    dm = mmpt_module(shard_dir, size, bs, 0, 100)
    batch = dm.normalize(next(iter(make_loader(dm.train_stream, 0))))
    assert batch.images.shape == base_imgs.shape == (bs, 3, size, size), batch.images.shape
    assert batch.images.dtype == base_imgs.dtype == torch.float32
    assert batch.text_tokens.shape == base_txt.shape and batch.text_tokens.dtype == base_txt.dtype
    raw = {
        s["__key__"]: s
        for s in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())
    }
    tok = SimpleTokenizer()
    expected = torch.stack([tok(raw[k]["txt"].decode())[0] for k in batch.keys])
    assert torch.equal(batch.text_tokens, expected), "token ids differ from open_clip's"
    ref, ours = open_clip.image_transform(size, is_train=False), ImageTransform(size, train=False)
    diffs = []
    for k in batch.keys[:16]:
        data = raw[k]["jpg"]
        a = ref(Image.open(io.BytesIO(data)).convert("RGB"))
        b = normalize_images(ours(decode_image(data, size))[None], CLIP_MEAN, CLIP_STD)[0]
        diffs.append((a - b).mul(torch.tensor(CLIP_STD).view(3, 1, 1)).abs().mean().item() * 255)
    tuned_imgs, tuned_txt = next(iter(tuned_loader(urls, size, bs, 0, 100)))
    assert tuned_imgs.shape == (bs, 3, size, size) and tuned_imgs.dtype == torch.uint8
    assert normalize(tuned_imgs, CLIP_MEAN, CLIP_STD).dtype == torch.float32
    assert tuned_txt.shape == base_txt.shape and tuned_txt.dtype == base_txt.dtype
    return float(np.mean(diffs))


def machine() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln]
    cpu = names[0] if names else platform.processor() or platform.machine()
    return (
        f"{cpu}; {len(os.sched_getaffinity(0))} usable cores (os.cpu_count={os.cpu_count()}); "
        f"python {platform.python_version()}, torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}, webdataset {wds.__version__}, Pillow {PIL.__version__}, "
        f"open_clip {open_clip.__version__}"
    )


def bench(regime: str, args: argparse.Namespace) -> Table:
    sizes, size, default_n = REGIMES[regime]
    shard_dir = make_shards(Path(args.data), regime, args.samples or default_n)
    urls = sorted(str(p) for p in shard_dir.glob("*.tar"))
    pix = check_equivalence(shard_dir, urls, size, args.batch_size)
    console.print(f"{regime}: equivalence ok; eval-mode pixel mean |diff| = {pix:.2f}/255")

    def run_baseline() -> dict:
        loader = baseline_loader(urls, size, args.batch_size, args.workers, args.shuffle_buffer)
        return timed(loader, lambda b: b[0], args.warmup_batches)

    def run_mmpt() -> dict:
        dm = mmpt_module(shard_dir, size, args.batch_size, args.workers, args.shuffle_buffer)
        loader = make_loader(dm.train_stream, num_workers=args.workers)
        return timed(loader, lambda b: dm.normalize(b).images, args.warmup_batches)

    def run_tuned() -> dict:
        loader = tuned_loader(urls, size, args.batch_size, args.workers, args.shuffle_buffer)
        return timed(loader, lambda b: normalize(b[0], CLIP_MEAN, CLIP_STD), args.warmup_batches)

    runs = {"open_clip-style wds": run_baseline, "tuned wds (draft, fused, uint8)": run_tuned}
    runs["mmpt"] = run_mmpt
    results: dict[str, list[dict]] = {name: [] for name in runs}
    for r in range(args.repeats):
        for name in runs if r % 2 == 0 else reversed(list(runs)):
            results[name].append(runs[name]())
            console.print(f"{regime}: repeat {r + 1} {name}: {results[name][-1]['steady']:.0f}/s")

    table = Table(
        title=f"{regime}: {sizes[0][0]}x{sizes[0][1]}.. -> {size}px, batch {args.batch_size}"
    )
    cols = ("pipeline", "samples/s (median)", "min-max", "incl. start-up", "1st batch s")
    for col in (*cols, "mmpt / this, median (min-max)"):
        table.add_column(col, justify="left" if col == "pipeline" else "right")
    mine = [x["steady"] for x in results["mmpt"]]
    for name, res in results.items():
        steady = [x["steady"] for x in res]
        e2e = statistics.median(x["e2e"] for x in res)
        first = statistics.median(x["first_s"] for x in res)
        spread = f"{min(steady):.0f}-{max(steady):.0f}"
        ratios = [m / b for m, b in zip(mine, steady, strict=True)]
        ratio = f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
        row = (name, f"{statistics.median(steady):.0f}", spread, f"{e2e:.0f}", f"{first:.2f}")
        table.add_row(*row, ratio)
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--regime", choices=("web", "small", "both"), default="both")
    p.add_argument("--data", default="/tmp/mmpt_bench", help="shard cache folder")
    p.add_argument("--samples", type=int, default=None, help="default: web 2000, small 10000")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--warmup-batches", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--main-threads", type=int, default=1, help="torch threads of this process")
    args = p.parse_args()
    torch.set_num_threads(args.main_threads)  # more only fights the workers for the cores
    console.print(f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}")
    console.print(f"machine: {machine()}")
    regimes = ("web", "small") if args.regime == "both" else (args.regime,)
    for table in [bench(r, args) for r in regimes]:
        console.print(table)


if __name__ == "__main__":
    main()

"""Bookkeeping costs as the data grows: each should be linear (or log) in its size.

Four measurements, each at a few sizes, so the growth shows in one table:

1. ``inspect`` listing: ``mmpt.shards.inspect`` lists a folder of ``--shards`` (empty) tars,
   all named in its ``index.json``;
2. stream length: ``len(stream)`` (which computes every rank's worker quotas) for one
   ``--shards``-shard source at 16, 64 and 256 ranks of 8 workers;
3. resume ledger: a resampled two-source stream with a linear mixture schedule and a packing
   batcher, iterated for ``--batches`` batches: seconds per 1000 batches at the start and the
   end, and the pickled size of the position a batch carries;
4. ``pack_stream``: microseconds per sample at buffer sizes 256 .. 16384, with first-fit
   by a scan of the bins (the baseline, mmpt before) and by the segment tree, side by side.

Seconds are CPU seconds of this process (``time.process_time``), steadier than wall time on a
shared machine. Prints a Markdown table.

    python scripts/bench_bookkeeping.py
"""

from __future__ import annotations

import argparse
import pickle
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import webdataset as wds

from mmpt.datamodules import packing
from mmpt.datamodules.mixing import MixPoint
from mmpt.datamodules.packing import pack_stream
from mmpt.datamodules.resume import WorkerTracker
from mmpt.datamodules.streams import ShardStream, StreamConfig
from mmpt.datamodules.urls import ResolvedSource
from mmpt.shards import inspect as shard_inspect
from mmpt.shards.index import ShardIndex, ShardInfo


def cpu(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(CPU seconds, result) of ``fn()``."""
    t = time.process_time()
    out = fn()
    return time.process_time() - t, out


def bench_listing(
    root: Path, sizes: list[int], listing: Callable[[Path], Any] | None = None
) -> list[tuple[str, str, str]]:
    """Seconds to list folders of ``sizes`` empty tars, every one named in ``index.json``."""
    listing = listing or shard_inspect._shard_paths
    rows = []
    for n in sizes:
        folder = root / f"listing{n}"
        folder.mkdir()
        names = [f"{i:06d}.tar" for i in range(n)]
        for name in names:
            (folder / name).touch()
        ShardIndex(shards=[ShardInfo(name, 1) for name in names]).save(folder)
        secs, (shards, _) = cpu(lambda f=folder: listing(f))
        assert len(shards) == n
        rows.append(("inspect listing", f"{n} shards (indexed)", f"{secs:.3f} s"))
    return rows


def bench_length(shards: int, ranks: list[int], workers: int) -> list[tuple[str, str, str]]:
    """Seconds of the first ``len(stream)`` (every rank's quotas) at ``ranks`` ranks."""
    urls = [f"s{i:06d}.tar" for i in range(shards)]
    source = ResolvedSource(urls, [100 + i % 7 for i in range(shards)], {}, "bench")
    rows = []
    for w in ranks:
        stream = ShardStream([source], StreamConfig(urls="bench"), dict, list, 8,
                             rank=w - 1, world_size=w, num_workers=workers)  # fmt: skip
        secs, n = cpu(lambda s=stream: len(s))
        again, _ = cpu(lambda s=stream: [len(s) for _ in range(10)])
        rows.append(("len(stream)", f"{shards} shards, {w} ranks x {workers} workers",
                     f"{secs:.3f} s first, {again / 10:.4f} s again ({n} batches)"))  # fmt: skip
    return rows


def write_text_shards(folder: Path, shards: int, per_shard: int, tag: str) -> str:
    """Tars of samples with a ``txt`` of random length (the token count to pack)."""
    folder.mkdir(parents=True)
    rng = random.Random(tag)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"{s:04d}.tar")) as w:
            for i in range(per_shard):
                w.write({"__key__": f"{tag}{s:04d}{i:04d}", "txt": str(rng.randint(8, 120))})
    return str(folder / f"{{0000..{shards - 1:04d}}}.tar")


def to_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """A packable sample: ``txt`` tokens, key kept."""
    ids = torch.zeros(int(sample["txt"]), dtype=torch.long)
    return {"input_ids": ids, "labels": ids, "key": sample["__key__"]}


class PackBatcher:
    """Packs samples into 256-token rows (``pack_stream``, buffer 64), 4 rows a batch."""

    def __call__(self, items: Iterator[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
        rows = pack_stream(items, 256, 0, buffer_size=64)
        while batch := [r for _, r in zip(range(4), rows, strict=False)]:
            yield batch

    def taken_keys(self, batch: list[dict[str, Any]]) -> list[str]:
        return [k for r in batch for k in r["key"]]


class Keys:
    """Collate: the rows' sample keys."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.keys, self.skipped = [k for r in rows for k in r["key"]], 0


def bench_ledger(root: Path, batches: int) -> list[tuple[str, str, str]]:
    """CPU seconds per 1000 batches and position bytes along ``batches`` batches."""
    specs = [write_text_shards(root / t, 16, 500, t) for t in ("a", "b")]
    cfg = StreamConfig(
        urls=specs, resampled=True, epoch_samples=batches * 4, shuffle_buffer=100,
        weight_schedule=[MixPoint(at=1.0, weights=[0.2, 0.8], ramp="linear")],
    )  # fmt: skip
    stream = ShardStream(cfg.sources("bench"), cfg, to_sample, Keys, 4, batcher=PackBatcher())
    stream.track = True
    stream.set_total_batches(batches)
    stream.set_epoch(0)
    spent = [0.0]  # CPU seconds in the per-batch bookkeeping (WorkerTracker.batch_made)
    made = WorkerTracker.batch_made

    def timed(self: WorkerTracker, keys: Any) -> Any:
        t = time.process_time()
        out = made(self, keys)
        spent[0] += time.process_time() - t
        return out

    WorkerTracker.batch_made = timed  # type: ignore[method-assign]
    marks, sizes, t0, n = {}, {}, 0.0, 0
    try:
        for n, batch in enumerate(stream, 1):
            if n % 1000 == 0:
                marks[n], t0 = spent[0] - t0, spent[0]
                sizes[n] = len(pickle.dumps(batch.stream_state))
    finally:
        WorkerTracker.batch_made = made  # type: ignore[method-assign]
    assert n == batches, n
    return [
        ("resume ledger", f"batches {k - 999}-{k}",
         f"{marks[k] * 1e3:.0f} ms bookkeeping / 1000 batches, position {sizes[k]} B")
        for k in sorted({min(marks), max(marks)})
    ]  # fmt: skip


def scan_first_fit_decreasing(lengths: list[int], max_len: int) -> list[list[int]]:
    """The baseline: first-fit-decreasing that scans the bins for each item (mmpt before)."""
    bins: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, room in enumerate(free):
            if lengths[i] <= room:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(max_len - lengths[i])
    return bins


def bench_pack(sizes: list[int], samples: int) -> list[tuple[str, str, str]]:
    """Microseconds per sample of ``pack_stream`` with the bin scan and with the tree.

    Each is timed twice, alternating, and the faster run kept; the rows must be the same.
    """
    rng = random.Random(0)
    data = [torch.zeros(rng.randint(8, 400), dtype=torch.long) for _ in range(samples)]
    tree = packing.first_fit_decreasing

    def run(size: int) -> list[list[int]]:
        items = ({"input_ids": x, "labels": x, "key": i} for i, x in enumerate(data))
        return [r["key"] for r in pack_stream(items, 2048, 0, size)]

    rows = []
    for size in sizes:
        best: dict[str, float] = {}
        out = {}
        for name in ("scan", "tree") * 2:
            packing.first_fit_decreasing = scan_first_fit_decreasing if name == "scan" else tree
            secs, out[name] = cpu(lambda b=size: run(b))
            best[name] = min(best.get(name, secs), secs)
        packing.first_fit_decreasing = tree
        assert out["scan"] == out["tree"], "the tree packs other rows than the scan"
        us = {k: v / samples * 1e6 for k, v in best.items()}
        cost = f"{us['scan']:.1f} us/sample (scan), {us['tree']:.1f} (tree), same rows"
        rows.append(("pack_stream", f"buffer {size}", cost))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=32768, help="shards for listing and len")
    p.add_argument("--batches", type=int, default=8000, help="batches for the ledger")
    p.add_argument("--pack-samples", type=int, default=65536)
    p.add_argument("--skip", default="", help="parts to skip: listing,len,ledger,pack")
    a = p.parse_args()
    skip = set(a.skip.split(","))
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if "listing" not in skip:
            rows += bench_listing(root, [a.shards // 16, a.shards // 4, a.shards])
        if "len" not in skip:
            rows += bench_length(a.shards, [16, 64, 256], 8)
        if "ledger" not in skip:
            rows += bench_ledger(root, a.batches)
        if "pack" not in skip:
            rows += bench_pack([256, 1024, 4096, 16384], a.pack_samples)
    print("| what | size | cost |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")


if __name__ == "__main__":
    main()

"""Bookkeeping that must stay linear (or log) in its size: counted operations, never timings.

The shard listing of ``mmpt data inspect``, a stream's length and worker quotas, the resume
position under a mixture schedule with a packing batcher, and ``pack_stream``'s bin search.
"""

from __future__ import annotations

import importlib.util
import math
import pickle
import random
import sys
from pathlib import Path

import pytest
import torch

from mmpt.datamodules import packing
from mmpt.datamodules.quotas import trim_largest_first
from mmpt.datamodules.stages import Slot, split_shards
from mmpt.datamodules.streams import ShardStream, StreamConfig
from mmpt.datamodules.urls import ResolvedSource
from mmpt.shards import inspect as shard_inspect


class CountingName(str):
    """A shard name that counts the equality tests made on it."""

    compared = 0

    def __eq__(self, other: object) -> bool:
        CountingName.compared += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


class Globbed:
    """A ``Path.glob`` result whose name counts comparisons."""

    def __init__(self, name: str) -> None:
        self.name = CountingName(name)

    def __lt__(self, other: Globbed) -> bool:
        return str.__lt__(self.name, other.name)


@pytest.mark.parametrize("indexed", [False, True])
def test_inspect_listing_compares_each_name_a_bounded_number_of_times(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, indexed: bool
) -> None:
    """Listing n shards makes O(n) name comparisons (a list's ``in`` made n^2 / 2)."""
    from mmpt.shards.index import ShardIndex, ShardInfo

    for n in (500, 2000):
        folder = tmp_path / f"{n}{indexed}"
        folder.mkdir()
        names = [f"{i:06d}.tar" for i in range(n)]
        if indexed:  # the index lists the first half; the folder holds them all
            index = ShardIndex(shards=[ShardInfo(name=m, samples=1) for m in names[: n // 2]])
            index.save(folder)
        monkeypatch.setattr(type(folder), "glob", lambda self, pattern, ns=names: map(Globbed, ns))
        CountingName.compared = 0
        shards, _ = shard_inspect._shard_paths(folder)
        assert [name for _, name in shards] == names
        assert CountingName.compared <= n, (n, CountingName.compared)


class CountingCounts(list):
    """Samples per shard that count how many of them are read."""

    reads = 0

    def __iter__(self):
        for n in super().__iter__():
            CountingCounts.reads += 1
            yield n

    def __getitem__(self, i):
        CountingCounts.reads += 1
        return super().__getitem__(i)


def old_trim(quotas: list[int], target: int) -> list[int]:
    """The quota trim as a loop: the first largest quota loses one batch at a time."""
    quotas = list(quotas)
    while sum(quotas) > target:
        quotas[quotas.index(max(quotas))] -= 1
    return quotas


def test_trim_largest_first_equals_the_one_at_a_time_loop() -> None:
    rng = random.Random(0)
    for _ in range(500):
        quotas = [rng.randint(0, 30) for _ in range(rng.randint(1, 9))]
        target = rng.randint(0, sum(quotas))
        assert trim_largest_first(quotas, target) == old_trim(quotas, target), (quotas, target)


@pytest.mark.parametrize("world_size,workers,shards", [(1, 1, 7), (3, 2, 50), (64, 8, 4096)])
def test_quotas_read_each_count_once_per_world_size(world_size, workers, shards) -> None:
    """``len`` and every worker quota of every rank read each shard count once, in all."""
    rng = random.Random(shards)
    counts = [rng.randint(1, 40) for _ in range(shards)]
    source = ResolvedSource([f"{i}.tar" for i in range(shards)], counts, {}, "x")
    stream = ShardStream([source], StreamConfig(urls="x"), dict, list, 4, rank=world_size - 1,
                         world_size=world_size, num_workers=workers)  # fmt: skip
    stream.counts = CountingCounts(counts)
    CountingCounts.reads = 0
    quotas = {r: stream.worker_quotas(r) for r in range(world_size)}
    for _ in range(3):
        assert len(stream) == sum(quotas[world_size - 1])
        for w in range(workers):
            stream.worker_quota(Slot(world_size - 1, world_size, w, workers))
    assert CountingCounts.reads == shards
    # the same quotas as one pass per slot through split_shards, trimmed one batch at a time
    per_slot = [
        [sum(counts[i] for i in split_shards(range(shards), Slot(r, world_size, w, workers),
                                              None, 0)) // 4 for w in range(workers)]
        for r in range(world_size)
    ]  # fmt: skip
    target = min(sum(row) for row in per_slot)
    assert quotas == {r: old_trim(per_slot[r], target) for r in range(world_size)}
    stream.num_workers = workers + 1  # another worker count: computed again, once
    len(stream)
    len(stream)
    assert CountingCounts.reads == 2 * shards


def _bench_module():
    """``scripts/bench_bookkeeping.py``, which holds the scanning reference it times against."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_bookkeeping.py"
    spec = importlib.util.spec_from_file_location("bench_bookkeeping", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: First-fit-decreasing with a scan over the bins (the O(bins)-per-item reference).
scan_first_fit_decreasing = _bench_module().scan_first_fit_decreasing


def lines_run(fn, *args) -> int:
    """Python lines ``fn(*args)`` executes in mmpt's packing module (an operation count)."""
    count = 0

    def local(frame, event, arg):
        nonlocal count
        count += event == "line"
        return local

    def calls(frame, event, arg):
        return local if frame.f_code.co_filename == packing.__file__ else None

    sys.settrace(calls)
    try:
        fn(*args)
    finally:
        sys.settrace(None)
    return count


def test_first_fit_decreasing_equals_the_bin_scan() -> None:
    rng = random.Random(1)
    for _ in range(300):
        max_len = rng.choice([8, 64, 2048])
        lengths = [rng.randint(1, max_len) for _ in range(rng.randint(0, 200))]
        if rng.random() < 0.5:  # mostly short items: many nearly full bins to skip
            lengths = [max(1, n // 8) for n in lengths]
        assert packing.first_fit_decreasing(lengths, max_len) == scan_first_fit_decreasing(
            lengths, max_len
        )


def test_pack_stream_rows_are_those_of_the_bin_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    def stream():
        rng = random.Random(2)
        for i in range(2000):
            ids = torch.arange(max(1, min(512, round(rng.lognormvariate(math.log(60), 1.0)))))
            yield {"input_ids": ids, "labels": ids, "__key__": f"s{i}"}

    def keys() -> list[list[str]]:
        return [r["__key__"] for r in packing.pack_stream(stream(), 512, 0, buffer_size=256)]

    new = keys()
    monkeypatch.setattr(packing, "first_fit_decreasing", scan_first_fit_decreasing)
    assert new == keys()


def test_first_fit_work_per_item_grows_like_log_buffer() -> None:
    """Lines run per item: 16x the buffer costs ~1.5x (log), not ~16x (a scan of the bins)."""
    per_item = {}
    for n in (256, 4096):
        rng = random.Random(n)
        lengths = [rng.randint(8, 400) for _ in range(n)]
        per_item[n] = lines_run(packing.first_fit_decreasing, lengths, 2048) / n
    assert per_item[4096] <= 2 * per_item[256], per_item


class Keys:
    """Collate: the items' keys."""

    def __init__(self, keys: list[str]) -> None:
        self.keys, self.skipped = list(keys), 0


class PackingLike:
    """Holds up to 12 items and emits 3 to 6 of them a batch, as packing rows would."""

    def __call__(self, items):
        buf = []
        for item in items:
            buf.append(item)
            if len(buf) == 12:
                n = 3 + sum(map(ord, buf[0])) % 4
                buf.sort()
                yield buf[:n]
                buf = buf[n:]


def test_position_size_is_bounded_under_a_schedule_and_a_packing_batcher(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over 10,000 batches the pickled position does not grow (it held every batch end).

    The real stream, tracker and mixture; shards are read from memory and samples decode
    without per-sample seeding, so 40,000 samples take seconds.
    """
    import contextlib

    from mmpt.datamodules import mixing, resume
    from mmpt.datamodules.mixing import MixPoint

    def read_shards(urls, counter):
        for url in urls:
            yield from ({"__key__": f"{url}/{i}", "__url__": url} for i in range(10))

    monkeypatch.setattr(mixing, "read_shards", read_shards)
    monkeypatch.setattr(resume, "seeded", lambda *a: contextlib.nullcontext())
    urls = [[f"{t}{i}.tar" for i in range(30)] for t in "ab"]
    sources = [ResolvedSource(u, None, {}, t) for u, t in zip(urls, "ab", strict=True)]
    points = [MixPoint(at=1.0, weights=[0.1, 0.9], ramp="linear")]
    cfg = StreamConfig(urls=["a", "b"], resampled=True, epoch_samples=40_000, shuffle_buffer=8,
                       weight_schedule=points)  # fmt: skip
    stream = ShardStream(sources, cfg, lambda s: s["__key__"], Keys, 4, batcher=PackingLike())
    stream.track = True
    stream.set_total_batches(10_000)
    sizes = [len(pickle.dumps(b.stream_state)) for b in stream]
    assert len(sizes) == 10_000
    assert max(sizes) < 600, max(sizes)
    assert max(sizes[-1000:]) <= max(sizes[1000:2000]) + 16, (sizes[1000:2000], sizes[-1000:])

"""The shard stream: exact plain-mode partition over ranks x workers, weighted mixing,
counted skips, start-up errors."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from mmpt.datamodules.loader import make_loader
from mmpt.datamodules.stages import Slot, mix, split_shards
from mmpt.datamodules.streams import ShardStream, StreamConfig
from mmpt.datamodules.urls import resolve_source
from tests.helpers import write_shards


class KeyBatch:
    def __init__(self, keys: list[str]) -> None:
        self.keys, self.skipped = keys, 0


def key_stream(
    cfg: StreamConfig, rank: int = 0, world: int = 1, bs: int = 4, partial=True, workers: int = 0
) -> ShardStream:
    return ShardStream(
        cfg.sources("data.train"),
        cfg,
        sample_fn=lambda s: s["__key__"],
        collate_fn=KeyBatch,
        batch_size=bs,
        partial=partial,
        seed=7,
        rank=rank,
        world_size=world,
        num_workers=workers,
    )


def test_split_shards_partitions_every_slot_exactly_once():
    urls = [f"s{i}" for i in range(11)]
    seen = Counter()
    for rank in range(2):
        for worker in range(3):
            seen.update(split_shards(urls, Slot(rank, 2, worker, 3), seed=3, epoch=1))
    assert seen == Counter(urls)


@pytest.mark.parametrize("epoch", [0, 1])
def test_two_ranks_two_workers_see_every_sample_once(shards: Path, epoch: int):
    """Simulate 2 ranks x 2 DataLoader workers: no sample duplicated or lost in an epoch."""
    cfg = StreamConfig(urls=str(shards), shuffle_buffer=8)
    seen: Counter[str] = Counter()
    for rank in range(2):
        stream = key_stream(cfg, rank=rank, world=2, workers=2)
        stream.set_epoch(epoch)
        loader = make_loader(stream, num_workers=2)
        batches = list(loader)
        assert len(batches) == len(loader)  # the announced length is exact
        for b in batches:
            seen.update(b.keys)
    assert len(seen) == 40 and set(seen.values()) == {1}


def test_epoch_changes_order_but_not_content(shards: Path):
    cfg = StreamConfig(urls=str(shards), shuffle_buffer=8)
    stream = key_stream(cfg)
    order0 = [k for b in stream for k in b.keys]
    stream.set_epoch(1)
    order1 = [k for b in stream for k in b.keys]
    assert sorted(order0) == sorted(order1) and order0 != order1
    stream.set_epoch(0)
    assert [k for b in stream for k in b.keys] == order0  # deterministic per epoch


def test_weighted_mixing_matches_weights(tmp_path: Path):
    a = write_shards(tmp_path / "a", n=20, per_shard=5, tag="a")
    b = write_shards(tmp_path / "b", n=20, per_shard=5, tag="b")
    cfg = StreamConfig(
        urls=[str(a), str(b)],
        weights=[3.0, 1.0],
        resampled=True,
        epoch_samples=4000,
        shuffle_buffer=0,
    )
    stream = key_stream(cfg, bs=100, partial=False)
    keys = [k for batch in stream for k in batch.keys]
    assert len(keys) == 4000  # epoch_samples exactly
    frac_a = sum(k.startswith("a") for k in keys) / len(keys)
    # binomial std at p=0.75, n=4000 is 0.0068: 5 sigma
    assert abs(frac_a - 0.75) < 0.035


def test_mix_draws_sources_by_weight():
    rng = random.Random(0)
    streams = [iter(lambda: "x", None), iter(lambda: "y", None)]
    gen = mix(streams, [1, 4], rng)
    draws = Counter(next(gen) for _ in range(10000))
    assert abs(draws["y"] / 10000 - 0.8) < 0.03


def test_missing_shard_is_a_startup_error_naming_it(shards: Path, tmp_path: Path):
    pattern = str(shards / "shard-{000006..000009}.tar")  # 6 and 7 exist, 8 and 9 do not
    with pytest.raises(FileNotFoundError, match=r"2 of 4 shard.*data\.train\.urls.*shard-000008"):
        resolve_source(pattern, "data.train.urls")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        resolve_source(str(empty), "data.val.urls")


def test_index_listing_a_missing_shard_is_an_error(shards: Path):
    (shards / "shard-000002.tar").unlink()
    with pytest.raises(FileNotFoundError, match="shard-000002.tar"):
        resolve_source(str(shards), "data.train.urls")


def test_weights_need_resampled_and_epoch_size(shards: Path):
    with pytest.raises(ValueError, match="resampled: true"):
        StreamConfig(urls=[str(shards)], weights=[1.0]).sources("data.train")
    with pytest.raises(ValueError, match="epoch_samples"):
        StreamConfig(urls=str(shards), resampled=True).sources("data.train")


def test_brace_pattern_and_glob_resolve_with_counts(shards: Path):
    src = resolve_source(str(shards / "shard-{000000..000003}.tar"))
    assert len(src.urls) == 4 and src.counts == [5, 5, 5, 5]
    assert len(resolve_source(str(shards / "*.tar")).urls) == 8


def test_pipe_url_reads_like_a_file(shards: Path):
    url = f"pipe:cat {shards / 'shard-000000.tar'}"
    cfg = StreamConfig(urls=url, shuffle_buffer=0)
    keys = [k for b in key_stream(cfg) for k in b.keys]
    assert keys == [f"{i:06d}" for i in range(5)]


def test_unreadable_shard_is_counted_not_fatal(shards: Path):
    """Under ``max_skipped_fraction`` (here disabled) a bad shard is counted, not fatal.

    tests/faults/test_shard_faults.py covers each kind of bad shard and the limit.
    """
    (shards / "shard-000001.tar").write_bytes(b"this is not a tar file" * 100)
    cfg = StreamConfig(urls=str(shards), shuffle_buffer=0)
    stream = key_stream(cfg)
    stream.max_skipped_fraction = 1.0
    batches = list(stream)
    keys = [k for b in batches for k in b.keys]
    assert len(keys) == 35
    assert sum(b.skipped for b in batches) == 5  # the index's count for the shard


def test_fsspec_url_reads_like_a_file(shards: Path):
    """A ``scheme://`` URL goes through fsspec (here its in-memory filesystem, as s3/gs would)."""
    import fsspec

    fs = fsspec.filesystem("memory")
    for name in ("shard-000000.tar", "shard-000001.tar"):
        fs.pipe(f"/bucket/{name}", (shards / name).read_bytes())
    cfg = StreamConfig(urls="memory://bucket/shard-{000000..000001}.tar", shuffle_buffer=0)
    stream = key_stream(cfg)
    assert stream.counts is None  # remote: no index, so no length is claimed
    keys = sorted(k for b in stream for k in b.keys)
    assert keys == [f"{i:06d}" for i in range(10)]


def test_uneven_plain_shards_give_every_rank_the_same_step_count(tmp_path: Path):
    """3 shards over 2 ranks: rank 0 holds 10 samples, rank 1 holds 5; both must take the same
    number of training steps (or DDP would hang), and each yields exactly its announced length."""
    write_shards(tmp_path / "s", n=15, per_shard=5)
    cfg = StreamConfig(urls=str(tmp_path / "s"), shuffle_buffer=0)
    lengths, yielded = [], []
    for rank in range(2):
        loader = make_loader(key_stream(cfg, rank=rank, world=2, bs=2, partial=False), 2)
        lengths.append(len(loader))
        yielded.append(len(list(loader)))
    assert lengths == yielded == [2, 2]

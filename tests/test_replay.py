"""Replay: every batch holds floor/ceil(f * B) old items, plain or resampled main stream,
across workers and ranks (main shards still split disjointly), with exact batch counts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from mmpt.datamodules.loader import make_loader
from mmpt.datamodules.mixing import ReplayConfig, combined_items, interleave
from mmpt.datamodules.streams import ShardStream, StreamConfig
from tests.helpers import write_shards

BS, FRACTION = 8, 0.2  # 1.6 replay items a batch: 1 or 2


class KeyBatch:
    """Collate: the keys of the items."""

    def __init__(self, keys: list[str]) -> None:
        self.keys, self.skipped = keys, 0


def sample_key(sample: dict) -> str:
    return sample["__key__"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("replay")
    new = write_shards(root / "new", n=80, per_shard=10, tag="n")
    old = write_shards(root / "old", n=30, per_shard=10, tag="o")
    return str(new), str(old)


def replay_stream(cfg: StreamConfig, rank: int = 0, world: int = 1) -> ShardStream:
    return ShardStream(
        cfg.sources("data.train"),
        cfg,
        sample_key,
        KeyBatch,
        BS,
        seed=1,
        rank=rank,
        world_size=world,
    )


def check_batches(batches: list[KeyBatch]) -> None:
    """Each batch: exact replay credit, ``mix`` equal to its keys."""
    lo, hi = math.floor(FRACTION * BS), math.ceil(FRACTION * BS)
    for b in batches:
        old = sum(k.startswith("o") for k in b.keys)
        assert lo <= old <= hi
        assert b.mix == {"new": BS - old, "old_data": old}


def test_interleave_credits_replay_exactly():
    out = list(interleave(iter(range(1000)), iter(lambda: -1, None), 0.3))
    flags = [x == -1 for x in out]
    assert all(sum(flags[i : i + 10]) == 3 for i in range(0, len(out) - 10, 10))
    assert len(out) == combined_items(1000, 0.3)  # ends with the replay credited after main
    assert sum(not f for f in flags) == 1000


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [1, 2])
def test_plain_main_stream_with_replay_splits_ranks_and_workers(data, workers: int, world: int):
    new, old = data
    cfg = StreamConfig(
        urls=new,
        replay=ReplayConfig(urls=old, fraction=FRACTION, name="old_data"),
        shuffle_buffer=4,
    )
    main_keys: list[str] = []
    for rank in range(world):
        loader = make_loader(replay_stream(cfg, rank, world), workers)
        batches = list(loader)
        assert len(batches) == len(loader) > 0  # the announced length counts replay items
        check_batches(batches)
        main_keys += [k for b in batches for k in b.keys if k.startswith("n")]
    assert len(main_keys) == len(set(main_keys))  # ranks and workers read disjoint shards
    # main items a worker holds are (1 - f) of its items; what does not fill a batch is left
    assert len(main_keys) > 80 - world * max(1, workers) * BS


def test_resampled_main_stream_with_replay(data):
    new, old = data
    cfg = StreamConfig(
        urls=new,
        resampled=True,
        epoch_samples=400,
        replay=ReplayConfig(urls=[old, old], fraction=FRACTION, name="old_data", weights=[1, 3]),
    )
    loader = make_loader(replay_stream(cfg), 2)
    batches = list(loader)
    assert len(batches) == len(loader) == 400 // BS
    check_batches(batches)
    per_worker = [[k for b in batches[w::2] for k in b.keys if k[0] == "o"] for w in (0, 1)]
    assert per_worker[0] != per_worker[1]  # each worker draws its own replay items
    old_items = sum(b.mix["old_data"] for b in batches)
    assert (
        old_items
        == sum(math.floor((i + 1) * FRACTION) - math.floor(i * FRACTION) for i in range(200)) * 2
    )


def test_replay_batches_are_deterministic_per_epoch(data):
    new, old = data
    cfg = StreamConfig(urls=new, replay=ReplayConfig(urls=old, fraction=FRACTION, name="old_data"))
    stream = replay_stream(cfg)
    first = [b.keys for b in stream]
    assert first == [b.keys for b in stream]
    stream.set_epoch(1)
    assert first != [b.keys for b in stream]


def test_replay_sources_missing_is_a_startup_error(data, tmp_path: Path):
    cfg = StreamConfig(urls=data[0], replay={"urls": str(tmp_path / "nope.tar"), "fraction": 0.1})
    with pytest.raises(FileNotFoundError, match=r"data\.train\.replay\.urls"):
        cfg.sources("data.train")

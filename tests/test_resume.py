"""Exact mid-epoch resume of shard streams: a run stopped after k batches and resumed from the
saved position makes, worker by worker, the very batches the uninterrupted run makes.

Each case runs an epoch uninterrupted, then the same epoch stopped after ``k`` batches (the
position of the batches taken so far is saved as a checkpoint would save it) and resumed in
a fresh stream and loader; the per-worker batch sequences must be identical, plain or
resampled, with skips, replay or a mixture schedule. A batcher that holds items back (as
packing does) is checked to give every sample of the epoch exactly once.
"""

from __future__ import annotations

import logging
import pickle
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mmpt.datamodules.loader import make_loader
from mmpt.datamodules.mixing import MixPoint, ReplayConfig
from mmpt.datamodules.resume import Cursor, Ledger, StreamPosition
from mmpt.datamodules.streams import ShardStream, StreamConfig
from tests.helpers import write_shards

pytestmark = pytest.mark.filterwarnings("ignore:.*`IterableDataset` has `__len__` defined")


class KeyBatch:
    """Collate: the items' keys."""

    def __init__(self, keys: list[str]) -> None:
        self.keys, self.skipped = list(keys), 0


def key_or_skip(sample: dict[str, Any]) -> str:
    """Keys ending in 3 fail to decode (a counted skip)."""
    key = sample["__key__"]
    if key.endswith("3"):
        raise ValueError("corrupt")
    return key


def sample_key(sample: dict[str, Any]) -> str:
    return sample["__key__"]


class PoolBatcher:
    """Holds ``pool`` batches of items, emits them sorted by key: items wait across batches."""

    def __init__(self, batch_size: int, pool: int = 3) -> None:
        self.batch_size, self.pool = batch_size, pool

    def __call__(self, items: Iterator[str]) -> Iterator[list[str]]:
        buf: list[str] = []
        for item in items:
            buf.append(item)
            if len(buf) == self.batch_size * self.pool:
                buf.sort()
                yield buf[: self.batch_size]
                buf = buf[self.batch_size :]
        buf.sort()
        while len(buf) >= self.batch_size:
            yield buf[: self.batch_size]
            buf = buf[self.batch_size :]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("resume")
    a = write_shards(root / "a", n=96, per_shard=12, tag="a")
    b = write_shards(root / "b", n=48, per_shard=12, tag="b")
    return str(a), str(b)


def make(cfg: StreamConfig, fn: Callable = sample_key, bs: int = 4, workers: int = 2, **kw):
    def build() -> ShardStream:
        stream = ShardStream(
            cfg.sources("data.train"), cfg, fn, KeyBatch, bs, seed=3, num_workers=workers, **kw
        )
        stream.track = True
        stream.set_total_batches(40)
        return stream

    return build


def by_worker(batches: list[KeyBatch]) -> dict[int, list[list[str]]]:
    out: dict[int, list[list[str]]] = {}
    for b in batches:
        out.setdefault(b.stream_state.worker, []).append(b.keys)
    return out


def run(build: Callable[[], ShardStream], workers: int, stop: int | None, state=None):
    """One epoch (epoch 1) of a fresh stream, stopped after ``stop`` batches.

    Returns the batches and the checkpoint state of the batches taken (pickled and back, as
    a checkpoint does).
    """
    stream = build()
    loader = make_loader(stream, workers)
    position = StreamPosition()
    if state is not None:
        position.load_state_dict(state)
        position.apply(stream, 0, 1)
    stream.set_epoch(1)
    batches = []
    for batch in loader:
        if stop is not None and len(batches) == stop:
            break
        position.record(batch)
        batches.append(batch)
    saved = pickle.loads(pickle.dumps(position.state_dict(stream, 0, 1)))
    return batches, saved


def check_exact(build: Callable[[], ShardStream], workers: int, stop: int) -> list[KeyBatch]:
    """The stopped + resumed run makes the uninterrupted run's batches, in its order (the
    worker whose batch came next comes first again)."""
    whole, _ = run(build, workers, None)
    first, state = run(build, workers, stop)
    rest, _ = run(build, workers, None, state)
    assert len(first) == stop and len(first) + len(rest) == len(whole)
    assert by_worker(first + rest) == by_worker(whole)
    assert [b.keys for b in first + rest] == [b.keys for b in whole]
    return whole


@pytest.mark.parametrize("workers,stop", [(0, 5), (2, 5), (2, 8)])
def test_plain_resume_continues_every_worker_exactly(data, workers, stop):
    cfg = StreamConfig(urls=data[0], shuffle_buffer=10)
    whole = check_exact(make(cfg, workers=workers), workers, stop)
    keys = Counter(k for b in whole for k in b.keys)
    assert len(keys) == 96 and set(keys.values()) == {1}


def test_plain_resume_with_skipped_samples(data):
    cfg = StreamConfig(urls=data[0], shuffle_buffer=10)
    whole = check_exact(make(cfg, fn=key_or_skip), 2, 7)
    keys = {k for b in whole for k in b.keys}
    assert not any(k.endswith("3") for k in keys) and len(keys) >= 96 - 10 - 4


def test_resampled_resume_continues_the_random_stream(data):
    cfg = StreamConfig(urls=list(data), weights=[3, 1], resampled=True, epoch_samples=96)
    check_exact(make(cfg), 2, 5)


def test_resampled_resume_with_a_mixture_schedule(data):
    """Draws before the position are replayed with the weights of their batch."""
    points = [MixPoint(at=30, weights=[0.0, 1.0], ramp="linear")]
    cfg = StreamConfig(urls=list(data), resampled=True, epoch_samples=96, weight_schedule=points)
    whole = check_exact(make(cfg, fn=key_or_skip), 2, 9)
    late = [k for b in whole[-4:] for k in b.keys]
    assert sum(k.startswith("b") for k in late) > len(late) // 2  # the schedule acted


def test_replay_resume_continues_main_and_replay(data):
    cfg = StreamConfig(urls=data[0], replay=ReplayConfig(urls=data[1], fraction=0.25))
    whole = check_exact(make(cfg, bs=8), 2, 3)
    assert any(k.startswith("b") for b in whole for k in b.keys)


def test_a_batcher_holding_items_back_gives_each_sample_once(data):
    """Items pulled but still in the batcher at the save are read again on resume."""
    cfg = StreamConfig(urls=data[0], shuffle_buffer=10)
    build = make(cfg, batcher=PoolBatcher(4))  # one pass: packing-like
    first, state = run(build, 2, 5)
    redo = [w["main_redo"] for w in state["ranks"][0]["workers"].values()]
    assert any(redo)  # items were held back at the save
    rest, _ = run(build, 2, None, state)
    keys = Counter(k for b in first + rest for k in b.keys)
    assert len(keys) == 96 and set(keys.values()) == {1}


@pytest.mark.parametrize("change", ["workers", "batch_size"])
def test_a_position_that_does_not_fit_starts_the_epoch_over(data, change, caplog):
    cfg = StreamConfig(urls=data[0], shuffle_buffer=10)
    _, state = run(make(cfg), 2, 5)
    other = make(cfg, workers=1) if change == "workers" else make(cfg, bs=6)
    workers = 1 if change == "workers" else 2
    with caplog.at_level(logging.WARNING, logger="mmpt.data"):
        rest, _ = run(other, workers, None, state)
    assert "does not fit this run" in caplog.text
    whole, _ = run(other, workers, None)
    assert [b.keys for b in rest] == [b.keys for b in whole]


def test_cursor_skips_done_positions_but_redoes_held_ones():
    cursor = Cursor(done=6, redo=[2, 4])
    samples = [{"__key__": str(i)} for i in range(9)]
    assert [s["__key__"] for s in cursor(iter(samples))] == ["2", "4", "6", "7", "8"]
    ledger = Ledger()
    ledger.hold("main", "7", 7)
    ledger.hold("main", "8", 8)
    ledger.release(["8", "unknown"])
    assert cursor.state(ledger.positions("main")) == (9, [7])


class PartnerBatcher:
    """``bs`` anchors, then a partner: a copy of the next item, held back (not used up)."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size

    def __call__(self, items: Iterator[str]) -> Iterator[list[str]]:
        it = iter(items)
        group: list[str] = []
        ahead = next(it, None)
        while ahead is not None:
            group.append(ahead)
            ahead = next(it, None)
            if len(group) == self.batch_size:
                yield [*group, ahead if ahead is not None else group[0]]
                group = []

    def taken_keys(self, batch: list[str]) -> list[str]:
        return batch[: self.batch_size]


def test_partner_copies_are_not_used_up(data):
    """A held item already used as a partner is still read again, and trained as an anchor."""
    cfg = StreamConfig(urls=data[0], shuffle_buffer=10)
    build = make(cfg, batcher=PartnerBatcher(4))
    first, state = run(build, 2, 5)
    rest, _ = run(build, 2, None, state)
    anchors = Counter(k for b in first + rest for k in b.keys[:4])
    assert len(anchors) == 96 and set(anchors.values()) == {1}


def test_resampled_resume_with_a_schedule_and_a_holding_batcher(data):
    """Held draws of a scheduled mixture are read again from their sources, in their places."""
    points = [MixPoint(at=30, weights=[0.0, 1.0], ramp="linear")]
    cfg = StreamConfig(urls=list(data), resampled=True, epoch_samples=96, weight_schedule=points)
    build = make(cfg, fn=key_or_skip, batcher=PoolBatcher(4))
    _, state = run(build, 2, 7)
    workers = state["ranks"][0]["workers"].values()
    assert any(w["main_redo"] for w in workers)  # items were held back at the save
    assert all(len(w["main_from"]) == len(w["main_redo"]) for w in workers)
    check_exact(build, 2, 7)
    check_exact(build, 0, 4)


def test_a_schedule_position_from_an_older_format_starts_the_epoch_over(data, caplog):
    points = [MixPoint(at=30, weights=[0.0, 1.0], ramp="linear")]
    cfg = StreamConfig(urls=list(data), resampled=True, epoch_samples=96, weight_schedule=points)
    _, state = run(make(cfg), 2, 5)
    for w in state["ranks"][0]["workers"].values():  # as saved before ``drawn``
        w["ends"] = [[4, w["batches"]]]
        del w["drawn"], w["main_from"]
    with caplog.at_level(logging.WARNING, logger="mmpt.data"):
        rest, _ = run(make(cfg), 2, None, state)
    assert "older mmpt" in caplog.text
    whole, _ = run(make(cfg), 2, None)
    assert [b.keys for b in rest] == [b.keys for b in whole]

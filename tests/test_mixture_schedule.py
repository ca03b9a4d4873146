"""Mixture schedules: per-batch source shares follow a step or linear schedule (also with
DataLoader workers), ``batch.mix`` counts each batch's items, the model logs ``data/mix/*``,
and bad schedules are start-up errors naming the field."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from mmpt.batch import ImageBatch
from mmpt.datamodules.loader import make_loader
from mmpt.datamodules.mixing import MixPoint, ReplayConfig, WeightSchedule, default_names
from mmpt.datamodules.streams import ShardStream, StreamConfig
from mmpt.models.module import MMPTModule
from tests.helpers import write_shards

BS, EPOCH_SAMPLES, EPOCHS = 20, 1000, 2  # 50 batches an epoch, 100 in the run


class KeyBatch:
    """Collate: the keys of the items."""

    def __init__(self, keys: list[str]) -> None:
        self.keys, self.skipped = keys, 0


def sample_key(sample: dict) -> str:
    return sample["__key__"]


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("mix")
    return [
        str(write_shards(root / name, n=40, per_shard=10, tag=name[0], start=0))
        for name in ("alpha", "beta")
    ]


def stream_of(cfg: StreamConfig, total: int | None = EPOCHS * EPOCH_SAMPLES // BS) -> ShardStream:
    stream = ShardStream(
        cfg.sources("data.train"), cfg, sample_key, KeyBatch, batch_size=BS, seed=3
    )
    stream.set_total_batches(total)
    return stream


def run_batches(stream: ShardStream, workers: int) -> list[KeyBatch]:
    """Every batch of the run, in training order (global batch index = position)."""
    loader = make_loader(stream, workers)
    out = []
    for epoch in range(EPOCHS):
        stream.set_epoch(epoch)
        out.extend(loader)
    assert len(out) == EPOCHS * len(loader)
    return out


def share_ok(batches: list[KeyBatch], expected: float, tag: str = "b") -> bool:
    """The share of ``tag`` keys is within 4 binomial sigma of ``expected``."""
    keys = [k for b in batches for k in b.keys]
    share = sum(k.startswith(tag) for k in keys) / len(keys)
    sigma = math.sqrt(max(expected * (1 - expected), 1e-9) / len(keys))
    return abs(share - expected) <= 4 * sigma + 1e-9


@pytest.mark.parametrize("workers", [0, 2])
def test_source_that_starts_at_80_percent(two_sources: list[str], workers: int):
    cfg = StreamConfig(
        urls=two_sources,
        resampled=True,
        epoch_samples=EPOCH_SAMPLES,
        shuffle_buffer=50,
        weights=[1, 0],
        weight_schedule=[{"at": 0.8, "weights": [0.5, 0.5]}],
    )
    batches = run_batches(stream_of(cfg), workers)
    start = int(0.8 * len(batches))
    assert all(not k.startswith("b") for b in batches[:start] for k in b.keys)
    assert share_ok(batches[start:], 0.5)
    # the logged mixture is what the batches hold
    for b in batches:
        assert b.mix == {
            "alpha": sum(k[0] == "a" for k in b.keys),
            "beta": sum(k[0] == "b" for k in b.keys),
        }
        assert sum(b.mix.values()) == BS


def test_schedule_in_batch_indices_needs_no_run_length(two_sources: list[str]):
    cfg = StreamConfig(
        urls=two_sources,
        names=["old", "new"],
        resampled=True,
        epoch_samples=EPOCH_SAMPLES,
        weight_schedule=[MixPoint(at=30, weights=[0, 1]), MixPoint(at=70, weights=[1, 0])],
    )
    batches = run_batches(stream_of(cfg, total=None), 0)
    assert share_ok(batches[:30], 0.5)
    assert all(b.mix == {"old": 0, "new": BS} for b in batches[30:70])
    assert all(b.mix == {"old": BS, "new": 0} for b in batches[70:])


@pytest.mark.parametrize("workers", [0, 2])
def test_linear_ramp_follows_the_interpolated_weights(two_sources: list[str], workers: int):
    cfg = StreamConfig(
        urls=two_sources,
        resampled=True,
        epoch_samples=EPOCH_SAMPLES,
        weights=[1, 0],
        weight_schedule=[
            MixPoint(at=0.5, weights=[0.2, 0.8], ramp="linear"),
            MixPoint(at=1.0, weights=[0.2, 0.8]),
        ],
    )
    batches = run_batches(stream_of(cfg), workers)
    total = len(batches)
    for lo in range(0, total, 10):  # windows of 10 batches (200 items)
        window = range(lo, lo + 10)
        expected = sum(0.8 * min(1.0, t / (0.5 * total)) for t in window) / len(window)
        assert share_ok(batches[lo : lo + 10], expected), lo


def test_weight_schedule_interpolates_between_points():
    points = [MixPoint(0.5, [0, 1], "linear"), MixPoint(0.75, [1, 0], "step")]
    sched = WeightSchedule([1, 0], points, total_batches=100)
    assert sched.weights_at(0) == [1, 0]
    assert sched.weights_at(25) == pytest.approx([0.5, 0.5])
    assert sched.weights_at(50) == [0, 1]
    assert sched.weights_at(74) == [0, 1]
    assert sched.weights_at(75) == [1, 0]


def test_fraction_schedule_without_run_length_fails_at_iteration(two_sources: list[str]):
    cfg = StreamConfig(
        urls=two_sources,
        resampled=True,
        epoch_samples=100,
        weight_schedule=[MixPoint(0.8, [1, 1])],
    )
    with pytest.raises(ValueError, match="set_total_batches"):
        next(iter(stream_of(cfg, total=None)))


def test_default_names_are_folder_names_made_unique():
    specs = ["/d/laion/", "/e/laion", "s3://b/cc12m/shard-{0000..0009}.tar", "pipe:curl x"]
    assert default_names(specs) == ["laion", "laion_2", "cc12m", "source3"]


def test_model_logs_the_batch_mixture():
    batch = ImageBatch(images=torch.zeros(4, 3, 2, 2, dtype=torch.uint8), labels=torch.zeros(4))
    batch.mix = {"old": 1, "new": 3}
    moved = move_data_to_device(batch, torch.device("cpu"))  # how Lightning moves batches
    module = MMPTModule()
    with mock.patch.object(module, "log") as log:
        module.on_train_batch_start(moved, 0)
        module.on_train_batch_start(ImageBatch(images=batch.images, labels=batch.labels), 1)
    logged = {c.args[0]: c.args[1] for c in log.call_args_list}
    assert logged == {"data/mix/old": 0.25, "data/mix/new": 0.75}
    assert all(c.kwargs["on_step"] for c in log.call_args_list)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"resampled": False}, r"data\.train\.weight_schedule needs data\.train\.resampled"),
        (
            {"weight_schedule": [MixPoint(0.5, [1, 1, 1])]},
            r"data\.train\.weight_schedule\[0\]\.weights has 3 entries for 2 sources",
        ),
        (
            {"weight_schedule": [MixPoint(0.5, [1, 1]), MixPoint(0.5, [1, 0])]},
            r"data\.train\.weight_schedule\[1\]\.at",
        ),
        ({"weight_schedule": [MixPoint(0.5, [1, 1], "cosine")]}, r"weight_schedule\[0\]\.ramp"),
        (
            {"weight_schedule": [MixPoint(0.5, [1, 1]), MixPoint(50, [1, 0])]},
            r"data\.train\.weight_schedule mixes fractions",
        ),
        ({"names": ["a"]}, r"data\.train\.names"),
        ({"replay": ReplayConfig(urls="x", fraction=1.0)}, r"data\.train\.replay\.fraction"),
        ({"replay": {"urls": "x", "fraction": 0.0}}, r"data\.train\.replay\.fraction"),
        (
            {"replay": ReplayConfig(urls="x", fraction=0.2, name="alpha")},
            r"data\.train\.replay\.name",
        ),
    ],
)
def test_bad_mixing_configs_name_the_field(two_sources: list[str], changes: dict, message: str):
    fields = {
        "urls": two_sources,
        "resampled": True,
        "epoch_samples": 100,
        "weight_schedule": [MixPoint(0.5, [1, 1])],
        **changes,
    }
    with pytest.raises(ValueError, match=message):
        StreamConfig(**fields).sources("data.train")


def test_batch_clock_resumes_mid_epoch_and_run_length_is_the_first_limit():
    from types import SimpleNamespace

    from mmpt.datamodules.loader import training_batches
    from mmpt.datamodules.mixing import BatchClock

    clock = BatchClock(epoch=2, per_epoch=20, worker=1, num_workers=2, offset=7)
    seen = []
    for _ in range(3):
        seen.append(clock.batch)
        clock.tick()
    assert seen == [48, 50, 52]  # 2 * 20 + 7 + 1, then every other batch

    class Stream:
        def __len__(self) -> int:
            return 20

    def trainer(**kw):
        base = dict(max_steps=-1, max_epochs=None, accumulate_grad_batches=1)
        return SimpleNamespace(**{**base, "limit_train_batches": 1.0, **kw})

    assert training_batches(trainer(max_steps=1000, max_epochs=1), Stream()) == 20
    assert training_batches(trainer(max_steps=30, max_epochs=5), Stream()) == 30
    assert training_batches(trainer(max_epochs=3, limit_train_batches=0.5), Stream()) == 30
    assert training_batches(trainer(max_steps=10, accumulate_grad_batches=4), Stream()) == 40
    assert training_batches(trainer(), Stream()) is None

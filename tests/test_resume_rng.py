"""Random states for bit-exact resume: the training process's generators in checkpoints
(:mod:`mmpt.models.rng_state`), per-sample seeds in the loader workers
(:mod:`mmpt.datamodules.seeding`), loaders that never draw from torch's global generator.
"""

from __future__ import annotations

import io
import logging
import os
import random
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch
from lightning.fabric.utilities.types import _Stateful

from mmpt.datamodules import seeding
from mmpt.datamodules.loader import make_loader
from mmpt.datamodules.seeding import sample_seed, seeded
from mmpt.datamodules.streams import ShardStream, StreamConfig
from mmpt.models.rng_state import VERSION, TrainingRNG, capture, restore
from tests.helpers import write_shards
from tests.test_resume import run

pytestmark = pytest.mark.filterwarnings("ignore:.*`IterableDataset` has `__len__` defined")


def draws() -> list[float]:
    """One draw of each generator the training process uses."""
    return [random.random(), float(np.random.rand()), torch.rand(1).item()]


def test_capture_and_restore_round_trip_through_a_weights_only_checkpoint():
    state = capture()
    expected = draws()
    buf = io.BytesIO()
    torch.save({"rng": state}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)["rng"]
    draws()  # move every generator on
    restore(loaded)
    assert draws() == expected


def test_validation_between_fork_and_join_leaves_the_training_draws_alone():
    rng = TrainingRNG()
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    expected = draws()
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    rng.fork()
    draws()  # validation's random masks
    saved = rng.state_dict(0, 1)  # a checkpoint saved during validation
    rng.join()
    assert draws() == expected
    restore(saved["ranks"][0])  # it holds the training states, not validation's
    assert draws() == expected


def test_a_loaded_state_is_applied_once_and_only_on_a_matching_world(caplog):
    rng = TrainingRNG()
    state = rng.state_dict(0, 1)
    expected = draws()
    rng.load_state_dict(state)
    rng.apply(0, 1)
    assert draws() == expected
    rng.apply(0, 1)  # nothing loaded any more: the generators are left as they are
    assert draws() != expected
    rng.load_state_dict(state)
    with caplog.at_level(logging.WARNING, logger="mmpt.models"):
        rng.apply(0, 2)
    assert "do not fit this run" in caplog.text
    assert draws() != expected


def test_sample_seeds_are_the_same_in_every_process_and_distinct():
    """Unlike ``hash()`` of a string, the seed does not change with the process's hash seed."""
    code = (  # the module alone (the package would import every model library)
        "import importlib.util as u, sys; spec = u.spec_from_file_location('s', sys.argv[1]); "
        "m = u.module_from_spec(spec); spec.loader.exec_module(m); "
        "print(m.sample_seed(3, 'main', 7))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    cmd = [sys.executable, "-c", code, seeding.__file__]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == sample_seed(3, "main", 7)
    seeds = {sample_seed(3, 1, 0, w, s, p) for w in range(2) for s in ("main", "replay")
             for p in range(50)}  # fmt: skip
    assert len(seeds) == 200


def test_seeded_restores_the_callers_generators_only_when_asked():
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    expected = draws()
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    with seeded(5, restore=True):
        inside = draws()
    assert draws() == expected
    with seeded(5, restore=False):
        assert draws() == inside
    assert draws() != expected


def test_making_a_loader_iterator_does_not_draw_from_torchs_generator(tmp_path):
    cfg = StreamConfig(urls=str(write_shards(tmp_path, n=8, per_shard=4)))
    stream = ShardStream(cfg.sources("data.train"), cfg, augment, DrawBatch, 4)
    before = torch.get_rng_state()
    next(iter(make_loader(stream, 0)))
    assert torch.equal(torch.get_rng_state(), before)
    deferred = make_loader(stream, 0, before_iter=lambda: None)
    assert isinstance(deferred, _Stateful)  # Lightning's resumable-loader protocol


class DrawBatch:
    """Collate: the items' keys and their random draws."""

    def __init__(self, items: list[tuple[str, list[float]]]) -> None:
        self.keys = [k for k, _ in items]
        self.draws = [d for _, d in items]
        self.skipped = 0


def augment(sample: dict[str, Any]) -> tuple[str, list[float]]:
    """A sample function drawing as augmentations and caption choices do."""
    return sample["__key__"], draws()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_worker_draws_the_uninterrupted_runs_augmentations(tmp_path, workers):
    """The fast-forwarded workers decode nothing before the position, yet every later sample
    draws what it drew in the uninterrupted run (in the training process too, which
    ``workers=0`` decodes in, without moving its own generators)."""
    shards = str(write_shards(tmp_path, n=48, per_shard=12))
    cfg = StreamConfig(urls=shards, shuffle_buffer=10)

    def build() -> ShardStream:
        stream = ShardStream(
            cfg.sources("data.train"), cfg, augment, DrawBatch, 4, seed=3, num_workers=workers
        )
        stream.track = True
        return stream

    whole, _ = run(build, workers, None)
    first, state = run(build, workers, 5)
    torch.manual_seed(9)
    expected = torch.rand(1)
    torch.manual_seed(9)
    rest, _ = run(build, workers, None, state)
    assert torch.equal(torch.rand(1), expected)
    assert [b.draws for b in first + rest] == [b.draws for b in whole]
    assert len({d[0] for b in whole for d in b.draws}) == 48  # every sample its own draws


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_generators_are_captured_once_cuda_is_initialised():
    x = torch.ones(64, 64, device="cuda")
    state = capture()
    assert len(state["cuda"]) == torch.cuda.device_count()
    expected = torch.nn.functional.dropout(x, 0.5)  # GPU dropout draws from the CUDA generator
    torch.nn.functional.dropout(x, 0.5)
    restore(state)
    assert torch.equal(torch.nn.functional.dropout(x, 0.5), expected)


def test_each_rank_restores_its_own_states():
    """A checkpoint of 2 ranks holds one entry per rank; rank 1 takes the second."""
    random.seed(0)
    rank0 = capture()
    random.seed(1)
    rank1 = capture()
    expected = random.random()
    rng = TrainingRNG()
    rng.load_state_dict({"version": VERSION, "world_size": 2, "ranks": [rank0, rank1]})
    rng.apply(1, 2)
    assert random.random() == expected

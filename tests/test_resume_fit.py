"""Kill a 2-process gloo DDP ``mmpt fit`` (2 loader workers a rank) mid-epoch, resume it with
``--ckpt_path last``, and check from the recorded batch keys that every sample of every epoch
was trained on exactly once: nothing repeated, nothing skipped; and that every step of a
resumed run has the uninterrupted run's loss (random states restored, batches in order).

The first run SIGKILLs both ranks after step 5, two steps past the newest checkpoint (step 3,
saved every 3 steps); the steps after the checkpoint are lost with the kill, as in a real
crash, so they are not counted. The resumed run must take up epoch 0 at its fourth batch on
each rank, with the stream positions of all 4 workers, and then run epoch 1 whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import write_shards
from tests.test_cli import tiny_fit_config, write_yaml

REPO = Path(__file__).resolve().parents[1]
SAMPLES, RANKS = 64, 2  # 8 shards of 8, 4 per batch: 8 steps a rank (16 on one process)
KILL_STEP, EVERY = 5, 3


def fit_config(
    shards: Path, run: Path, keys: Path, kill: int | None, every: int, devices: int,
    strategy: Any = "ddp",
) -> dict[str, Any]:  # fmt: skip
    cfg = tiny_fit_config(shards, run)
    trainer = cfg["trainer"]
    trainer.update(devices=devices, strategy=strategy, max_steps=-1, max_epochs=2)
    trainer.pop("val_check_interval")
    trainer["limit_val_batches"] = 0
    trainer["callbacks"] = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {
                "dirpath": str(run / "checkpoints"),
                "save_last": True,
                "save_top_k": 0,
                "every_n_train_steps": every,
            },
        },
        {"class_path": "tests.resume_probe.KeyRecorder", "init_args": {"out": str(keys)}},
    ]
    if kill is not None:
        trainer["callbacks"].append(
            {"class_path": "tests.resume_probe.KillAt", "init_args": {"step": kill}}
        )
    data = cfg["data"]["init_args"]
    data.update(batch_size=4, num_workers=2, val=None)
    data["train"] = {"urls": str(shards), "shuffle_buffer": 6}
    return cfg


def mmpt_fit(config: Path, *extra: str) -> subprocess.CompletedProcess:
    """``python -m mmpt.cli fit`` in its own session (so no rank can outlive the test)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmpt.cli", "fit", "-c", str(config), *extra],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=400)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


def records(keys: Path, ranks: int) -> list[dict[str, Any]]:
    return [
        {**json.loads(line), "rank": r}
        for r in range(ranks)
        for line in (keys / f"keys_rank{r}.jsonl").read_text().splitlines()
    ]


def kill_and_resume(
    tmp: Path, ranks: int, kill: int, every: int, strategy: Any = "ddp"
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:  # fmt: skip
    """Fit killed right after step ``kill`` (checkpoints every ``every`` steps), then resumed.

    Returns the checkpoint it resumed from, and the batch records that count: the first
    run's before the checkpoint, and all of the resumed run's.
    """
    shards = write_shards(tmp / "shards", n=SAMPLES, per_shard=8)
    run = tmp / "run"
    keys1, keys2 = tmp / "keys1", tmp / "keys2"
    keys1.mkdir(), keys2.mkdir()
    first = fit_config(shards, run, keys1, kill, every, ranks, strategy)
    second = fit_config(shards, run, keys2, None, every, ranks, strategy)

    killed = mmpt_fit(write_yaml(tmp / "first.yaml", first))
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == (kill // every) * every

    resumed = mmpt_fit(write_yaml(tmp / "second.yaml", second), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    before = [r for r in records(keys1, ranks) if r["step"] < ckpt["global_step"]]
    after = records(keys2, ranks)
    assert min(r["step"] for r in after) == ckpt["global_step"]
    return ckpt, before, after


def check_epochs(records: list[dict[str, Any]], ranks: int) -> None:
    """Each epoch: every sample exactly once over all ranks, every rank its full steps."""
    for epoch in range(2):
        seen = Counter(k for r in records if r["epoch"] == epoch for k in r["keys"])
        assert len(seen) == SAMPLES, f"epoch {epoch}: {SAMPLES - len(seen)} samples skipped"
        repeated = sorted(k for k, n in seen.items() if n > 1)
        assert not repeated, f"epoch {epoch}: repeated {repeated}"
    steps = Counter((r["epoch"], r["rank"]) for r in records)
    assert set(steps.values()) == {SAMPLES // (ranks * 4)}


def test_killed_ddp_fit_resumes_with_every_sample_exactly_once(tmp_path: Path):
    ckpt, before, after = kill_and_resume(tmp_path, RANKS, kill=KILL_STEP, every=EVERY)
    state = ckpt["ImageTextDataModule"]
    assert state["world_size"] == RANKS and state["num_workers"] == 2
    assert not state["epoch_done"]
    assert [sum(w["batches"] for w in r["workers"].values()) for r in state["ranks"]] == [
        ckpt["global_step"]
    ] * RANKS
    rng = ckpt["mmpt_rng"]  # each rank's generator states, gathered (mmpt.models.rng_state)
    assert rng["world_size"] == RANKS and len(rng["ranks"]) == RANKS
    check_epochs(before + after, RANKS)


@pytest.mark.parametrize(
    "kill,every",
    [(21, 5), pytest.param(17, 16, marks=pytest.mark.slow)],  # ~35 CPU-s each: one by default
    ids=["mid-epoch-1", "at-the-end-of-epoch-0"],
)
def test_one_process_resumes_in_a_later_epoch_or_after_an_epoch_end(tmp_path, kill, every):
    """Epoch 1 taken up mid-way (the workers must start in epoch 1, not 0); a checkpoint at
    the last batch of epoch 0 resumes with a whole epoch 1."""
    ckpt, before, after = kill_and_resume(tmp_path, 1, kill=kill, every=every)
    assert ckpt["ImageTextDataModule"]["epoch_done"] == (every == 16)
    check_epochs(before + after, 1)


@pytest.mark.slow  # a 2-process FSDP2 fit killed and resumed; test_distributed_fit fits FSDP2
def test_fsdp2_restoring_after_setup_resumes_exactly(tmp_path: Path):
    """FSDP2 restores the checkpoint after the strategy's setup built the loader: the position
    still reaches the workers (they start at the first batch)."""
    strategy = {"class_path": "mmpt.strategies.FSDP2"}
    _, before, after = kill_and_resume(tmp_path, RANKS, KILL_STEP, EVERY, strategy)
    check_epochs(before + after, RANKS)


def test_a_checkpoint_saved_on_an_exception_hands_the_failed_batch_out_again(tmp_path: Path):
    """OnExceptionCheckpoint saves while a batch is on the device but unstepped: the resumed run
    must train that batch, so the epoch still sees every sample once."""
    shards = write_shards(tmp_path / "shards", n=SAMPLES, per_shard=8)
    run, keys1, keys2 = tmp_path / "run", tmp_path / "keys1", tmp_path / "keys2"
    keys1.mkdir(), keys2.mkdir()
    first = fit_config(shards, run, keys1, None, 100, 1)
    first["trainer"]["callbacks"] += [
        {"class_path": "tests.resume_probe.RaiseAt", "init_args": {"step": 5}},
        {
            "class_path": "lightning.pytorch.callbacks.OnExceptionCheckpoint",
            "init_args": {"dirpath": str(run / "exc")},
        },
    ]
    failed = mmpt_fit(write_yaml(tmp_path / "first.yaml", first))
    assert failed.returncode != 0 and "planned failure" in failed.stdout
    ckpt_path = run / "exc" / "on_exception.ckpt"
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)["ImageTextDataModule"]
    assert sum(w["batches"] for w in state["ranks"][0]["workers"].values()) == 5

    second = fit_config(shards, run, keys2, None, 100, 1)
    resumed = mmpt_fit(write_yaml(tmp_path / "second.yaml", second), "--ckpt_path", str(ckpt_path))
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    before = [r for r in records(keys1, 1) if r["step"] < 5]
    check_epochs(before + records(keys2, 1), 1)


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning reads these to join an existing job; the test launches its own."""
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)


#: Tiny MAE with dropout: random masks (training and validation) and dropout in the process.
TINY_MAE = {
    "class_path": "mmpt.models.mae.MAEModule",
    "init_args": {
        "encoder": {
            "class_path": "mmpt.models.encoders.TimmVisionTower",
            "init_args": {
                "model_name": "vit_tiny_patch16_224",
                "image_size": 32,
                "embed_dim": 0,
                "model_kwargs": {
                    "patch_size": 8,
                    "embed_dim": 32,
                    "depth": 2,
                    "num_heads": 2,
                    "proj_drop_rate": 0.1,
                },
            },
        },
        "decoder_dim": 32,
        "decoder_depth": 1,
        "decoder_heads": 2,
        "log_reconstructions": 0,
    },
}
#: Per rank 4 shards of 8, 4 per batch, 2 workers: 8 steps an epoch; checkpoints and validation
#: every 5 steps.
MAE_SAMPLES, MAE_KILL, MAE_EVERY = 32, 7, 5


def mae_config(
    shards: Path, run: Path, out: Path, kill: int | None, ranks: int = 1
) -> dict[str, Any]:  # fmt: skip
    """MAE on the test shards for 2 epochs: random crops and flips in 2 loader workers, random
    masks and dropout in the training process, a validation (with random masks) at step 5."""
    cfg = fit_config(shards, run, out, kill, MAE_EVERY, devices=ranks)
    cfg["trainer"].update(val_check_interval=MAE_EVERY, limit_val_batches=1)
    cfg["model"] = TINY_MAE
    val = {"urls": str(shards), "shuffle_buffer": 0, "shuffle_shards": False}
    cfg["data"] = {
        "class_path": "mmpt.datamodules.images.ImageDataModule",
        "init_args": {
            "train": {"urls": str(shards), "shuffle_buffer": 6},
            "val": val,
            "batch_size": 4,
            "num_workers": 2,
            "train_crop_scale": [0.5, 1.0],
        },
    }
    return cfg


def losses(out: Path, ranks: int) -> dict[tuple[int, int], float]:
    """(rank, step) -> training loss, as recorded by :class:`tests.resume_probe.KeyRecorder`."""
    return {
        (rank, (r := json.loads(line))["step"]): r["loss"]
        for rank in range(ranks)
        for line in (out / f"losses_rank{rank}.jsonl").read_text().splitlines()
    }


@pytest.mark.slow  # three fits (~45 s CPU a process); tests/test_resume_rng.py: the fast checks
@pytest.mark.parametrize("ranks", [1, 2], ids=["one-process", "ddp"])
def test_killed_and_resumed_fit_has_the_uninterrupted_runs_losses(tmp_path: Path, ranks: int):
    """Every step after a SIGKILL and ``--ckpt_path last`` has exactly the loss of the run that
    was never interrupted, on every rank: the workers' augmentations, the masks and dropout
    draw the same."""
    shards = write_shards(tmp_path / "shards", n=MAE_SAMPLES * ranks, per_shard=8)
    outs = {name: tmp_path / name for name in ("whole", "killed", "resumed")}
    for out in outs.values():
        out.mkdir()
    plan = {"whole": ("whole_run", None), "killed": ("run", MAE_KILL), "resumed": ("run", None)}
    configs = {}
    for name, (run, kill) in plan.items():
        cfg = mae_config(shards, tmp_path / run, outs[name], kill, ranks)
        configs[name] = write_yaml(tmp_path / f"{name}.yaml", cfg)
    whole = mmpt_fit(configs["whole"])
    assert whole.returncode == 0, whole.stdout[-3000:]
    killed = mmpt_fit(configs["killed"])
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    resumed = mmpt_fit(configs["resumed"], "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "not resumable" not in resumed.stdout  # Lightning's resumable-loader protocol

    steps = 2 * MAE_SAMPLES // 4
    expected = losses(outs["whole"], ranks)
    assert sorted(expected) == [(r, s) for r in range(ranks) for s in range(steps)]
    first = losses(outs["killed"], ranks)
    # the runs are deterministic
    assert first == {(r, s): expected[r, s] for r in range(ranks) for s in range(MAE_KILL)}
    saved = (MAE_KILL // MAE_EVERY) * MAE_EVERY
    after = losses(outs["resumed"], ranks)
    assert sorted(after) == [(r, s) for r in range(ranks) for s in range(saved, steps)]
    differ = {k: (loss, expected[k]) for k, loss in after.items() if loss != expected[k]}
    assert not differ, f"steps whose loss differs from the uninterrupted run's: {differ}"

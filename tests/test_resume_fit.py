"""Kill a 2-process gloo DDP ``mmpt fit`` (2 loader workers a rank) mid-epoch, resume it with
``--ckpt_path last``, and check from the recorded batch keys that every sample of every epoch
was trained on exactly once: nothing repeated, nothing skipped.

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
SAMPLES, RANKS, STEPS_PER_EPOCH = 64, 2, 8  # 8 shards of 8; 4 per batch: 8 steps a rank
KILL_STEP, EVERY = 5, 3


def fit_config(shards: Path, run: Path, keys: Path, kill: bool) -> dict[str, Any]:
    cfg = tiny_fit_config(shards, run)
    trainer = cfg["trainer"]
    trainer.update(devices=RANKS, strategy="ddp", max_steps=-1, max_epochs=2)
    trainer.pop("val_check_interval")
    trainer["limit_val_batches"] = 0
    trainer["callbacks"] = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {
                "dirpath": str(run / "checkpoints"),
                "save_last": True,
                "save_top_k": 0,
                "every_n_train_steps": EVERY,
            },
        },
        {"class_path": "tests.resume_probe.KeyRecorder", "init_args": {"out": str(keys)}},
    ]
    if kill:
        trainer["callbacks"].append(
            {"class_path": "tests.resume_probe.KillAt", "init_args": {"step": KILL_STEP}}
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


def records(keys: Path) -> list[dict[str, Any]]:
    return [
        {**json.loads(line), "rank": r}
        for r in range(RANKS)
        for line in (keys / f"keys_rank{r}.jsonl").read_text().splitlines()
    ]


def test_killed_ddp_fit_resumes_with_every_sample_exactly_once(tmp_path: Path):
    shards = write_shards(tmp_path / "shards", n=SAMPLES, per_shard=8)
    run = tmp_path / "run"
    keys1, keys2 = tmp_path / "keys1", tmp_path / "keys2"
    keys1.mkdir(), keys2.mkdir()
    first = write_yaml(tmp_path / "first.yaml", fit_config(shards, run, keys1, kill=True))
    second = write_yaml(tmp_path / "second.yaml", fit_config(shards, run, keys2, kill=False))

    killed = mmpt_fit(first)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    saved_step = ckpt["global_step"]
    assert saved_step == (KILL_STEP // EVERY) * EVERY
    state = ckpt["ImageTextDataModule"]
    assert state["world_size"] == RANKS and state["num_workers"] == 2
    assert [sum(w["batches"] for w in r["workers"].values()) for r in state["ranks"]] == [
        saved_step
    ] * RANKS

    resumed = mmpt_fit(second, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stdout[-3000:]

    before = [r for r in records(keys1) if r["step"] < saved_step]  # lost with the kill: after
    after = records(keys2)
    assert min(r["step"] for r in after) == saved_step
    for epoch in range(2):
        seen = Counter(k for r in before + after if r["epoch"] == epoch for k in r["keys"])
        assert len(seen) == SAMPLES, f"epoch {epoch}: {SAMPLES - len(seen)} samples skipped"
        repeated = sorted(k for k, n in seen.items() if n > 1)
        assert not repeated, f"epoch {epoch}: repeated {repeated}"
    steps = Counter((r["epoch"], r["rank"]) for r in before + after)
    assert set(steps.values()) == {STEPS_PER_EPOCH}


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning reads these to join an existing job; the test launches its own."""
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)

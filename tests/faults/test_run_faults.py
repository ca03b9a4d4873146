"""Faults of a run's life, each with its exact outcome: a second fit into a live run, ``kill -9``
in validation and half-way through a checkpoint write (then ``--ckpt_path last``).

The fits use a recipe's layout (``runs/tiny/version_N`` with ``checkpoints/last.ckpt`` saved
every 2 steps, validation every 3). A killed fit is resumed with ``--ckpt_path last``: it must
continue from the newest *complete* ``last.ckpt`` of that run (step 2), in the same folder
(no ``version_1``, no ``last-v1.ckpt``), taking over the dead fit's lock, and each of its steps
must have the loss of a fit that was never interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from mmpt.checkpoint_io import AtomicCheckpointIO
from mmpt.cli import main
from mmpt.run_lock import lock_path
from mmpt.runs import RUN_ENV, claim_fit_run
from tests.helpers import write_shards
from tests.test_cli import tiny_fit_config, write_yaml
from tests.test_resume_fit import mmpt_fit

pytestmark = [
    pytest.mark.filterwarnings("ignore:LightningCLI's args parameter"),
    pytest.mark.filterwarnings("ignore:.*IterableDataset. has .__len__. defined"),
]
REPO = Path(__file__).resolve().parents[2]
STEPS, EVERY, VAL_EVERY, KILL = 6, 2, 3, 4  # checkpoints at 2, 4, 6; validation at 3, 6


@pytest.fixture(autouse=True)
def _rank_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "WORLD_SIZE", RUN_ENV):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """In-process fits compute as the killed ones (``OMP_NUM_THREADS=1``), bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_config(
    shards: Path, runs: Path, out: Path, extra: list[dict[str, Any]] | None = None,
    plugins: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The tiny CLIP fit with a recipe's run layout, recording its losses into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = tiny_fit_config(shards, runs)
    trainer = cfg["trainer"]
    trainer.update(max_steps=STEPS, val_check_interval=VAL_EVERY, limit_val_batches=1)
    trainer["logger"] = {"class_path": "mmpt.loggers.CSVLogger", "init_args": {"name": "tiny"}}
    checkpoint = {"save_last": True, "save_top_k": 0, "every_n_train_steps": EVERY}
    trainer["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": checkpoint},
        {"class_path": "tests.resume_probe.KeyRecorder", "init_args": {"out": str(out)}},
        {"class_path": "mmpt.callbacks.RunSummary"},
        *(extra or []),
    ]
    if plugins is not None:
        trainer["plugins"] = plugins
    cfg["data"]["init_args"].update(batch_size=4)
    return cfg


def losses(out: Path) -> dict[int, float]:
    lines = (out / "losses_rank0.jsonl").read_text().splitlines()
    return {(r := json.loads(line))["step"]: r["loss"] for line in lines}


def step_of(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The shards and the per-step losses of a fit that is never interrupted."""
    tmp = tmp_path_factory.mktemp("whole")
    shards = write_shards(tmp / "shards", n=40, per_shard=5)
    cfg = write_yaml(tmp / "whole.yaml", run_config(shards, tmp / "runs", tmp / "out"))
    assert main(["fit", "-c", str(cfg)]) == 0
    yield {"shards": shards, "losses": losses(tmp / "out")}


def kill_then_resume(tmp: Path, whole: dict[str, Any], fault: dict[str, Any]) -> Path:
    """Run a fit that SIGKILLs itself (``fault``: config changes), check what it left, resume it.

    Returns:
        The run folder.
    """
    runs, run = tmp / "runs", tmp / "runs" / "tiny" / "version_0"
    first = run_config(whole["shards"], runs, tmp / "killed", **fault)
    killed = mmpt_fit(write_yaml(tmp / "killed.yaml", first))
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    holder = json.loads(lock_path(run).read_text())  # the dead fit's lock stays behind
    assert holder["pid"] != os.getpid() and holder["host"] == socket.gethostname()
    last = run / "checkpoints" / "last.ckpt"
    assert step_of(last) == EVERY  # the newest complete checkpoint
    partial = [p.name for p in last.parent.iterdir() if p != last]
    assert [n.startswith(".last.ckpt.") and n.endswith(".tmp") for n in partial] == (
        [True] if "plugins" in fault else []
    )  # a write killed half-way left its temporary file, and only that

    second = run_config(whole["shards"], runs, tmp / "resumed")
    with pytest.warns(UserWarning, match="taking over the stale lock"):
        code = main(
            ["fit", "-c", str(write_yaml(tmp / "resumed.yaml", second)), "--ckpt_path", "last"]
        )
    assert code == 0
    assert sorted(p.name for p in (runs / "tiny").iterdir()) == ["last", "version_0"]
    assert os.readlink(runs / "tiny" / "last") == "version_0"
    assert not lock_path(run).exists()
    assert step_of(last) == STEPS
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    resumed, expected = losses(tmp / "resumed"), whole["losses"]
    assert sorted(resumed) == list(range(EVERY, STEPS))  # from the complete checkpoint on
    assert resumed == {s: expected[s] for s in resumed}  # as if never interrupted
    return run


def metric_steps(run: Path, name: str = "train/loss") -> list[int]:
    import csv

    rows = csv.DictReader((run / "metrics.csv").open())
    return [int(r["step"]) for r in rows if r.get(name)]


# two fits: ~15 s on this 2-core machine (30-50 s when 8 other jobs share it)
def test_kill_in_validation_resumes_from_the_last_complete_checkpoint(tmp_path: Path, whole):
    kill = {"class_path": "tests.resume_probe.KillInValidation", "init_args": {"step": VAL_EVERY}}
    run = kill_then_resume(tmp_path, whole, {"extra": [kill]})
    assert metric_steps(run) == list(range(STEPS))  # one row a step: the killed run's first


# two fits: ~17 s on this 2-core machine (30-50 s when 8 other jobs share it)
def test_kill_while_writing_a_checkpoint_leaves_the_previous_one_whole(tmp_path: Path, whole):
    plugin = {"class_path": "tests.resume_probe.KillingCheckpointIO", "init_args": {"step": KILL}}
    run = kill_then_resume(tmp_path, whole, {"plugins": plugin})
    assert metric_steps(run) == list(range(STEPS))


def test_a_checkpoint_write_killed_half_way_keeps_the_old_file_and_last_skips_the_partial(
    tmp_path: Path,
):  # fast: no fit, only the atomic write of AtomicCheckpointIO, killed half-way
    run = tmp_path / "tiny" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 2, "w": torch.ones(4)}, last)
    code = (  # AtomicCheckpointIO's local write, with only torch and mmpt.io imported
        "import sys, torch; from mmpt.io import atomic_torch_save; "
        "from tests.kill_probe import half_save_then_kill; torch.save = half_save_then_kill; "
        "atomic_torch_save({'global_step': 4, 'w': torch.zeros(1 << 16)}, sys.argv[1])"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code, str(last)], env=env, cwd=REPO)
    assert proc.returncode == -signal.SIGKILL
    (partial,) = [p for p in last.parent.iterdir() if p.name != "last.ckpt"]
    assert partial.name.startswith(".last.ckpt.") and partial.suffix == ".tmp"
    assert partial.stat().st_size > 0
    with pytest.raises(Exception):  # noqa: B017 - a half zip: torch refuses it
        torch.load(partial, weights_only=True)
    assert step_of(last) == 2
    from tests.test_runs import fit_ns

    cfg = fit_ns(tmp_path, "last")
    claim_fit_run(cfg).close(failed=False, trained=True)
    assert cfg.ckpt_path == str(last)  # the whole previous file, never the partial one
    assert not partial.exists()  # removed once the resumed run held the lock


# one fit: ~16 s on this 2-core machine (35-50 s when 8 other jobs share it)
def test_a_second_fit_into_a_live_run_is_refused_and_the_first_completes(
    tmp_path: Path, whole, capsys: pytest.CaptureFixture
):  # fmt: skip
    runs, run = tmp_path / "runs", tmp_path / "runs" / "tiny" / "version_0"
    pause = {
        "class_path": "tests.resume_probe.PauseAt",
        "init_args": {"step": 3, "dir": str(tmp_path)},
    }
    first = run_config(whole["shards"], runs, tmp_path / "first", extra=[pause])
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    argv = [
        sys.executable,
        "-m",
        "mmpt.cli",
        "fit",
        "-c",
        str(write_yaml(tmp_path / "a.yaml", first)),
    ]
    proc = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "paused").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        assert step_of(run / "checkpoints" / "last.ckpt") == 2
        second = write_yaml(tmp_path / "b.yaml", run_config(whole["shards"], runs, tmp_path / "b"))
        assert main(["fit", "-c", str(second), "--ckpt_path", "last"]) == 2
        err = capsys.readouterr().err
        assert f"version_0 is in use by another fit: pid {proc.pid} on host" in err
        assert "delete" in err and str(lock_path(run)) in err
    finally:
        (tmp_path / "go").touch()
        out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert sorted(p.name for p in (runs / "tiny").iterdir()) == ["last", "version_0"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    assert step_of(run / "checkpoints" / "last.ckpt") == STEPS
    assert losses(tmp_path / "first") == whole["losses"]  # unharmed
    assert not (tmp_path / "b").joinpath("losses_rank0.jsonl").exists()


@pytest.mark.slow  # two 2-process gloo DDP fits (~2 min on a loaded CPU)
def test_a_killed_ddp_fit_resumes_in_its_run_on_every_rank(tmp_path: Path):
    """Rank 0 alone locks; the rank it launches takes rank 0's run and checkpoint."""
    shards = write_shards(tmp_path / "shards", n=40, per_shard=5)
    runs, run = tmp_path / "runs", tmp_path / "runs" / "tiny" / "version_0"
    kill = {"class_path": "tests.resume_probe.KillAt", "init_args": {"step": VAL_EVERY}}
    configs = {}
    for name, extra in (("killed", [kill]), ("resumed", [])):
        cfg = run_config(shards, runs, tmp_path / name, extra=extra)
        cfg["trainer"].update(devices=2, strategy="ddp")
        configs[name] = write_yaml(tmp_path / f"{name}.yaml", cfg)
    killed = mmpt_fit(configs["killed"])
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    assert sorted(p.name for p in (runs / "tiny").iterdir()) == [".version_0.lock", "version_0"]
    resumed = mmpt_fit(configs["resumed"], "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "taking over the stale lock" in resumed.stdout
    assert sorted(p.name for p in (runs / "tiny").iterdir()) == ["last", "version_0"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    assert step_of(run / "checkpoints" / "last.ckpt") == STEPS
    for rank in (0, 1):
        lines = (tmp_path / "resumed" / f"losses_rank{rank}.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == list(range(EVERY, STEPS))

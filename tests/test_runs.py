"""Run identities (mmpt/runs.py, mmpt/run_lock.py): own ``version_N`` per fit, ``last`` within
the resumed run, the lock and its stale takeover, no empty folder after a failed fit, and the CSV
logger continuing a resumed run's ``metrics.csv``."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from jsonargparse import Namespace

from mmpt.cli import main
from mmpt.loggers import CSVLogger
from mmpt.run_lock import RunFolderError, RunLock, RunLockedError, lock_path
from mmpt.runs import RUN_ENV, claim_fit_run
from tests.test_cli import tiny_fit_config, write_yaml

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


@pytest.fixture(autouse=True)
def _rank_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", RUN_ENV):
        monkeypatch.delenv(var, raising=False)


def fit_ns(root: Path, ckpt_path: str | None = None, version: int | str | None = None):
    """A parsed ``fit`` namespace with a recipe's layout: CSV logger, ModelCheckpoint in it."""
    logger = Namespace(
        class_path="mmpt.loggers.CSVLogger",
        init_args=Namespace(save_dir=str(root), name="tiny", version=version),
    )
    ckpt = Namespace(
        class_path="lightning.pytorch.callbacks.ModelCheckpoint",
        init_args=Namespace(dirpath=None, save_last=True, enable_version_counter=True),
    )
    trainer = Namespace(logger=logger, callbacks=[ckpt], default_root_dir=str(root))
    return Namespace(trainer=trainer, ckpt_path=ckpt_path)


def save_last(run_dir: Path, step: int, name: str = "last.ckpt") -> Path:
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step}, run_dir / "checkpoints" / name)
    return run_dir / "checkpoints" / name


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_each_new_fit_creates_and_locks_its_own_version_folder(tmp_path: Path):
    a, b = fit_ns(tmp_path), fit_ns(tmp_path)
    first, second = claim_fit_run(a), claim_fit_run(b)
    assert (first.run_dir.name, second.run_dir.name) == ("version_0", "version_1")
    assert (a.trainer.logger.init_args.version, b.trainer.logger.init_args.version) == (0, 1)
    assert a.trainer.callbacks[0].init_args.enable_version_counter is False
    lock = json.loads(lock_path(first.run_dir).read_text())
    assert lock["pid"] == os.getpid() and lock["host"] == socket.gethostname()
    assert not any(first.run_dir.iterdir())  # the lock lies beside the folder, not in it
    first.close(failed=False, trained=True)
    second.close(failed=False, trained=True)
    assert not lock_path(first.run_dir).exists() and not lock_path(second.run_dir).exists()


def test_last_resumes_the_newest_run_with_a_last_ckpt_in_that_runs_folder(tmp_path: Path):
    root = tmp_path / "tiny"
    save_last(root / "version_0", 4)
    save_last(root / "version_1", 9, name="last-v1.ckpt")  # never taken for `last`
    (root / "version_2").mkdir()  # a later run without a checkpoint
    partial = root / "version_0" / "checkpoints" / ".last.ckpt.x1.tmp"
    partial.write_bytes(b"partial")
    cfg = fit_ns(tmp_path, "last")
    claim = claim_fit_run(cfg)
    assert claim.run_dir == root / "version_0" and not claim.created
    assert cfg.ckpt_path == str(root / "version_0" / "checkpoints" / "last.ckpt")
    assert cfg.trainer.logger.init_args.version == 0
    assert not partial.exists()  # a killed writer's leftover, removed once the run is locked
    assert json.loads(os.environ[RUN_ENV]) == {"version": 0, "ckpt_path": cfg.ckpt_path}
    # a second fit into the same run, while the first holds it, is refused with its pid
    with pytest.raises(RunLockedError, match=rf"version_0 is in use .*pid {os.getpid()}"):
        claim_fit_run(fit_ns(tmp_path, "last"))
    claim.close(failed=True, trained=False)  # a resumed run's folder is never removed
    assert (root / "version_0" / "checkpoints" / "last.ckpt").is_file()
    assert RUN_ENV not in os.environ


def test_an_explicit_checkpoint_of_a_run_continues_in_that_run(tmp_path: Path):
    ckpt = save_last(tmp_path / "tiny" / "version_1", 3)
    save_last(tmp_path / "tiny" / "version_2", 5)
    cfg = fit_ns(tmp_path, str(ckpt))
    claim = claim_fit_run(cfg)
    assert cfg.trainer.logger.init_args.version == 1 and cfg.ckpt_path == str(ckpt)
    claim.close(failed=False, trained=True)


def test_last_without_any_checkpoint_starts_a_new_run(tmp_path: Path):
    cfg = fit_ns(tmp_path, "last")
    with pytest.warns(UserWarning, match="no run under .* has a checkpoints/last.ckpt"):
        claim = claim_fit_run(cfg)
    assert claim.created and cfg.ckpt_path is None and claim.run_dir.name == "version_0"
    claim.close(failed=False, trained=False)


def test_a_new_fit_into_a_fixed_version_with_checkpoints_is_refused(tmp_path: Path):
    save_last(tmp_path / "tiny" / "mine", 2)
    with pytest.raises(RunFolderError, match="mine/checkpoints/last.ckpt from an earlier fit"):
        claim_fit_run(fit_ns(tmp_path, None, version="mine"))
    cfg = fit_ns(tmp_path, "last", version="mine")
    claim = claim_fit_run(cfg)
    assert cfg.ckpt_path.endswith("mine/checkpoints/last.ckpt")
    claim.close(failed=False, trained=True)


def test_a_failed_fit_removes_the_folder_it_made_unless_it_trained(tmp_path: Path):
    empty, trained, saved = (claim_fit_run(fit_ns(tmp_path)) for _ in range(3))
    (empty.run_dir / "config.yaml").write_text("x: 1\n")
    empty.close(failed=True, trained=False)
    trained.close(failed=True, trained=True)
    save_last(saved.run_dir, 1)
    saved.close(failed=True, trained=False)
    assert not empty.run_dir.exists()
    assert trained.run_dir.is_dir() and saved.run_dir.is_dir()


def test_other_ranks_take_rank_zeros_run_and_lock_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):  # fmt: skip
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv(RUN_ENV, json.dumps({"version": 7, "ckpt_path": "x.ckpt"}))
    cfg = fit_ns(tmp_path, "last")
    assert claim_fit_run(cfg) is None
    assert (cfg.trainer.logger.init_args.version, cfg.ckpt_path) == (7, "x.ckpt")
    assert not (tmp_path / "tiny").exists()


def test_stale_locks_are_taken_over_and_foreign_hosts_refused(tmp_path: Path):
    run = tmp_path / "version_0"
    lock = lock_path(run)
    lock.write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))
    with pytest.warns(UserWarning, match="taking over the stale lock"):
        held = RunLock(run).acquire()
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    held.release()
    # this pid, but a process started at another time: the pid was reused, the lock is stale
    lock.write_text(
        json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "proc_start": "1"})
    )
    with pytest.warns(UserWarning, match="stale"):
        RunLock(run).acquire().release()
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "then"}))
    with pytest.raises(RunLockedError, match=f"pid 1 on host elsewhere.*delete {lock}"):
        RunLock(run).acquire()
    assert json.loads(lock.read_text())["host"] == "elsewhere"  # untouched


def test_a_requeued_slurm_job_takes_over_its_earlier_runs_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):  # fmt: skip
    run, lock = tmp_path / "version_0", lock_path(tmp_path / "version_0")
    earlier = {"pid": 1, "host": "node-a", "slurm_job": "77", "slurm_restart": 0}
    lock.write_text(json.dumps(earlier))
    monkeypatch.setenv("SLURM_JOB_ID", "78")  # another job: refused
    with pytest.raises(RunLockedError, match="on host node-a"):
        RunLock(run).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with pytest.warns(UserWarning, match="stale"):
        RunLock(run).acquire().release()


def test_the_csv_logger_continues_a_resumed_runs_metrics(tmp_path: Path):
    run = tmp_path / "version_0"
    run.mkdir()
    with (run / "metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "train/loss"])
        w.writeheader()
        w.writerows({"step": s, "train/loss": s / 10} for s in range(5))
    logger = CSVLogger(str(tmp_path), name="", version=0)
    for step in (3, 4):  # resumed at step 3: the rows of steps 3 and 4 are logged again
        logger.log_metrics({"train/loss": 1.0 + step, "val/loss": 2.0}, step=step)
    logger.finalize("success")
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [(r["step"], r["train/loss"], r["val/loss"]) for r in rows] == [
        ("0", "0.0", ""), ("1", "0.1", ""), ("2", "0.2", ""), ("3", "4.0", "2.0"),
        ("4", "5.0", "2.0"),
    ]  # fmt: skip


def test_a_fit_failing_at_setup_leaves_no_folder_and_keeps_the_last_pointer(
    tmp_path: Path, shards: Path, capsys: pytest.CaptureFixture
):  # fmt: skip
    runs = tmp_path / "runs"
    save_last(runs / "tiny" / "version_0", 3)
    (runs / "tiny" / "last").symlink_to("version_0")
    cfg = tiny_fit_config(shards, runs)
    cfg["trainer"]["logger"] = {
        "class_path": "mmpt.loggers.CSVLogger",
        "init_args": {"name": "tiny"},
    }
    cfg["trainer"]["callbacks"][0]["init_args"].pop("dirpath")
    cfg["data"]["init_args"]["train"]["urls"] = str(tmp_path / "missing")
    assert main(["fit", "-c", str(write_yaml(tmp_path / "c.yaml", cfg))]) == 2
    assert "shard(s) not found" in capsys.readouterr().err  # raised in the datamodule's setup
    assert sorted(p.name for p in (runs / "tiny").iterdir()) == ["last", "version_0"]
    assert os.readlink(runs / "tiny" / "last") == "version_0"


def test_checkpoints_outside_the_run_folder_keep_lightnings_last(tmp_path: Path):
    """With its own ``dirpath``, ``last`` is Lightning's (in that folder); only the lock applies."""
    cfg, other = fit_ns(tmp_path, "last", version=""), fit_ns(tmp_path, None, version="")
    for c in (cfg, other):
        c.trainer.callbacks[0].init_args.dirpath = str(tmp_path / "elsewhere")
    save_last(tmp_path / "tiny", 3)  # a fresh fit is not refused: this folder is not its own
    claim = claim_fit_run(cfg)
    assert cfg.ckpt_path == "last" and claim.run_dir == tmp_path / "tiny"
    assert cfg.trainer.callbacks[0].init_args.enable_version_counter is True
    with pytest.raises(RunLockedError):
        claim_fit_run(other)
    claim.close(failed=False, trained=True)

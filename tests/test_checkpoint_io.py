"""Atomic checkpoints: a kill mid-write keeps the previous ``last.ckpt`` and training resumes
from it; keep-last-N and time-based saving with ModelCheckpoint; the ``mmpt`` CLI default."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

import mmpt.checkpoint_io
from mmpt.checkpoint_io import AtomicCheckpointIO
from mmpt.cli import build_cli, main
from tests.test_cli import tiny_fit_config, write_yaml

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.filterwarnings(
    "ignore:LightningCLI's args parameter",
    "ignore:.*does not have many workers",
    "ignore:.*`IterableDataset` has `__len__` defined",
)

# A checkpoint whose pickling blocks: the marker file says the save has begun (the destination
# is open), then it sleeps until the test SIGKILLs the process.
BLOCKER = """
import sys, time
from pathlib import Path

class Block:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        Path(self.marker).touch()
        time.sleep(120)
        return (dict, ())
"""

SAVE_SCRIPT = (
    BLOCKER
    + """
import torch
mode, path, marker = sys.argv[1:]
if mode == "atomic":
    from mmpt.checkpoint_io import AtomicCheckpointIO
    save = AtomicCheckpointIO().save_checkpoint
else:
    save = torch.save
save({"step": 1, "w": torch.arange(1000.0)}, path)
save({"step": 2, "w": torch.zeros(1000), "block": Block(marker)}, path)
"""
)

FIT_SCRIPT = (
    BLOCKER
    + """
import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from mmpt.checkpoint_io import AtomicCheckpointIO

class BlockAtStep4(Callback):
    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if trainer.global_step == 4:
            checkpoint["block"] = Block(sys.argv[2])

L.seed_everything(0)
ckpt = ModelCheckpoint(dirpath=sys.argv[1], save_last=True, save_top_k=0, every_n_train_steps=2)
trainer = L.Trainer(
    max_steps=8, callbacks=[ckpt, BlockAtStep4()], plugins=[AtomicCheckpointIO()],
    **{"accelerator": "cpu", "logger": False, "enable_progress_bar": False,
       "enable_model_summary": False},
)
trainer.fit(BoringModel())
"""
)


def run_until_marker_then_kill(argv: list[str], marker: Path, cwd: Path) -> None:
    """Run ``python -c ...`` and SIGKILL it once ``marker`` appears (the save is under way)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-c", *argv], cwd=cwd, env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 180  # a loaded machine imports lightning slowly
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"the child exited ({proc.returncode}) before blocking:\n{proc.stderr}")
            if time.monotonic() > deadline:
                pytest.fail("the child never reached the blocking save")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def fit_kwargs() -> dict[str, Any]:
    return {
        "accelerator": "cpu",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }


class FirstStep(Callback):
    """Records the global step at which (re)started training begins."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.step = trainer.global_step


# --- (a) a kill during the write --------------------------------------------------------


@pytest.mark.parametrize("mode", ["atomic", "plain-torch-save"])
def test_kill_during_save_keeps_the_previous_checkpoint(mode: str, tmp_path: Path) -> None:
    last, marker = tmp_path / "last.ckpt", tmp_path / "saving"
    run_until_marker_then_kill([SAVE_SCRIPT, mode, str(last), str(marker)], marker, tmp_path)
    if mode == "atomic":
        ckpt = torch.load(last, weights_only=True)
        assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.arange(1000.0))
        # What the kill may leave: the hidden temp file of the interrupted save, nothing else.
        others = {p.name for p in tmp_path.iterdir()} - {"last.ckpt", "saving"}
        assert all(n.startswith(".last.ckpt.") and n.endswith(".tmp") for n in others), others
    else:  # the contrast: torch.save straight to the final name leaves it corrupt
        with pytest.raises(Exception):  # noqa: B017 - torch raises RuntimeError or EOFError
            torch.load(last, weights_only=True)


def test_fit_killed_while_writing_last_ckpt_resumes_from_the_previous_one(
    tmp_path: Path,
) -> None:
    ckpts, marker = tmp_path / "checkpoints", tmp_path / "saving"
    run_until_marker_then_kill([FIT_SCRIPT, str(ckpts), str(marker)], marker, tmp_path)
    # Killed while writing last.ckpt at step 4: the step-2 one is intact.
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 2

    first = FirstStep()
    ckpt = ModelCheckpoint(dirpath=ckpts, save_last=True, save_top_k=0, every_n_train_steps=2)
    trainer = L.Trainer(
        max_steps=6, callbacks=[ckpt, first], plugins=[AtomicCheckpointIO()], **fit_kwargs()
    )
    trainer.fit(BoringModel(), ckpt_path="last")
    assert first.step == 2 and trainer.global_step == 6
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 6


# --- (b) save and resume through the plugin ----------------------------------------------


def test_fit_saves_through_the_plugin_and_resumes(tmp_path: Path) -> None:
    def trainer(max_steps: int, first: FirstStep) -> L.Trainer:
        ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_epochs=1)
        return L.Trainer(
            max_steps=max_steps,
            limit_train_batches=3,
            callbacks=[ckpt, first],
            plugins=[AtomicCheckpointIO()],
            **fit_kwargs(),
        )

    t1 = trainer(6, FirstStep())
    assert isinstance(t1.strategy.checkpoint_io, AtomicCheckpointIO)
    t1.fit(BoringModel())
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 6

    first = FirstStep()
    t2 = trainer(9, first)
    t2.fit(BoringModel(), ckpt_path=tmp_path / "last.ckpt")
    assert first.step == 6 and t2.global_step == 9
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temp files left


def test_remote_urls_use_lightnings_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(
        TorchCheckpointIO, "save_checkpoint", lambda s, c, p, o=None: calls.append(p)
    )
    io = AtomicCheckpointIO()
    io.save_checkpoint({"a": 1}, "memory://bucket/last.ckpt")
    assert calls == ["memory://bucket/last.ckpt"]
    io.save_checkpoint({"a": 2}, f"file://{tmp_path}/x.ckpt")  # a local URL: atomic
    assert calls == ["memory://bucket/last.ckpt"]
    assert torch.load(tmp_path / "x.ckpt")["a"] == 2
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint({}, tmp_path / "y.ckpt", storage_options={"x": 1})


# --- (c) keep-last-N and time-based saving, as documented --------------------------------


def documented_callbacks() -> list[dict[str, Any]]:
    """The ModelCheckpoint YAML of mmpt/checkpoint_io.py's docstring, parsed."""
    doc = mmpt.checkpoint_io.__doc__ or ""
    snippet = doc.split("::\n\n", 1)[1].split("\n\n", 1)[0]
    return yaml.safe_load(textwrap.dedent(snippet))["trainer"]["callbacks"]


def test_keep_last_n_keeps_the_n_newest_step_checkpoints(tmp_path: Path) -> None:
    keep = documented_callbacks()[0]["init_args"]
    assert (keep["monitor"], keep["mode"], keep["save_top_k"]) == ("step", "max", 3)
    ckpt = ModelCheckpoint(**{**keep, "dirpath": tmp_path, "every_n_train_steps": 2})
    trainer = L.Trainer(
        max_steps=12, callbacks=[ckpt], plugins=[AtomicCheckpointIO()], **fit_kwargs()
    )
    trainer.fit(BoringModel())
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["last.ckpt", "step10.ckpt", "step12.ckpt", "step8.ckpt"]
    assert torch.load(tmp_path / "step8.ckpt", weights_only=False)["global_step"] == 8


# --- (d) the CLI ---------------------------------------------------------------------------


def test_cli_defaults_to_atomic_checkpoints_and_accepts_the_documented_yaml(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = tiny_fit_config(shards, tmp_path / "runs")
    cfg["trainer"]["callbacks"] = documented_callbacks()
    path = write_yaml(tmp_path / "c.yaml", cfg)

    cli = build_cli(["-c", str(path), "--trainer.logger=false"], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    keep, timed = cli.trainer.checkpoint_callbacks
    assert isinstance(keep, ModelCheckpoint) and isinstance(timed, ModelCheckpoint)
    assert (keep.monitor, keep.mode, keep.save_top_k, keep._every_n_train_steps) == (
        "step",
        "max",
        3,
        1000,
    )
    assert timed._train_time_interval == timedelta(minutes=30)

    # --print_config shows the plugin, and its output is itself a valid config.
    with pytest.raises(SystemExit) as exc:
        main(["fit", "-c", str(path), "--print_config"])
    assert exc.value.code == 0
    printed = capsys.readouterr().out
    plugins = yaml.safe_load(printed)["trainer"]["plugins"]
    assert plugins == {"class_path": "mmpt.checkpoint_io.AtomicCheckpointIO"}
    again = tmp_path / "printed.yaml"
    again.write_text(printed)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "-c", str(again), "--print_config"])
    assert exc.value.code == 0
    assert yaml.safe_load(capsys.readouterr().out) == yaml.safe_load(printed)

    # A user's --trainer.plugins replaces the default.
    argv = ["-c", str(path), "--trainer.logger=false"]
    argv += ["--trainer.plugins", "lightning.fabric.plugins.TorchCheckpointIO"]
    cli = build_cli(argv, run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is TorchCheckpointIO

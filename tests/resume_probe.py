"""Callbacks for the kill-and-resume fit tests: record each rank's batch keys and losses, die
mid-epoch, in validation or half-way through a checkpoint write, or pause a fit."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from mmpt.checkpoint_io import AtomicCheckpointIO
from tests.kill_probe import half_save_then_kill


class KeyRecorder(L.Callback):
    """Append ``{"epoch", "step", "keys"}`` of every training batch to ``<out>/keys_rank<r>.jsonl``
    and ``{"step", "loss"}`` to ``<out>/losses_rank<r>.jsonl``.

    ``step`` is the optimizer steps done before the batch; ``loss`` is the rank's training loss
    of that batch (JSON keeps every bit of a float). Each line is flushed and synced at once,
    so a SIGKILL loses nothing recorded.
    """

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        line = {"epoch": trainer.current_epoch, "step": trainer.global_step, "keys": batch.keys}
        self._write(f"keys_rank{trainer.global_rank}.jsonl", line)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        line = {"step": trainer.global_step - 1, "loss": float(loss)}
        self._write(f"losses_rank{trainer.global_rank}.jsonl", line)

    def _write(self, name: str, line: dict[str, Any]) -> None:
        with (self.out / name).open("a") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())


class KillAt(L.Callback):
    """SIGKILL every rank right after optimizer step ``step`` (before any checkpoint of it).

    Lightning runs ModelCheckpoint after the other callbacks, so the newest checkpoint is an
    older step: the kill lands mid-epoch, between checkpoints.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class RaiseAt(L.Callback):
    """Raise in ``on_train_batch_start`` of the batch after optimizer step ``step``.

    The batch has reached the device (its stream position is recorded) but its step never
    runs: a checkpoint saved on the exception must hand that batch out again.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"planned failure before step {self.step + 1}")


class KillInValidation(L.Callback):
    """SIGKILL the process in the first validation batch after optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if not trainer.sanity_checking and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class KillingCheckpointIO(AtomicCheckpointIO):
    """mmpt's atomic checkpoint IO, killed half-way through writing the step ``step`` file."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if checkpoint.get("global_step") == self.step:
            torch.save = half_save_then_kill  # the process dies in this call
        super().save_checkpoint(checkpoint, path, storage_options)


class PauseAt(L.Callback):
    """After optimizer step ``step``: create ``<dir>/paused``, then wait for ``<dir>/go``."""

    def __init__(self, step: int, dir: str) -> None:
        self.step, self.dir = step, Path(dir)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        if trainer.global_step != self.step:
            return
        (self.dir / "paused").touch()
        deadline = time.monotonic() + 300
        while not (self.dir / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.2)

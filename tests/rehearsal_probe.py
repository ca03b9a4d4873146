"""A callback for the multi-node rehearsal: logs each rank's batch keys, can kill its process.

Loaded by class path (``tests.rehearsal_probe.KeysLog``) in fits that torchrun launches; it
imports only Lightning and the standard library.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import lightning as L


class KeysLog(L.Callback):
    """Appends ``{"step", "keys", "loss"}`` per training batch to ``<out>/<tag>-rank<R>.jsonl``.

    Args:
        out: Folder of the logs.
        tag: Attempt name (a resumed fit logs under another tag).
        kill_rank: Global rank that SIGKILLs itself ...
        kill_at: ... once this many optimizer steps are done (before any checkpoint of it).
    """

    def __init__(self, out: str, tag: str, kill_rank: int = -1, kill_at: int = -1) -> None:
        self.out, self.tag, self.kill_rank, self.kill_at = Path(out), tag, kill_rank, kill_at

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        """Log the batch; die here when told to (the checkpoint of this step is not written)."""
        self.out.mkdir(parents=True, exist_ok=True)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        row = {"step": trainer.global_step, "keys": list(batch.keys), "loss": float(loss)}
        with open(self.out / f"{self.tag}-rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if trainer.global_rank == self.kill_rank and trainer.global_step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

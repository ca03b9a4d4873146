"""Die half-way through a checkpoint write (a light module: a subprocess imports only torch)."""

from __future__ import annotations

import io
import os
import signal
from typing import Any

import torch

_TORCH_SAVE = torch.save


def half_save_then_kill(obj: object, f: Any) -> None:
    """``torch.save`` into memory, write half of it to ``f`` (synced), then SIGKILL."""
    buf = io.BytesIO()
    _TORCH_SAVE(obj, buf)
    data = buf.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)

"""Atomic checkpoint writing for Lightning, the default of every ``mmpt fit|validate|...``.

:class:`AtomicCheckpointIO` writes each checkpoint to a temporary file in the destination
folder, fsyncs it and renames it over the final name (:func:`mmpt.io.atomic_torch_save`). A
process killed mid-write (preemption, OOM killer, ``kill -9``) therefore leaves the previous
``last.ckpt`` intact, so ``--ckpt_path last`` always resumes from a whole checkpoint. What such a
kill can leave behind is a hidden ``.last.ckpt.<random>.tmp`` next to it: harmless, never read by
Lightning or ``--ckpt_path last``, and removed when ``mmpt fit --ckpt_path last`` resumes that run
(:mod:`mmpt.runs`; safe to delete by hand).

Lightning's own :class:`~lightning.fabric.plugins.io.torch_io.TorchCheckpointIO` serializes into
memory first (so the whole checkpoint is held twice in RAM), then, for local paths, writes a
temporary file in the system temp folder and moves it over the final name: across file systems
that move is a copy into the final name, and nothing is fsynced. Writing in the destination
folder makes the rename atomic and avoids the in-memory copy.

Keep-last-N and time-based saving are :class:`~lightning.pytorch.callbacks.ModelCheckpoint`
options (this plugin only changes *how* each file is written). Keep the N newest step
checkpoints by ranking them on the global step, and save every 30 minutes of training with
``train_time_interval`` (a ``"h:m:s"`` or ``"d days, h:m:s"`` string; quote it: unquoted,
``1:30:00`` is a YAML 1.1 base-60 integer that the config rejects)::

    trainer:
      callbacks:
        - class_path: lightning.pytorch.callbacks.ModelCheckpoint
          init_args:
            dirpath: runs/x/checkpoints
            filename: "step{step}"
            auto_insert_metric_name: false
            monitor: step          # rank checkpoints by global step ...
            mode: max              # ... newest first
            save_top_k: 3          # keep the last 3
            every_n_train_steps: 1000
            save_last: true
        - class_path: lightning.pytorch.callbacks.ModelCheckpoint
          init_args:
            dirpath: runs/x/checkpoints/timed
            train_time_interval: "00:30:00"   # also every 30 minutes of training
            save_top_k: 1                     # only the newest timed one

``every_n_train_steps`` and ``train_time_interval`` are mutually exclusive within one callback;
use two callbacks (with different ``dirpath``) for both.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _PATH

from mmpt.io import atomic_torch_save
from mmpt.safe_load import allowed_globals, load_torch_file


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`TorchCheckpointIO` whose local saves are atomic and loads never run code.

    Readers of a checkpoint path, including a resume after a crash, see either the previous file
    or the complete new one, never a truncated file. Local loads (``--ckpt_path`` resumes) go
    through :func:`mmpt.safe_load.load_torch_file`: ``weights_only`` with mmpt's allow-list
    (Lightning's own load would use torch's default allow-list, without mmpt's plain-data
    types), whatever ``weights_only`` the Trainer passes; remote loads likewise go through
    Lightning's load with ``weights_only=True`` and the same allow-list. Removing is unchanged.

    Remote fsspec URLs (``s3://``, ``gs://``, ...) fall back to Lightning's
    :meth:`TorchCheckpointIO.save_checkpoint` (an fsspec transaction, as atomic as that
    filesystem makes it).

    Use it in a config (it is already the default of the ``mmpt`` training commands)::

        trainer:
          plugins:
            class_path: mmpt.checkpoint_io.AtomicCheckpointIO
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        """Save ``checkpoint`` to ``path`` atomically.

        Args:
            checkpoint: Model and trainer state.
            path: Destination file; a local path or ``file://`` URL is written atomically, any
                other fsspec URL through the parent implementation.
            storage_options: Not supported (as in :class:`TorchCheckpointIO`).

        Raises:
            TypeError: If ``storage_options`` is given.
        """
        if storage_options is not None:
            raise TypeError(
                f"`Trainer.save_checkpoint(..., storage_options=...)` is not supported by "
                f"`{type(self).__name__}`."
            )
        if not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path)
            return
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))

    def load_checkpoint(
        self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Load a checkpoint without running code from it (remote URLs: Lightning's load).

        Args:
            path: Checkpoint file (local path or ``file://`` URL), or another fsspec URL.
            map_location: Ignored for local files (loaded on the CPU; Lightning moves them).
            weights_only: Ignored: always the allow-list (a pickle that needs more is refused;
                convert a trusted legacy file to a state dict in your own code).

        Raises:
            FileNotFoundError: No such local file.
            mmpt.safe_load.UnsafeCheckpointError: The file needs more than plain data.
        """
        if not _is_local_file_protocol(path):
            with torch.serialization.safe_globals(list(allowed_globals())):
                return super().load_checkpoint(path, map_location, weights_only=True)
        local = str(path).removeprefix("file://")
        if not os.path.isfile(local):
            raise FileNotFoundError(f"Checkpoint file not found: {local}")
        return load_torch_file(local, mmap=False)

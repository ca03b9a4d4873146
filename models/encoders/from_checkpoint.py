"""Rebuild the image tower recorded in an mmpt checkpoint, without the training config."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmpt.models.module import TOWER_KEY
from mmpt.safe_load import load_torch_file


def read_tower_record(ckpt: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The image-tower record (``TOWER_KEY``) and the state dict of an mmpt checkpoint.

    Tensors are memory-mapped: only those of the tower are read when loaded.

    Args:
        ckpt: The checkpoint.

    Raises:
        FileNotFoundError: No such file.
        ValueError: Not an mmpt checkpoint with a recorded image tower, or a pickle that needs
            more than plain data.
    """
    if not Path(ckpt).is_file():
        raise FileNotFoundError(f"--ckpt: no checkpoint at {ckpt!r}")
    obj = load_torch_file(ckpt)
    if not isinstance(obj, dict) or TOWER_KEY not in obj:
        raise ValueError(
            f"{ckpt} records no image tower ({TOWER_KEY!r}): it was not written by an mmpt "
            "model with a describable image tower (TimmVisionTower, OpenCLIPVisionTower, "
            "HFVisionTower, VideoViTTower)"
        )
    return obj[TOWER_KEY], obj.get("state_dict", {})


def build_tower(description: dict[str, Any]) -> nn.Module:
    """Instantiate a tower from its ``describe()`` output (``class_path`` + ``init_args``)."""
    module, _, name = description["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls(**description["init_args"])


def tower_from_checkpoint(ckpt: str, load_weights: bool = True) -> nn.Module:
    """The checkpoint's image tower with its trained weights, in eval mode.

    Args:
        ckpt: An mmpt Lightning checkpoint (MAE, contrastive, VLM ...).
        load_weights: False keeps the tower at its random initialisation (the same
            architecture and preprocessing): the baseline a probe compares against.

    Raises:
        FileNotFoundError: No such file.
        ValueError: No recorded tower, or weights of the tower missing from the checkpoint.
    """
    record, state = read_tower_record(ckpt)
    tower = build_tower(record["tower"])
    if load_weights:
        prefix = f"{record['attr']}."
        own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        result = tower.load_state_dict(own, strict=False)
        if result.missing_keys:
            raise ValueError(
                f"{ckpt}: {len(result.missing_keys)} weights of the recorded tower are missing "
                f"(first: {result.missing_keys[:3]})"
            )
    return tower.eval()

"""Offline open_clip configs and weights: model config, mean/std, checkpoint file, state dict."""

from __future__ import annotations

import os
from typing import Any

import open_clip
import torch

from .timm_weights import resolve_checkpoint_file


def open_clip_model_cfg(model_name: str) -> dict[str, Any]:
    """Return a copy of an open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``).

    Args:
        model_name: A built-in open_clip name (``ViT-B-16``) or ``local-dir:/folder`` holding
            an ``open_clip_config.json``.

    Raises:
        ValueError: For ``hf-hub:`` names (they download) and unknown names.
        FileNotFoundError: When a ``local-dir:`` folder has no ``open_clip_config.json``.

    """
    if model_name.startswith("hf-hub:"):
        raise ValueError(
            f"model_name {model_name!r} needs the network. Download the repo "
            f"(`hf download {model_name[7:]} --local-dir DIR`) and use model_name 'local-dir:DIR' "
            "with pretrained DIR."
        )
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(
            f"Unknown open_clip model_name {model_name!r}; choose one of open_clip.list_models() "
            f"(e.g. {', '.join(open_clip.list_models()[:5])}, ...) or 'local-dir:/folder'."
        )
    return cfg


def _mean_std(model_name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std every pretrained tag of ``model_name`` agrees on, else OpenAI's CLIP values."""
    name = model_name.removeprefix("local-dir:")
    if name != model_name:
        import json

        with open(os.path.join(name, "open_clip_config.json"), encoding="utf-8") as f:
            pp = json.load(f).get("preprocess_cfg", {})
        return tuple(pp.get("mean", open_clip.OPENAI_DATASET_MEAN)), tuple(
            pp.get("std", open_clip.OPENAI_DATASET_STD)
        )
    pairs = {
        (tuple(c["mean"]), tuple(c["std"]))
        for tag in open_clip.list_pretrained_tags_by_model(model_name)
        if "mean" in (c := open_clip.get_pretrained_cfg(model_name, tag)) and "std" in c
    }
    if len(pairs) == 1:
        return pairs.pop()
    return tuple(open_clip.OPENAI_DATASET_MEAN), tuple(open_clip.OPENAI_DATASET_STD)


def resolve_open_clip_checkpoint(model_name: str, pretrained: str, flag: str) -> str:
    """Resolve ``pretrained`` to a local file, with a clear error for an open_clip tag.

    Args:
        model_name: open_clip model name the weights are for.
        pretrained: Local file or folder, or (an error) an open_clip pretrained tag.
        flag: The command-line flag that sets ``pretrained``, quoted in errors.

    Raises:
        ValueError: ``pretrained`` is an open_clip tag, which cannot be downloaded offline.
        FileNotFoundError: ``pretrained`` is not an existing file or folder.

    """
    if not os.path.exists(pretrained):
        tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
        if tag_cfg:
            where = (
                f"`hf download {tag_cfg['hf_hub'].rstrip('/')} --local-dir DIR`"
                if tag_cfg.get("hf_hub")
                else tag_cfg.get("url", "the open_clip release page")
            )
            raise ValueError(
                f"pretrained={pretrained!r} is an open_clip tag for {model_name}; tags are "
                f"downloaded, and mmpt never downloads. Fetch the weights on a machine with "
                f"internet ({where}) and set {flag} /path/to/open_clip_model.safetensors."
            )
    return resolve_checkpoint_file(pretrained, flag)


def load_open_clip_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Load an open_clip checkpoint (safetensors, torch, ``state_dict`` wrapper, DDP prefix).

    Read through :mod:`mmpt.safe_load` (``weights_only`` with mmpt's allow-list).
    """
    if path.endswith((".npz", ".npy")):
        raise ValueError(f"{path}: big_vision .npz weights are not supported; convert them first.")
    from mmpt.models.init_sources import tensors_of

    return tensors_of(path)[0]

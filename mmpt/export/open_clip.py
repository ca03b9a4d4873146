"""Export a contrastive image-text model as an open_clip model folder (config + weights).

The folder holds ``open_clip_model.safetensors`` (a ``CLIP`` state dict: ``visual.*``, the text
tower at the top level, ``logit_scale`` and, for SigLIP, ``logit_bias``),
``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``, the layout open_clip reads from
the Hugging Face hub and from ``local-dir:``) and ``<name>.json`` (the bare model config, for
``open_clip.add_model_config``). Either load works::

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:OUT")
    tokenizer = open_clip.get_tokenizer("local-dir:OUT")
    # or, by name (pass image_mean/image_std from open_clip_config.json's preprocess_cfg):
    open_clip.add_model_config("OUT")
    open_clip.create_model_and_transforms(NAME, pretrained="OUT/open_clip_model.safetensors")

The tokenizer is open_clip's own BPE with the trained ``context_length`` (``text_cfg``).
Expressible towers: image ``OpenCLIPVisionTower`` (any open_clip config) or
``TimmVisionTower`` of an RGB timm architecture as built by name (open_clip's timm adapter
passes no model arguments, so no ``model_kwargs``, bands or other image size); text
``OpenCLIPTextTower``. Hugging Face text towers are not expressible: open_clip's HF text
projection has no bias, mmpt's ``HFTextTower`` projection has one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
import torch
from open_clip.model import CLIP
from safetensors.torch import save_file
from torch import nn

from mmpt.models.encoders.open_clip_load import open_clip_model_cfg
from mmpt.models.encoders.open_clip_text import OpenCLIPTextTower
from mmpt.models.encoders.open_clip_vision import OpenCLIPVisionTower
from mmpt.models.encoders.timm_vit import TimmVisionTower
from mmpt.preprocess import ImagePreprocess

WEIGHTS_FILE = "open_clip_model.safetensors"
CONFIG_FILE = "open_clip_config.json"
SUPPORTED = (
    "image tower OpenCLIPVisionTower or TimmVisionTower (an RGB timm architecture at its own "
    "size, no model_kwargs), text tower OpenCLIPTextTower"
)
#: timm arguments that only regularise training; open_clip expresses drop_path itself.
_TRAINING_ONLY = {"drop_path_rate", "drop_rate", "proj_drop_rate", "attn_drop_rate"}


def _unsupported(what: str) -> ValueError:
    return ValueError(f"open_clip cannot express {what}; it supports {SUPPORTED}")


def _quick_gelu(model_name: str) -> bool:
    return bool(open_clip_model_cfg(model_name).get("quick_gelu", False))


def _timm_pool(model: nn.Module) -> str:
    pool = getattr(model, "global_pool", "avg")
    return pool if isinstance(pool, str) else str(getattr(pool, "pool_type", "avg"))


def _timm_vision(tower: TimmVisionTower) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """open_clip ``vision_cfg`` of a timm tower (``TimmModel`` adapter) and its state dict."""
    args = tower.describe()["init_args"]
    extra = sorted(set(args["model_kwargs"]) - _TRAINING_ONLY)
    if tower.image_preprocess.bands is not None or extra:
        what = f"bands {args['bands']}" if args["bands"] else f"model_kwargs {extra}"
        raise _unsupported(f"a timm image tower with {what} (its timm adapter passes no arguments)")
    pool = _timm_pool(tower.model)
    with torch.device("meta"):
        plain = timm.create_model(
            args["model_name"], pretrained=False, num_classes=args["embed_dim"], global_pool=pool
        )
    own = tower.model.state_dict()
    theirs = {k: v.shape for k, v in plain.state_dict().items()}
    if {k: v.shape for k, v in own.items()} != theirs:
        raise _unsupported(
            f"{args['model_name']} at image_size {args['image_size']} (timm builds it at "
            f"{plain.pretrained_cfg.get('input_size')}, and open_clip passes no img_size)"
        )
    cfg = {
        "timm_model_name": args["model_name"],
        "timm_model_pretrained": False,
        "timm_pool": pool,
        "timm_proj": "" if args["embed_dim"] else "none",  # the timm head is the projection
        "image_size": args["image_size"],
    }
    if "drop_path_rate" in args["model_kwargs"]:
        cfg["timm_drop_path"] = args["model_kwargs"]["drop_path_rate"]
    return cfg, {f"visual.trunk.{k}": v for k, v in own.items()}


def _vision(tower: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor], bool | None]:
    """``vision_cfg``, ``visual.*`` state and quick_gelu (None: not used) of an image tower."""
    if isinstance(tower, OpenCLIPVisionTower):
        args = tower.describe()["init_args"]
        state = {f"visual.{k}": v for k, v in tower.visual.state_dict().items()}
        uses_gelu = "timm_model_name" not in args["vision_cfg"]
        quick = _quick_gelu(args["model_name"]) if uses_gelu else None
        return args["vision_cfg"], state, quick
    if isinstance(tower, TimmVisionTower):
        return (*_timm_vision(tower), None)
    raise _unsupported(f"an image tower {type(tower).__name__}")


def _preprocess_cfg(pre: ImagePreprocess) -> dict[str, Any]:
    """open_clip ``preprocess_cfg`` equal to mmpt's evaluation transform."""
    return {
        "size": pre.size,
        "mode": "RGB",
        "mean": list(pre.mean),
        "std": list(pre.std),
        "interpolation": "bicubic",  # mmpt: centre square, bicubic resize
        "resize_mode": "shortest",
    }


def open_clip_export(model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The open_clip config (``model_cfg`` + ``preprocess_cfg``) and state dict of a model.

    Args:
        model: A ``ContrastiveModule`` with an image tower (``vision``) and a text tower.

    Returns:
        ``{"model_cfg": ..., "preprocess_cfg": ...}`` and the ``CLIP`` state dict.

    Raises:
        ValueError: A tower combination open_clip cannot express (the message lists what it
            can), or an audio-text model.
    """
    vision, text = getattr(model, "vision", None), getattr(model, "text", None)
    if vision is None or text is None:
        raise _unsupported(f"{type(model).__name__} without an image and a text tower")
    if not isinstance(text, OpenCLIPTextTower):
        raise _unsupported(f"a text tower {type(text).__name__}")
    vision_cfg, state, vision_quick = _vision(vision)
    text_args = text.describe()["init_args"]
    quick = _quick_gelu(text_args["model_name"])
    if vision_quick is not None and vision_quick != quick:
        raise _unsupported(
            "towers with different activations (quick_gelu differs between the vision and "
            "text model_name configs; open_clip has one quick_gelu flag)"
        )
    state.update(text.text.state_dict())
    state["logit_scale"] = model.loss.logit_scale.detach().reshape(())
    model_cfg: dict[str, Any] = {
        "embed_dim": int(text.output_dim),
        "quick_gelu": quick,
        "vision_cfg": vision_cfg,
        "text_cfg": text_args["text_cfg"],
    }
    if hasattr(model.loss, "logit_bias"):  # SigLIP
        state["logit_bias"] = model.loss.logit_bias.detach().reshape(())
        model_cfg["init_logit_bias"] = float(state["logit_bias"])
    _check_layout(model_cfg, state)
    cfg = {"model_cfg": model_cfg, "preprocess_cfg": _preprocess_cfg(vision.image_preprocess)}
    return cfg, {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _check_layout(model_cfg: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Check the state dict against open_clip's ``CLIP`` built (on meta) from the config."""
    with torch.device("meta"):
        clip = CLIP(**model_cfg)
    want = {k: tuple(v.shape) for k, v in clip.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    if want != have:
        bad = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
        raise RuntimeError(f"open_clip layout mismatch (an mmpt bug, please report): {bad[:8]}")


def export_open_clip(model: nn.Module, out: str | Path, name: str | None = None) -> Path:
    """Write ``model`` as an open_clip model folder (see the module docstring for loading).

    Args:
        model: A ``ContrastiveModule`` (image-text).
        out: Output folder (created).
        name: Model config name for ``open_clip.add_model_config``; default the folder name.

    Returns:
        The folder.

    Raises:
        ValueError: A tower combination open_clip cannot express.
    """
    cfg, state = open_clip_export(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    (out / f"{name or out.resolve().name}.json").write_text(
        json.dumps(cfg["model_cfg"], indent=2) + "\n"
    )
    return out

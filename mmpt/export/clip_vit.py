"""OpenAI-CLIP-shaped open_clip ViT image towers: the check, their sizes, their timm-named weights.

Shared by the exports that rewrite such a tower for another library (``hf_clip``, ``timm``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from open_clip.model import CLIPVisionCfg
from open_clip.transformer import VisionTransformer

from mmpt.models.encoders.open_clip_load import open_clip_model_cfg
from mmpt.models.encoders.open_clip_vision import OpenCLIPVisionTower, open_clip_vit_table
from mmpt.models.encoders.vit_convert import table_entries, timm_view

#: vision_cfg fields that only size the tower or do not apply to it; any other must be default
VISION_FREE = {
    "layers",
    "width",
    "head_width",
    "mlp_ratio",
    "patch_size",
    "image_size",
    "patch_dropout",
    "output_tokens",
} | {f.name for f in dataclasses.fields(CLIPVisionCfg) if f.name.startswith("timm_")}


def non_default(cfg: dict[str, Any], defaults: Any, free: set[str]) -> list[str]:
    """Fields of ``cfg`` outside ``free`` whose value differs from the dataclass ``defaults``."""
    base = {f.name: f.default for f in dataclasses.fields(defaults)}
    return sorted(k for k, v in cfg.items() if k not in free and v != base.get(k, v))


def clip_vit_shape(tower: OpenCLIPVisionTower) -> tuple[dict[str, Any], bool]:
    """The full ``vision_cfg`` (defaults filled in) and quick_gelu of a CLIP-shaped open_clip ViT.

    CLIP-shaped: a ``VisionTransformer`` (no timm trunk or ModifiedResNet) with class-token
    pooling, ``ln_pre``, ``ln_post`` before pooling and a bias-free projection, i.e. only the
    sizes of ``vision_cfg`` differ from open_clip's defaults.

    Raises:
        ValueError: Another tower, naming what differs.
    """
    args = tower.describe()["init_args"]
    vcfg = args["vision_cfg"]
    if vcfg.get("timm_model_name") or not isinstance(tower.visual, VisionTransformer):
        raise ValueError(f"a {type(tower.visual).__name__} image tower is not a CLIP ViT")
    odd = non_default(vcfg, CLIPVisionCfg, VISION_FREE)
    if odd:
        raise ValueError(f"open_clip options {odd} of the vision tower have no CLIP ViT equivalent")
    quick = bool(open_clip_model_cfg(args["model_name"]).get("quick_gelu", False))
    return {**dataclasses.asdict(CLIPVisionCfg()), **vcfg}, quick


def clip_vit_timm_state(tower: OpenCLIPVisionTower) -> dict[str, torch.Tensor]:
    """The tower's weights in timm ``VisionTransformer`` names (without the projection)."""
    state = tower.visual.state_dict()
    return timm_view(state, table_entries(state.keys(), open_clip_vit_table()))

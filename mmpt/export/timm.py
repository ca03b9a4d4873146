"""Export an image tower (timm tower, MAE encoder, open_clip timm trunk) as a timm checkpoint.

The folder is what ``timm.models.save_for_hf`` writes: ``model.safetensors`` and a hub-style
``config.json`` (``architecture``, ``model_args`` with ``img_size``/``in_chans``/``patch_size``
..., ``pretrained_cfg`` with ``input_size``, ``mean``, ``std``, ``num_classes``). It loads
with ``timm.create_model("local-dir:OUT", pretrained=True)``, or by name with
``timm.create_model(cfg["architecture"], pretrained=True, pretrained_cfg_overlay=dict(
cfg["pretrained_cfg"], file="OUT/model.safetensors"), **cfg["model_args"])``. The overlay is
needed: without it timm drops a head whose size differs from its ImageNet cfg and adapts the
input conv of a multispectral model as if it had been trained on RGB.

Multispectral towers get a sidecar ``mmpt_bands.json``: band names in channel order, the
scale applied to raw values, and the per-band mean/std (scaled units) of ``(x * scale - mean) /
std``.
"""

from __future__ import annotations

import json
from pathlib import Path

import timm
from open_clip.timm_model import TimmModel
from torch import nn

from mmpt.models.encoders.open_clip_vision import OpenCLIPVisionTower
from mmpt.models.encoders.timm_vit import TimmVisionTower
from mmpt.preprocess import ImagePreprocess

BANDS_FILE = "mmpt_bands.json"
SUPPORTED = "TimmVisionTower (also an MAE's encoder) and OpenCLIPVisionTower with a timm trunk"


def _timm_model(tower: nn.Module) -> nn.Module:
    """The timm model inside ``tower``, checking that it is the whole tower."""
    if isinstance(tower, TimmVisionTower):
        if tower.band_groups is not None:
            raise ValueError(
                "this tower embeds band groups with mmpt's own patch embedding (band_groups, "
                "mmpt.models.encoders.group_embed), for which timm has no architecture; the "
                "mmpt checkpoint keeps it (a TimmVisionTower's init_from loads it)"
            )
        return tower.model
    if isinstance(tower, OpenCLIPVisionTower) and isinstance(tower.visual, TimmModel):
        if len(tower.visual.head):
            raise ValueError(
                "this open_clip tower projects the timm trunk with its own head "
                "(vision_cfg.timm_proj linear/mlp, or attention pooling), which a timm model "
                "does not hold; export the whole model with --format open_clip"
            )
        return tower.visual.trunk
    raise ValueError(f"timm export supports {SUPPORTED}, not {type(tower).__name__}")


def bands_sidecar(pre: ImagePreprocess) -> dict:
    """The ``mmpt_bands.json`` content of a multispectral tower's preprocessing."""
    return {
        "in_chans": pre.channels,
        "bands": list(pre.bands or ()),
        "scale": pre.scale,
        "mean": list(pre.mean),
        "std": list(pre.std),
        "input_size": [pre.channels, pre.size, pre.size],
        "normalisation": "(raw * scale - mean) / std, per band in this order",
    }


def export_timm(tower: nn.Module, out: str | Path) -> Path:
    """Write ``tower`` as a timm checkpoint folder.

    Args:
        tower: A ``TimmVisionTower`` (a contrastive model's ``vision``, an MAE's ``encoder``)
            or an ``OpenCLIPVisionTower`` whose timm trunk carries its projection (open_clip
            ``timm_proj`` empty or ``none``). Its ``forward`` on (B, C, H, W) normalised
            pixels equals the exported model's.
        out: Output folder (created).

    Returns:
        The folder.

    Raises:
        ValueError: A tower timm cannot express (band groups, an open_clip projection head,
            a non-timm tower).
    """
    model = _timm_model(tower)
    pre: ImagePreprocess = tower.image_preprocess
    out = Path(out)
    data_config = {
        "input_size": (pre.channels, pre.size, pre.size),
        "mean": tuple(pre.mean),
        "std": tuple(pre.std),
        "interpolation": "bicubic",  # mmpt's eval transform: centre square, bicubic resize
        "crop_pct": 1.0,
        "crop_mode": "center",
    }
    timm.models.save_for_hf(model, out, safe_serialization=True, data_config=data_config)
    # the architecture's pretrained tag and licence describe timm's weights, not these
    cfg = json.loads((out / "config.json").read_text())
    cfg["pretrained_cfg"].pop("license", None)
    cfg["pretrained_cfg"]["tag"] = "mmpt"
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if pre.bands is not None:
        (out / BANDS_FILE).write_text(json.dumps(bands_sidecar(pre), indent=2) + "\n")
    return out

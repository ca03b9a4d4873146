"""timm export: the checkpoint loads in timm (by local-dir and by name) with equal features."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

from mmpt.bands import S2_L1C
from mmpt.export.timm import BANDS_FILE, export_timm
from mmpt.models.encoders import OpenCLIPVisionTower, TimmVisionTower

# configs/quickstart/ssl4eo_mae_tiny.yaml's encoder (two blocks instead of four)
MAE_TINY = {"patch_size": 4, "embed_dim": 96, "depth": 2, "num_heads": 3}
MEAN = [0.1 + 0.01 * i for i in range(13)]
STD = [0.2 + 0.02 * i for i in range(13)]


def perturbed(tower: torch.nn.Module) -> torch.nn.Module:
    """Move every weight off its init, so a tensor left out of the export shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in tower.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return tower.eval()


def loaded_both_ways(out: Path) -> list[torch.nn.Module]:
    """The export loaded by ``local-dir:`` and by architecture name with its model_args."""
    cfg = json.loads((out / "config.json").read_text())
    overlay = dict(cfg["pretrained_cfg"], file=str(out / "model.safetensors"))
    by_name = timm.create_model(
        cfg["architecture"], pretrained=True, pretrained_cfg_overlay=overlay, **cfg["model_args"]
    )
    return [timm.create_model(f"local-dir:{out}", pretrained=True).eval(), by_name.eval()]


def test_multispectral_mae_encoder_with_band_sidecar(tmp_path: Path) -> None:
    tower = TimmVisionTower(
        "vit_tiny_patch16_224",
        embed_dim=0,
        image_size=32,
        model_kwargs=MAE_TINY,
        bands="s2_l1c",
        scale=1e-4,
        mean=MEAN,
        std=STD,
    )
    out = export_timm(perturbed(tower), tmp_path / "mae")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_args"]["in_chans"] == 13 and cfg["model_args"]["patch_size"] == 4
    assert cfg["pretrained_cfg"]["input_size"] == [13, 32, 32]
    assert cfg["pretrained_cfg"]["mean"] == pytest.approx(MEAN)
    sidecar = json.loads((out / BANDS_FILE).read_text())
    assert sidecar["bands"] == list(S2_L1C) and sidecar["in_chans"] == 13
    assert sidecar["scale"] == 1e-4
    assert sidecar["mean"] == pytest.approx(MEAN) and sidecar["std"] == pytest.approx(STD)
    tiles = torch.randn(2, 13, 32, 32)
    with torch.no_grad():
        want = tower(tiles)
        for model in loaded_both_ways(out):
            torch.testing.assert_close(model(tiles), want, atol=1e-5, rtol=0)
            data = timm.data.resolve_data_config({}, model=model)
            assert data["std"] == pytest.approx(STD) and tuple(data["input_size"]) == (13, 32, 32)


def test_rgb_tower_keeps_its_projection_head(tmp_path: Path) -> None:
    tower = perturbed(TimmVisionTower("test_vit", embed_dim=24, image_size=160))
    out = export_timm(tower, tmp_path / "rgb")
    assert not (out / BANDS_FILE).exists()
    images = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        want = tower(images)
        assert want.shape == (2, 24)
        for model in loaded_both_ways(out):
            torch.testing.assert_close(model(images), want, atol=1e-5, rtol=0)


def test_open_clip_timm_trunk_without_own_head(tmp_path: Path) -> None:
    cfg = {"timm_model_name": "test_vit", "timm_proj": "", "timm_pool": "token", "image_size": 160}
    tower = perturbed(OpenCLIPVisionTower("ViT-B-16", embed_dim=16, vision_cfg=cfg))
    out = export_timm(tower, tmp_path / "trunk")
    images = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        for model in loaded_both_ways(out):
            torch.testing.assert_close(model(images), tower(images), atol=1e-5, rtol=0)


def test_towers_timm_cannot_express_are_refused(tmp_path: Path) -> None:
    grouped = TimmVisionTower(
        "vit_tiny_patch16_224",
        embed_dim=0,
        image_size=32,
        model_kwargs=MAE_TINY,
        bands="s2_l1c",
        band_groups="satmae",
        mean=MEAN,
        std=STD,
    )
    with pytest.raises(ValueError, match="band groups.*timm has no architecture"):
        export_timm(grouped, tmp_path / "g")
    vcfg = {"layers": 2, "width": 32, "head_width": 16, "image_size": 32, "patch_size": 8}
    with pytest.raises(ValueError, match="supports TimmVisionTower"):
        export_timm(OpenCLIPVisionTower("ViT-B-16", embed_dim=16, vision_cfg=vcfg), tmp_path / "o")
    projected = OpenCLIPVisionTower(
        "ViT-B-16", embed_dim=16, vision_cfg={"timm_model_name": "test_vit", "image_size": 160}
    )
    with pytest.raises(ValueError, match="--format open_clip"):
        export_timm(projected, tmp_path / "p")

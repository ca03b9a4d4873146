"""open_clip export: the folder loads in open_clip and embeds exactly as mmpt's towers do."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch

from mmpt.export.open_clip import CONFIG_FILE, WEIGHTS_FILE, export_open_clip
from mmpt.models.contrastive import ContrastiveModule
from mmpt.models.encoders import (
    HFTextTower,
    OpenCLIPTextTower,
    OpenCLIPVisionTower,
    TimmVisionTower,
)
from mmpt.models.losses import SigLipLoss
from tests.helpers import TINY_BERT_WORDS, write_tiny_bert

TEXTS = ["a red square", "two blue circles on a green mat", "x"]


def text_tower() -> OpenCLIPTextTower:
    cfg = {"layers": 2, "width": 32, "heads": 2, "context_length": 16}
    return OpenCLIPTextTower("ViT-B-16", embed_dim=32, text_cfg=cfg)


def open_clip_vit() -> OpenCLIPVisionTower:
    cfg = {"layers": 2, "width": 32, "head_width": 16, "image_size": 32, "patch_size": 8}
    return OpenCLIPVisionTower("ViT-B-16", embed_dim=32, vision_cfg=cfg)


def trained_like(model: ContrastiveModule) -> ContrastiveModule:
    """Move every weight off its init, so a tensor left out of the export shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def assert_same_embeddings(model: ContrastiveModule, clip: torch.nn.Module, tokenizer) -> None:
    size = model.vision.image_preprocess.size
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    tokens = tokenizer(TEXTS)
    assert torch.equal(tokens, model.text.tokenizer(TEXTS))
    clip.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            clip.encode_image(images, normalize=True), model.encode_image(images), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            clip.encode_text(tokens, normalize=True), model.encode_text(tokens), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(clip.logit_scale.detach(), model.loss.logit_scale.detach())
        if hasattr(model.loss, "logit_bias"):
            torch.testing.assert_close(clip.logit_bias.detach(), model.loss.logit_bias.detach())
        else:
            assert clip.logit_bias is None


def test_open_clip_vit_loads_from_local_dir_and_by_name(tmp_path: Path) -> None:
    model = trained_like(ContrastiveModule(vision=open_clip_vit(), text=text_tower()))
    with torch.no_grad():
        model.loss.logit_scale.fill_(3.3)
    out = export_open_clip(model, tmp_path / "my-clip")
    assert {WEIGHTS_FILE, CONFIG_FILE, "my-clip.json"} <= {p.name for p in out.iterdir()}

    clip, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    assert_same_embeddings(model, clip, open_clip.get_tokenizer(f"local-dir:{out}"))
    normalize = preprocess.transforms[-1]
    assert tuple(normalize.mean) == model.vision.image_preprocess.mean
    assert preprocess.transforms[0].size == 32

    open_clip.add_model_config(str(out))
    clip, _, _ = open_clip.create_model_and_transforms(
        "my-clip", pretrained=str(out / WEIGHTS_FILE)
    )
    assert_same_embeddings(model, clip, open_clip.get_tokenizer("my-clip"))


def test_timm_trunk_and_siglip_bias(tmp_path: Path) -> None:
    stats = {"mean": [0.1] * 3, "std": [0.3] * 3}
    vision = TimmVisionTower("test_vit", embed_dim=32, image_size=160, **stats)
    loss = SigLipLoss()
    model = trained_like(ContrastiveModule(vision=vision, text=text_tower(), loss=loss))
    out = export_open_clip(model, tmp_path / "sig", name="mmpt-siglip-test")
    cfg = json.loads((out / CONFIG_FILE).read_text())
    assert cfg["model_cfg"]["vision_cfg"]["timm_model_name"] == "test_vit"
    assert cfg["preprocess_cfg"]["std"] == [0.3] * 3
    clip, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    assert_same_embeddings(model, clip, open_clip.get_tokenizer(f"local-dir:{out}"))


@pytest.mark.parametrize(
    ("vision_kwargs", "named"),
    [
        ({"model_kwargs": {"mlp_ratio": 2.0}}, "model_kwargs ['mlp_ratio']"),
        ({"image_size": 32}, "image_size 32"),
        ({"bands": ["B4", "B3", "B2", "B8"], "mean": [0.0] * 4, "std": [1.0] * 4}, "bands"),
    ],
)
def test_timm_towers_open_clip_cannot_build_are_refused(vision_kwargs: dict, named: str) -> None:
    kwargs = {"embed_dim": 32, "image_size": 160, **vision_kwargs}
    model = ContrastiveModule(vision=TimmVisionTower("test_vit", **kwargs), text=text_tower())
    with pytest.raises(ValueError, match="open_clip cannot express") as err:
        export_open_clip(model, "unused")
    assert named in str(err.value) and "OpenCLIPVisionTower" in str(err.value)


def test_hf_text_tower_is_refused(tmp_path: Path) -> None:
    bert = write_tiny_bert(tmp_path / "bert", TINY_BERT_WORDS)
    text = HFTextTower(str(bert), embed_dim=32, context_length=8)
    model = ContrastiveModule(vision=open_clip_vit(), text=text)
    with pytest.raises(ValueError, match="text tower HFTextTower.*supports"):
        export_open_clip(model, tmp_path / "out")

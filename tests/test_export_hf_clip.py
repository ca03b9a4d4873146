"""transformers CLIP export: CLIPModel + CLIPProcessor embed exactly as mmpt's open_clip towers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoProcessor, CLIPModel

from mmpt.export.hf_clip import export_hf_clip
from mmpt.models.contrastive import ContrastiveModule
from mmpt.models.encoders import OpenCLIPTextTower, OpenCLIPVisionTower, TimmVisionTower
from mmpt.models.losses import SigLipLoss

TEXTS = ["a red square", "Two blue circles, on a green mat!", "x"]
VISION = {"layers": 2, "width": 32, "head_width": 16, "image_size": 32, "patch_size": 8}
TEXT = {"layers": 2, "width": 32, "heads": 2, "context_length": 16}


def model(name: str = "ViT-B-16", vision_cfg: dict | None = None, **kwargs) -> ContrastiveModule:
    vision = OpenCLIPVisionTower(name, embed_dim=24, vision_cfg={**VISION, **(vision_cfg or {})})
    text = OpenCLIPTextTower(name, embed_dim=24, text_cfg=TEXT)
    module = ContrastiveModule(vision=vision, text=text, **kwargs)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return module.eval()


def features(out: torch.Tensor | object) -> torch.Tensor:
    """transformers 5 may wrap get_*_features in an output object."""
    return out if torch.is_tensor(out) else out.pooler_output


@pytest.mark.parametrize("name", ["ViT-B-16", "ViT-B-32-quickgelu"])
def test_clip_model_embeds_like_mmpt(tmp_path: Path, name: str) -> None:
    mmpt_model = model(name)
    out = export_hf_clip(mmpt_model, tmp_path / "clip")
    clip = CLIPModel.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert clip.config.vision_config.hidden_act == ("quick_gelu" if "quickgelu" in name else "gelu")
    ours = mmpt_model.text.tokenizer(TEXTS)
    theirs = processor.tokenizer(
        TEXTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt"
    ).input_ids
    for a, b in zip(ours, theirs, strict=True):  # equal up to and including end-of-text
        end = int(a.argmax()) + 1
        assert torch.equal(a[:end], b[:end])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        image = F.normalize(features(clip.get_image_features(pixel_values=images)), dim=-1)
        text = F.normalize(features(clip.get_text_features(input_ids=theirs)), dim=-1)
        torch.testing.assert_close(image, mmpt_model.encode_image(images), atol=1e-5, rtol=0)
        torch.testing.assert_close(text, mmpt_model.encode_text(ours), atol=1e-5, rtol=0)
    torch.testing.assert_close(clip.logit_scale.detach(), mmpt_model.loss.logit_scale.detach())
    pre = processor.image_processor
    assert pre.crop_size == {"height": 32, "width": 32}
    assert tuple(pre.image_mean) == mmpt_model.vision.image_preprocess.mean


def test_what_clip_model_cannot_express_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="logit bias"):
        export_hf_clip(model(loss=SigLipLoss()), tmp_path / "a")
    with pytest.raises(ValueError, match=r"open_clip options \['attentional_pool'\]"):
        export_hf_clip(model(vision_cfg={"attentional_pool": True}), tmp_path / "b")
    timm_tower = TimmVisionTower("test_vit", embed_dim=24, image_size=160)
    text = OpenCLIPTextTower("ViT-B-16", embed_dim=24, text_cfg=TEXT)
    with pytest.raises(ValueError, match="TimmVisionTower.*supports an OpenCLIPVisionTower"):
        export_hf_clip(ContrastiveModule(vision=timm_tower, text=text), tmp_path / "c")

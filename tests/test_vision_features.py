"""Vision towers' VLM interface: patch tokens of a chosen block, grid, describe() round trip."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from torch import nn

from mmpt.models.encoders import HFVisionTower, OpenCLIPVisionTower, TimmVisionTower

TIMM_KW = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
OC_CFG = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16}
HF_CFG = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "patch_size": 8,
}
SIGLIP = {"model_type": "siglip_vision_model", "image_size": 32, **HF_CFG}
CLIP = {"model_type": "clip_vision_model", "image_size": 32, **HF_CFG}
SIGLIP2 = {"model_type": "siglip2_vision_model", "num_patches": 16, **HF_CFG}
STEMS = ("patch_embed.", "conv1.", "patch_embedding.")  # timm, open_clip, HF
FLAG = r"--model\.init_args\.vision\.init_args"


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def tiny_timm(**kw) -> TimmVisionTower:
    torch.manual_seed(0)
    kw["model_kwargs"] = {**TIMM_KW, **kw.get("model_kwargs", {})}
    return TimmVisionTower(**{"embed_dim": 16, "image_size": 32, **kw}).eval()


def tiny_open_clip(**kw) -> OpenCLIPVisionTower:
    torch.manual_seed(0)
    return OpenCLIPVisionTower(embed_dim=16, vision_cfg=OC_CFG, **kw).eval()


def tiny_hf(config: dict, **kw) -> HFVisionTower:
    torch.manual_seed(0)
    return HFVisionTower(config=config, **kw).eval()


def rebuild(description: dict) -> nn.Module:
    """Instantiate a describe() dict the way a ``class_path`` config entry is."""
    description = json.loads(json.dumps(description))
    module, _, name = description["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**description["init_args"])


def check_tokens(tower: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``patch_features`` of ``x`` with the (B, h * w, D) shape its interface promises."""
    h, w = tower.patch_grid(x.shape[-2], x.shape[-1])
    with torch.no_grad():
        tokens = tower.patch_features(x)
    assert tokens.shape == (x.shape[0], h * w, tower.feature_dim)
    return tokens


# ---- timm --------------------------------------------------------------------------------------


def timm_reference(model: nn.Module, x: torch.Tensor, blocks: int) -> torch.Tensor:
    """Patch tokens after the first ``blocks`` blocks, computed from the timm modules."""
    with torch.no_grad():
        t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        for blk in model.blocks[:blocks]:
            t = blk(t)
    return t[:, model.num_prefix_tokens :]


def test_timm_patch_features_are_block_outputs_without_prefix(images):
    tower = tiny_timm(model_kwargs={"reg_tokens": 2})  # 1 class + 2 register tokens
    assert (tower.feature_dim, tower.patch_size, tower.patch_grid(32, 32)) == (32, 8, (4, 4))
    calls = []
    tower.model.blocks[1].register_forward_hook(lambda *_: calls.append(1))
    second_last = check_tokens(tower, images)
    assert not calls  # blocks after feature_layer do not run
    torch.testing.assert_close(second_last, timm_reference(tower.model, images, 1))
    last = check_tokens(tiny_timm(model_kwargs={"reg_tokens": 2}, feature_layer=-1), images)
    torch.testing.assert_close(last, timm_reference(tower.model, images, 2))
    assert not torch.allclose(last, second_last)
    with torch.no_grad():  # no final norm: forward_features normalises, patch_features does not
        assert not torch.allclose(last, tower.model.forward_features(images)[:, 3:])
    for bad in (2, -3):
        with pytest.raises(ValueError, match="feature_layer.*2 blocks"):
            tiny_timm(feature_layer=bad)


def test_timm_dynamic_size_non_square_grid():
    x = torch.randn(1, 3, 40, 24)
    tower = tiny_timm(model_kwargs={"dynamic_img_size": True})
    assert tower.patch_grid(40, 24) == (5, 3)
    torch.testing.assert_close(check_tokens(tower, x), timm_reference(tower.model, x, 1))
    with pytest.raises(ValueError, match="dynamic_img_size"):
        tiny_timm().patch_features(x)


def test_timm_without_head_and_non_vit(tmp_path, images):
    from safetensors.torch import save_file

    src = tiny_timm()
    save_file(src.model.state_dict(), tmp_path / "model.safetensors")
    bare = tiny_timm(embed_dim=0, pretrained=str(tmp_path))
    assert bare.output_dim == 32 and bare(images).shape == (2, 32)
    assert not any(k.startswith("head.") for k in bare.model.state_dict())
    torch.testing.assert_close(check_tokens(bare, images), check_tokens(src, images))
    cnn = TimmVisionTower("test_coatnet", embed_dim=8, image_size=64)  # builds: no blocks to check
    with pytest.raises(ValueError, match="not a ViT-style"):
        cnn.patch_features(images)


# ---- open_clip ---------------------------------------------------------------------------------


def test_open_clip_patch_features_are_block_outputs(images):
    tower = tiny_open_clip()
    v = tower.visual
    with torch.no_grad():
        t = v.conv1(images).flatten(2).transpose(1, 2)  # (B, 16, 32)
        t = torch.cat([v.class_embedding.expand(2, 1, -1), t], dim=1) + v.positional_embedding
        t = v.transformer.resblocks[0](v.ln_pre(t))
    second_last = check_tokens(tower, images)
    torch.testing.assert_close(second_last, t[:, 1:])
    last = check_tokens(tiny_open_clip(feature_layer=-1), images)
    assert not torch.allclose(last, second_last)
    with pytest.raises(ValueError, match="fixed position embedding"):
        tower.patch_features(torch.randn(1, 3, 32, 40))
    with pytest.raises(ValueError, match="feature_layer=5.*2 blocks"):
        tiny_open_clip(feature_layer=5)


def test_open_clip_timm_trunk_and_resnet():
    cfg = {"image_size": 32, "timm_model_name": "test_vit", "timm_pool": "", "timm_proj": "linear"}
    tower = OpenCLIPVisionTower(embed_dim=16, vision_cfg=cfg).eval()
    x = torch.randn(1, 3, 32, 48)  # test_vit has dynamic_img_size
    assert tower.patch_grid(32, 48) == (2, 3) and tower.feature_dim == 64
    torch.testing.assert_close(check_tokens(tower, x), timm_reference(tower.visual.trunk, x, 5))
    rn = OpenCLIPVisionTower("RN50", embed_dim=16, vision_cfg={"layers": [1, 1, 1, 1], "width": 16})
    with pytest.raises(ValueError, match="ModifiedResNet"):
        rn.patch_features(x)


# ---- Hugging Face ------------------------------------------------------------------------------


def test_hf_siglip_hidden_state_semantics(images):
    tower = tiny_hf(SIGLIP)
    m = tower.model
    with torch.no_grad():
        out = m(images, output_hidden_states=True)
        t = m.encoder.layers[0](m.embeddings(images), None)  # manual first block
        second_last = check_tokens(tower, images)
        last = check_tokens(tiny_hf(SIGLIP, feature_layer=-1), images)
        torch.testing.assert_close(second_last, t[0] if isinstance(t, tuple) else t)
        torch.testing.assert_close(second_last, out.hidden_states[1])
        torch.testing.assert_close(last, out.hidden_states[2])
        # The last hidden state is the last block's output before post_layernorm.
        torch.testing.assert_close(m.post_layernorm(last), out.last_hidden_state)
        torch.testing.assert_close(tower(images), out.pooler_output)
    assert check_tokens(tiny_hf(SIGLIP, feature_layer=0), images).shape == (2, 16, 32)
    assert check_tokens(tower, torch.randn(1, 3, 40, 48)).shape == (1, 30, 32)  # 5 x 6
    with pytest.raises(ValueError, match="feature_layer=-3.*2 blocks"):
        tiny_hf(SIGLIP, feature_layer=-3)


def test_hf_clip_strips_class_token(images):
    tower = tiny_hf(CLIP)
    assert tower.image_preprocess.mean == (0.48145466, 0.4578275, 0.40821073)
    with torch.no_grad():
        out = tower.model(images, output_hidden_states=True)
        tokens = check_tokens(tower, images)
        torch.testing.assert_close(tower(images), out.pooler_output)
    assert out.hidden_states[1].shape[1] == 17 and tokens.shape[1] == 16
    torch.testing.assert_close(tokens, out.hidden_states[1][:, 1:])
    assert tower.patch_grid(40, 48) == (5, 6)
    assert check_tokens(tower, torch.randn(1, 3, 40, 48)).shape == (1, 30, 32)


def test_hf_siglip2_patchifies_like_its_processor():
    from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

    tower = tiny_hf(SIGLIP2)
    assert tower.image_preprocess.size == 32  # sqrt(16 patches) * 8
    x = torch.randn(2, 3, 40, 24)
    patches = torch.stack([convert_image_to_patches(img, 8) for img in x])
    with torch.no_grad():
        out = tower.model(
            pixel_values=patches,
            pixel_attention_mask=torch.ones(2, 15, dtype=torch.long),
            spatial_shapes=torch.tensor([[5, 3], [5, 3]]),
            output_hidden_states=True,
        )
        torch.testing.assert_close(check_tokens(tower, x), out.hidden_states[1])
        torch.testing.assert_close(tower(x), out.pooler_output)
    with pytest.raises(ValueError, match="divisible by the patch size 8"):
        tower.patch_features(torch.randn(1, 3, 36, 32))


@pytest.mark.parametrize("family", ["siglip", "siglip2", "clip"])
def test_hf_loads_vision_part_of_full_model(tmp_path, images, family):
    import transformers

    prefix = {"siglip": "Siglip", "siglip2": "Siglip2", "clip": "CLIP"}[family]
    model_cls, cfg_cls = (getattr(transformers, f"{prefix}{s}") for s in ("Model", "Config"))
    text = {**HF_CFG, "vocab_size": 64, "max_position_embeddings": 16}
    text.pop("patch_size")
    text.update(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = dict({"clip": CLIP, "siglip2": SIGLIP2}.get(family, SIGLIP))
    vision.pop("model_type")
    torch.manual_seed(0)
    full = model_cls(cfg_cls(vision_config=vision, text_config=text)).eval()
    full.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]})
    )
    tower = HFVisionTower(pretrained=str(tmp_path), feature_layer=0).eval()
    assert tower.image_preprocess.mean == (0.1, 0.2, 0.3) and tower.image_preprocess.size == 32
    ours, theirs = tower.model.state_dict(), full.vision_model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    if family != "siglip2":  # SigLIP2 takes patchified pixels: see the test above
        with torch.no_grad():
            ref = full.vision_model(images, output_hidden_states=True).hidden_states[1]
        skip = 1 if family == "clip" else 0
        torch.testing.assert_close(check_tokens(tower, images), ref[:, skip:])


def test_hf_save_load_round_trip_and_errors(tmp_path, images):
    tower = tiny_hf(SIGLIP)
    tower.model.save_pretrained(tmp_path / "siglip")
    loaded = HFVisionTower(pretrained=str(tmp_path / "siglip")).eval()
    assert loaded.image_preprocess == tower.image_preprocess
    torch.testing.assert_close(check_tokens(loaded, images), check_tokens(tower, images))
    tower.model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    bf16 = HFVisionTower(pretrained=str(tmp_path / "bf16"))
    assert next(bf16.parameters()).dtype == torch.float32  # like the other towers
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    (tmp_path / "bf16" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match=r"lacks \d+ weights.*encoder\.layers\.2"):
        HFVisionTower(pretrained=str(tmp_path / "bf16"))
    for missing in (str(tmp_path / "absent"), str(tmp_path)):  # no folder; folder, no config
        download = rf"hf download google/siglip-so400m-patch14-384 --local-dir {missing}`"
        with pytest.raises(FileNotFoundError, match=f"{download}.*{FLAG}\\.pretrained"):
            HFVisionTower(pretrained=missing, repo_id="google/siglip-so400m-patch14-384")
        with pytest.raises(FileNotFoundError, match="add `repo_id: ORG/NAME`") as err:
            HFVisionTower(pretrained=missing)  # no repo in the config: no command guessed
        assert "hf download" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="run `hf download org/vit`"):
        HFVisionTower(pretrained="org/vit")
    for kw in ({}, {"pretrained": str(tmp_path / "siglip"), "config": SIGLIP}):
        with pytest.raises(ValueError, match=f"{FLAG}\\.pretrained.*{FLAG}\\.config"):
            HFVisionTower(**kw)
    with pytest.raises(ValueError, match="supports model types"):
        HFVisionTower(config={"model_type": "vit", **HF_CFG})


# ---- all towers --------------------------------------------------------------------------------

TOWERS = {
    "timm": lambda: tiny_timm(model_kwargs={"dynamic_img_size": True}, feature_layer=0),
    "open_clip": lambda: tiny_open_clip(feature_layer=-1),
    "hf_siglip": lambda: tiny_hf(SIGLIP, mean=[0.2] * 3, std=[0.3] * 3),
    "hf_clip": lambda: tiny_hf(CLIP, image_size=48),
    "hf_siglip2": lambda: tiny_hf(SIGLIP2),
}


@pytest.mark.parametrize("name", sorted(TOWERS))
def test_describe_rebuilds_the_architecture(name, images):
    tower = TOWERS[name]()
    description = tower.describe()
    assert description["init_args"]["pretrained"] is None
    assert description["class_path"] == f"mmpt.models.encoders.{type(tower).__name__}"
    copy = rebuild(description)
    assert type(copy) is type(tower) and copy.describe() == description
    shapes = {k: v.shape for k, v in tower.state_dict().items()}
    assert {k: v.shape for k, v in copy.state_dict().items()} == shapes
    assert copy.image_preprocess == tower.image_preprocess
    assert copy.feature_layer == tower.feature_layer
    copy.load_state_dict(tower.state_dict())
    torch.testing.assert_close(check_tokens(copy.eval(), images), check_tokens(tower, images))


@pytest.mark.parametrize("name", sorted(TOWERS))
def test_patch_features_backprop_with_checkpointing(name, images):
    tower = TOWERS[name]()
    tower.train()
    tower.set_grad_checkpointing(True)
    tower.patch_features(images).square().mean().backward()
    stem = [p for n, p in tower.named_parameters() if any(s in n for s in STEMS)]
    assert stem and all(p.grad is not None and p.grad.abs().sum() > 0 for p in stem)

"""init_from: image towers initialised from an MAE (or any timm ViT) checkpoint, shapes adapted."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models import adapt_input_conv
from torch import nn
from torch.utils.data import DataLoader

from mmpt.bands import S2_L1C
from mmpt.models.contrastive import ContrastiveModule
from mmpt.models.encoders import (
    HFVisionTower,
    OpenCLIPTextTower,
    OpenCLIPVisionTower,
    TimmVisionTower,
    VideoViTTower,
)
from mmpt.models.encoders.timm_vit import timm_patch_features
from mmpt.models.encoders.vit_init import PATCH_KEY
from mmpt.models.mae import MAEModule
from tests.helpers import TINY_TEXT, TINY_VIDEO

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

VISION_CFG = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16}
HEAD = {"head.weight", "head.bias"}


def tower(
    image_size: int = 32,
    patch: int = 8,
    bands: str | list[str] | None = None,
    embed_dim: int = 0,
    init_from: str | None = None,
    **extra: object,
) -> TimmVisionTower:
    """A 2-block, width-32 timm ViT tower."""
    n = 13 if bands == "s2_l1c" else len(bands or ())
    stats = {} if bands is None else {"mean": [0.0] * n, "std": [1.0] * n}
    kwargs = {"patch_size": patch, "embed_dim": 32, "depth": 2, "num_heads": 2, **extra}
    return TimmVisionTower(
        "vit_tiny_patch16_224",
        embed_dim=embed_dim,
        image_size=image_size,
        model_kwargs=kwargs,
        bands=bands,
        init_from=init_from,
        **stats,
    )


def mae_ckpt(path: Path, seed: int = 0, **tower_kw: object) -> tuple[MAEModule, str]:
    """An MAE checkpoint dict as Lightning writes it (state_dict + the module's hook)."""
    torch.manual_seed(seed)
    mae = MAEModule(tower(**tower_kw), decoder_dim=16, decoder_depth=1, decoder_heads=2)
    ckpt: dict = {"state_dict": mae.state_dict(), "global_step": 0}
    mae.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return mae, str(path)


def test_mae_to_contrastive_init_from_loads_every_encoder_weight(tmp_path, caplog):
    torch.manual_seed(0)
    mae = MAEModule(tower(), decoder_dim=16, decoder_depth=1, decoder_heads=2)
    trainer = L.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    trainer.fit(mae, DataLoader(torch.randn(4, 3, 32, 32), batch_size=2))
    path = str(tmp_path / "mae.ckpt")
    trainer.save_checkpoint(path)

    torch.manual_seed(1)
    with caplog.at_level(logging.INFO, logger="mmpt.models.encoders.vit_init"):
        vision = tower(embed_dim=16, init_from=path)
    model = ContrastiveModule(vision, OpenCLIPTextTower(**TINY_TEXT["init_args"]))
    enc = {k[len("encoder.") :]: v for k, v in mae.state_dict().items() if k.startswith("encoder.")}
    own = {k[len("vision.") :]: v for k, v in model.state_dict().items() if k.startswith("vision.")}
    assert len(enc) == 30  # 2 blocks x 12 + cls, pos, patch (2), norm (2)
    for key, value in enc.items():
        assert torch.equal(own[key], value), key
    assert set(own) - set(enc) == {f"model.{k}" for k in HEAD}
    report = vision.init_report
    assert report.prefix == "encoder.model." and report.source == path
    assert set(report.missing) == HEAD and not report.unexpected and not report.resized
    assert len(report.loaded) == 30 and "loaded 30" in caplog.text and "head.weight" in caplog.text


def test_pos_embed_resampled_to_a_larger_grid(tmp_path):
    mae, path = mae_ckpt(tmp_path / "mae.ckpt")
    big = tower(image_size=64, init_from=path)
    src = mae.encoder.model.pos_embed.detach()
    expected = resample_abs_pos_embed(src, new_size=[8, 8], num_prefix_tokens=1)
    assert big.model.pos_embed.shape == (1, 65, 32)
    assert torch.equal(big.model.pos_embed.detach(), expected)
    assert "4x4 -> 8x8" in big.init_report.resized["pos_embed"]
    assert big.init_report.missing == [] and big.init_report.mismatched == {}


def test_patch_size_16_to_8(tmp_path):
    mae, path = mae_ckpt(tmp_path / "mae.ckpt", patch=16)
    small = tower(patch=8, init_from=path)
    src = mae.encoder.model
    w = resample_patch_embed(src.patch_embed.proj.weight.detach(), [8, 8])
    assert torch.allclose(small.model.patch_embed.proj.weight, w, atol=1e-6)
    pos = resample_abs_pos_embed(src.pos_embed.detach(), new_size=[4, 4], num_prefix_tokens=1)
    assert torch.equal(small.model.pos_embed.detach(), pos)
    assert torch.equal(small.model.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
    assert "(16, 16) -> (8, 8)" in small.init_report.resized[PATCH_KEY]


def test_channels_matched_by_band_name(tmp_path):
    mae, path = mae_ckpt(tmp_path / "s2.ckpt", bands="s2_l1c")
    src = mae.encoder.model.patch_embed.proj.weight.detach()
    rgb = tower(init_from=path)  # bands None: R, G, B
    w = rgb.model.patch_embed.proj.weight.detach()
    for channel, band in enumerate(("B4", "B3", "B2")):
        assert torch.equal(w[:, channel], src[:, S2_L1C.index(band)]), band
    mixed = tower(bands=["B8", "VV", "R"], init_from=path)
    w = mixed.model.patch_embed.proj.weight.detach()
    assert torch.equal(w[:, 0], src[:, S2_L1C.index("B8")])
    assert torch.allclose(w[:, 1], src.mean(dim=1))
    assert torch.equal(w[:, 2], src[:, S2_L1C.index("B4")])
    assert "['VV'] = mean" in mixed.init_report.resized[PATCH_KEY]


def test_rgb_state_dict_folder_into_13_bands_without_names(tmp_path):
    torch.manual_seed(0)
    src = tower().model
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "m.safetensors")
    s2 = tower(bands="s2_l1c", init_from=str(tmp_path))
    expected = adapt_input_conv(13, src.patch_embed.proj.weight.detach())
    assert torch.equal(s2.model.patch_embed.proj.weight.detach(), expected)
    assert torch.equal(s2.model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    assert s2.init_report.prefix == "" and "adapt_input_conv" in s2.init_report.resized[PATCH_KEY]


def test_errors_missing_file_and_nothing_matching(tmp_path):
    with pytest.raises(FileNotFoundError, match="init_from.*nothing.ckpt"):
        tower(init_from=str(tmp_path / "nothing.ckpt"))
    torch.save({"state_dict": {"decoder.foo.weight": torch.zeros(2)}}, tmp_path / "x.ckpt")
    with pytest.raises(ValueError, match=r"prefixes tried.*encoder\.model\..*decoder\.foo\.weight"):
        tower(init_from=str(tmp_path / "x.ckpt"))
    mae_ckpt(tmp_path / "mae.ckpt")  # width 32
    wide = {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 2}
    with pytest.raises(ValueError, match=r"shape mismatches: \{'cls_token': '\(1, 1, 32\) vs"):
        TimmVisionTower(image_size=32, model_kwargs=wide, init_from=str(tmp_path / "mae.ckpt"))


def test_video_tower_loads_spatial_weights_and_keeps_temporal_zero(tmp_path):
    mae, path = mae_ckpt(tmp_path / "mae.ckpt", patch=16)
    video = VideoViTTower(**{**TINY_VIDEO["init_args"], "init_from": path})
    own = video.model.state_dict()
    for key, value in mae.encoder.model.state_dict().items():
        assert torch.equal(own[key], value), key
    assert set(video.init_report.missing) == HEAD
    assert torch.count_nonzero(video.temporal_pos_embed) == 0
    assert all(torch.count_nonzero(t.attn.proj.weight) == 0 for t in video.temporal)


def test_open_clip_vit_converted_from_timm(tmp_path):
    mae, path = mae_ckpt(tmp_path / "mae.ckpt")
    vit = mae.encoder.model.eval()
    oc = OpenCLIPVisionTower(embed_dim=16, vision_cfg=VISION_CFG, init_from=path).eval()
    v = oc.visual
    assert torch.equal(v.conv1.weight, vit.patch_embed.proj.weight)
    assert torch.equal(v.class_embedding, vit.cls_token.flatten())
    assert torch.equal(v.positional_embedding, vit.pos_embed[0])
    block, res = vit.blocks[1], v.transformer.resblocks[1]
    assert torch.equal(res.attn.in_proj_weight, block.attn.qkv.weight)
    assert torch.equal(res.attn.out_proj.bias, block.attn.proj.bias)
    assert torch.equal(res.mlp.c_proj.weight, block.mlp.fc2.weight)
    assert torch.equal(v.ln_post.weight, vit.norm.weight)
    report = oc.init_report
    assert set(report.missing) == {"proj", "ln_pre.weight", "ln_pre.bias"}
    assert report.unexpected == ["patch_embed.proj.bias"]
    assert oc.describe()["init_args"]["init_from"] is None
    # Same network once open_clip's ln_pre is an identity and timm's patch bias zero.
    v.ln_pre = nn.Identity()
    for module in v.modules():
        if isinstance(module, nn.LayerNorm):
            module.eps = 1e-6  # timm's
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        vit.patch_embed.proj.bias.zero_()
        expected = vit.forward_features(images)[:, 0] @ v.proj
        assert torch.allclose(oc(images), expected, atol=1e-4)


def hf_config(model_type: str) -> dict:
    """A tiny SigLIP/SigLIP2/CLIP vision config with timm's activation and norm eps."""
    size = {"num_patches": 16} if model_type.startswith("siglip2") else {"image_size": 32}
    return {
        "model_type": model_type,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 128,
        "patch_size": 8,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        **size,
    }


@pytest.mark.parametrize("model_type", ["siglip_vision_model", "clip_vision_model"])
def test_hf_weights_converted_from_mae(tmp_path, model_type):
    mae, path = mae_ckpt(tmp_path / "mae.ckpt")
    vit = mae.encoder.model
    hf = HFVisionTower(config=hf_config(model_type), init_from=path)
    own = hf.model.state_dict()
    emb = own["embeddings.position_embedding.weight"]
    layer = "encoder.layers.1.self_attn."
    for i, part in enumerate("qkv"):
        rows = vit.blocks[1].attn.qkv.weight[32 * i : 32 * (i + 1)]
        assert torch.equal(own[f"{layer}{part}_proj.weight"], rows)
    assert torch.equal(own["post_layernorm.bias"], vit.norm.bias)
    report = hf.init_report
    if model_type.startswith("siglip"):
        assert torch.equal(emb, vit.pos_embed[0, 1:])  # no class token: its row dropped
        assert "1 prefix row(s) dropped" in report.resized["pos_embed"]
        assert "cls_token" in report.unexpected
        assert not [k for k in report.missing if not k.startswith("head.")]
    else:
        assert torch.equal(emb, vit.pos_embed[0])
        assert torch.equal(own["embeddings.class_embedding"], vit.cls_token.flatten())
        assert set(report.missing) == {"pre_layrnorm.weight", "pre_layrnorm.bias"}
    assert hf.describe()["init_args"]["init_from"] is None


@pytest.mark.parametrize("model_type", ["siglip_vision_model", "siglip2_vision_model"])
def test_hf_siglip_forward_matches_timm_source(tmp_path, model_type):
    torch.manual_seed(0)
    src = tower(class_token=False, global_pool="avg", fc_norm=False).model.eval()
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "m.safetensors")
    hf = HFVisionTower(
        config=hf_config(model_type), init_from=str(tmp_path / "m.safetensors"), feature_layer=-1
    ).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = timm_patch_features(src, images, 1)
        assert torch.allclose(hf.patch_features(images), expected, atol=1e-5)
    assert not hf.init_report.resized and not hf.init_report.unexpected


def grouped_tower(init_from: str | None = None) -> TimmVisionTower:
    """The 2-block tower over 13 bands with SatMAE band groups."""
    return TimmVisionTower(
        "vit_tiny_patch16_224",
        embed_dim=0,
        image_size=32,
        model_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
        bands="s2_l1c",
        band_groups="satmae",
        mean=[0.0] * 13,
        std=[1.0] * 13,
        init_from=init_from,
    )


def test_plain_pos_embed_is_repeated_for_each_band_group(tmp_path):
    """A plain 13-band MAE into a SatMAE-grouped tower: every group gets the spatial grid."""
    mae, path = mae_ckpt(tmp_path / "mae.ckpt", bands="s2_l1c")
    grouped = grouped_tower(init_from=path)
    src = mae.encoder.model.pos_embed.detach()  # (1, 1 + 16, 32) at 32 px / patch 8
    got = grouped.model.pos_embed.detach()
    assert got.shape == (1, 1 + 3 * 16, 32)
    assert torch.equal(got[:, :1], src[:, :1])
    for g in range(3):
        assert torch.equal(got[:, 1 + 16 * g : 1 + 16 * (g + 1)], src[:, 1:]), g
    assert "repeated for 3 band groups" in grouped.init_report.resized["pos_embed"]


def test_grouped_pos_embed_is_not_forced_onto_a_plain_tower(tmp_path):
    """1 + 3 * 16 = 49 rows would pass for a 7 x 7 grid: it must be reported, not loaded."""
    torch.manual_seed(0)
    mae = MAEModule(grouped_tower(), decoder_dim=16, decoder_depth=1, decoder_heads=2)
    ckpt: dict = {"state_dict": mae.state_dict()}
    mae.on_save_checkpoint(ckpt)
    torch.save(ckpt, path := str(tmp_path / "grouped.ckpt"))
    plain = tower(bands="s2_l1c", init_from=path)
    assert "pos_embed" in plain.init_report.mismatched
    assert "pos_embed" not in plain.init_report.loaded

"""SatMAE band-group patch embedding: token layout, per-group locality and the timm ViT tower."""

from __future__ import annotations

import pickle

import pytest
import torch

from mmpt.bands import S2_L1C, SATMAE_GROUPS
from mmpt.models.encoders.group_embed import GroupPatchEmbed, group_embed_layer
from mmpt.models.encoders.timm_vit import TimmVisionTower

GROUPS = ((0, 1), (2, 3, 4), (5,))  # channel 6 is in no group


def _embed() -> GroupPatchEmbed:
    torch.manual_seed(0)
    return GroupPatchEmbed(GROUPS, img_size=(8, 12), patch_size=4, in_chans=7, embed_dim=5)


def _satmae_tower(**kwargs: object) -> TimmVisionTower:
    torch.manual_seed(0)
    return TimmVisionTower(
        "vit_tiny_patch16_224",
        embed_dim=0,
        image_size=32,
        model_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2, **kwargs},
        bands="s2_l1c",
        band_groups="satmae",
        mean=[0.0] * 13,
        std=[1.0] * 13,
        scale=1e-4,
    )


def test_shapes_and_timm_attributes() -> None:
    embed = _embed()
    assert embed.groups == GROUPS and embed.num_groups == 3
    assert embed.spatial_grid == (2, 3) and embed.grid_size == (6, 3)
    assert embed.num_patches == 18 and embed.patch_size == (4, 4) and embed.img_size == (8, 12)
    assert embed.feat_ratio() == 4 and embed.dynamic_feat_size((8, 12)) == (6, 3)
    assert [p.in_channels for p in embed.proj] == [2, 3, 1]
    assert embed.group_embed.shape == (3, 5)
    assert embed(torch.randn(2, 7, 8, 12)).shape == (2, 18, 5)


def test_tokens_match_direct_projection_group_major() -> None:
    embed = _embed()
    x = torch.randn(2, 7, 8, 12)
    out = embed(x)
    for g, group in enumerate(GROUPS):
        conv = embed.proj[g]
        for r in range(2):
            for c in range(3):
                patch = x[:, list(group), 4 * r : 4 * r + 4, 4 * c : 4 * c + 4]  # (B, C_g, 4, 4)
                want = torch.einsum("bchw,dchw->bd", patch, conv.weight) + conv.bias
                want = want + embed.group_embed[g]
                torch.testing.assert_close(out[:, g * 6 + r * 3 + c], want)


def test_each_group_sees_only_its_channels() -> None:
    embed = _embed()
    x = torch.randn(2, 7, 8, 12)
    base = embed(x)
    y = x.clone()
    y[:, 3] += 5.0  # channel 3 belongs to group 1 (tokens 6..11)
    changed = (embed(y) - base).abs().amax(dim=(0, 2)) > 0
    assert changed.tolist() == [False] * 6 + [True] * 6 + [False] * 6
    z = x.clone()
    z[:, 6] = torch.randn(2, 8, 12) * 100  # channel 6 is in no group
    assert torch.equal(embed(z), base)


@pytest.mark.parametrize(
    "kwargs",
    [{"strict_img_size": False}, {"output_fmt": "NHWC"}, {"dynamic_img_pad": True}],
)
def test_rejects_dynamic_sizes(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="fixed input size"):
        GroupPatchEmbed(GROUPS, img_size=8, patch_size=4, in_chans=7, embed_dim=5, **kwargs)


def test_rejects_bad_groups_and_sizes() -> None:
    with pytest.raises(ValueError, match="distinct"):
        GroupPatchEmbed(((0, 1), (1, 2)), img_size=8, patch_size=4, in_chans=3, embed_dim=5)
    with pytest.raises(ValueError, match="distinct"):
        GroupPatchEmbed(((0, 3),), img_size=8, patch_size=4, in_chans=3, embed_dim=5)
    with pytest.raises(ValueError, match="built for"):
        _embed()(torch.randn(1, 7, 8, 8))
    with pytest.raises(ValueError, match="cannot change"):
        _embed().set_input_size(img_size=16)
    with pytest.raises(ValueError, match="fixed input size"):
        _satmae_tower(dynamic_img_size=True)


def test_satmae_tower_builds_runs_and_round_trips() -> None:
    tower = _satmae_tower()
    embed = tower.model.patch_embed
    assert isinstance(embed, GroupPatchEmbed)
    want = tuple(tuple(S2_L1C.index(b) for b in g) for g in SATMAE_GROUPS)
    assert tower.band_groups == want and embed.groups == want
    assert tower.model.pos_embed.shape == (1, 1 + 3 * 4, 32)  # class token + G * h * w
    assert 0.01 < embed.group_embed.std().item() < 0.03  # trunc-normal 0.02 (timm init kept it)
    x = torch.randn(2, 13, 32, 32)
    assert tower(x).shape == (2, 32)
    assert tower.pooled_features(x).shape == (2, 32)
    assert tower.pooled_features(x, pool="avg").shape == (2, 32)
    assert tower.patch_grid(32, 32) == (6, 2)
    assert tower.patch_features(x).shape == (2, 12, 32)
    described = tower.describe()["init_args"]
    assert described["band_groups"] == [list(g) for g in SATMAE_GROUPS]
    rebuilt = TimmVisionTower(**described)
    own, new = tower.state_dict(), rebuilt.state_dict()
    assert own.keys() == new.keys()
    assert all(own[k].shape == new[k].shape for k in own)
    rebuilt.load_state_dict(own)
    rebuilt.eval(), tower.eval()
    torch.testing.assert_close(rebuilt(x), tower(x))


def test_factory_is_picklable_and_passes_timm_kwargs() -> None:
    factory = pickle.loads(pickle.dumps(group_embed_layer([[0], [1, 2]])))
    embed = factory(img_size=8, patch_size=4, in_chans=3, embed_dim=6, bias=False)
    assert embed.groups == ((0,), (1, 2)) and embed.proj[0].bias is None
    assert embed(torch.randn(1, 3, 8, 8)).shape == (1, 8, 6)

"""Resolution policies: token counts before decode equal the crops' counts, AnyRes grids, NaFlex."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from mmpt.datamodules.resolution import (
    AnyResTiles,
    FixedResolution,
    ImageCrops,
    NativeResolution,
)
from mmpt.models.connectors import AvgPoolMLP, MLP2xGelu, MLPDownsample

CONNECTORS = [MLP2xGelu(8, 16), MLPDownsample(8, 16), AvgPoolMLP(8, 16, num_tokens=4)]
SIZES = [(1, 1), (7, 5), (32, 32), (33, 31), (96, 32), (32, 96), (200, 50), (50, 200), (300, 3)]
SIZES += [(3, 300), (64, 64), (120, 90), (90, 120), (255, 17), (45, 160)]
POLICIES = [
    FixedResolution(image_size=32, patch_size=8),
    AnyResTiles(tile_size=32, patch_size=8, max_tiles=6),
    AnyResTiles(tile_size=32, patch_size=8, max_tiles=4, global_view=False, row_end_token=False),
    AnyResTiles(tile_size=24, patch_size=8, max_tiles=9, global_view=False),
    NativeResolution(patch_size=8, max_num_patches=16),
    NativeResolution(patch_size=4, max_num_patches=30, max_upscale=1.0),
]


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """A random RGB image of the given size."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def counter(connector: torch.nn.Module):
    """The connector's per-crop count as ``tokens_for_grid``."""
    return lambda g: connector.num_output_tokens(g[0] * g[1], g)


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: type(p).__name__)
def test_num_tokens_matches_crops(policy) -> None:
    for w, h in SIZES:
        crops = policy(noise(w, h))
        assert isinstance(crops, ImageCrops)
        assert crops.pixels.dtype == torch.uint8 and crops.pixels.shape[1] == 3
        assert crops.pixels.shape[0] == len(crops.grids)
        for conn in CONNECTORS:
            assert policy.num_tokens(w, h, counter(conn)) == crops.num_tokens(counter(conn))


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: type(p).__name__)
def test_pixels_cover_grids(policy) -> None:
    crops = policy(noise(70, 40))
    p = policy.patch_size
    for img, (gh, gw) in zip(crops.pixels, crops.grids, strict=True):
        assert img.shape == (3, gh * p, gw * p)


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: type(p).__name__)
def test_picklable(policy) -> None:
    back = pickle.loads(pickle.dumps(policy))
    img = noise(50, 30)
    assert torch.equal(back(img).pixels, policy(img).pixels)


def test_fixed_one_centre_crop() -> None:
    policy = FixedResolution()  # 384 / 14 -> 27 x 27
    crops = policy(noise(500, 300))
    assert crops.pixels.shape == (1, 3, 384, 384) and crops.grids == [(27, 27)]
    assert crops.row_end_tokens == 0
    assert policy.num_tokens(500, 300, counter(MLP2xGelu(8, 16))) == 729
    assert policy.num_tokens(500, 300, counter(MLPDownsample(8, 16))) == 196


def test_avg_pool_n_is_fixed_plus_avgpool_connector() -> None:
    conn = AvgPoolMLP(8, 16, num_tokens=144)
    policy = FixedResolution(image_size=384, patch_size=14)
    assert policy.num_tokens(640, 480, counter(conn)) == 144
    assert policy(noise(64, 48)).num_tokens(counter(conn)) == 144


@pytest.mark.parametrize(
    ("size", "grid"),
    [
        ((1008, 336), (1, 3)),  # wide 3:1 fits 1x3 exactly
        ((336, 1008), (3, 1)),  # tall
        ((672, 672), (2, 2)),  # square, exact
        ((1000, 1000), (2, 2)),  # square: 2x3 / 3x2 same resolution, more waste
        ((4000, 1000), (1, 4)),  # 4:1: 1x4 / 1x5 / 1x6 tie on resolution, 1x4 least waste
        ((50, 40), (1, 1)),  # tiny: every grid keeps full resolution, 1x1 least waste
        ((1008, 504), (2, 3)),  # 2:1 large: 2x3 canvas 1008x672 keeps full resolution
    ],
)
def test_anyres_grid_choice(size: tuple[int, int], grid: tuple[int, int]) -> None:
    assert AnyResTiles(tile_size=336, patch_size=14, max_tiles=6).select_grid(*size) == grid


def test_anyres_candidates_and_max_tiles() -> None:
    policy = AnyResTiles(max_tiles=4)
    cands = policy.candidate_grids()
    assert all(r * c <= 4 for r, c in cands) and len(cands) == len(set(cands)) == 8
    assert AnyResTiles(max_tiles=1).select_grid(4000, 100) == (1, 1)


def test_anyres_tiles_reassemble_canvas() -> None:
    policy = AnyResTiles(tile_size=32, patch_size=8, max_tiles=6)
    img = noise(200, 50, seed=1)
    grid = policy.select_grid(200, 50)
    assert grid == (1, 4)
    crops = policy(img)
    rows, cols = grid
    assert crops.pixels.shape == (1 + rows * cols, 3, 32, 32)
    tiles = crops.pixels[1:].view(rows, cols, 3, 32, 32).permute(2, 0, 3, 1, 4)
    canvas = np.asarray(policy.canvas(img, grid)).transpose(2, 0, 1)
    assert np.array_equal(tiles.reshape(3, rows * 32, cols * 32).numpy(), canvas)
    glob = np.asarray(img.resize((32, 32), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    assert np.array_equal(crops.pixels[0].numpy(), glob)


def test_anyres_padding_colour_and_global_first() -> None:
    # 96x48 (2:1), T=32: 2x3 canvas 96x64 keeps full resolution; 8 pad rows top and bottom.
    red = Image.new("RGB", (96, 48), (255, 0, 0))
    policy = AnyResTiles(tile_size=32, patch_size=8, max_tiles=6, pad_color=(0, 0, 255))
    crops = policy(red)
    assert len(crops.grids) == 1 + 6
    assert (crops.pixels[0] == torch.tensor([255, 0, 0]).view(3, 1, 1)).all()  # global view
    canvas = crops.pixels[1:].view(2, 3, 3, 32, 32).permute(2, 0, 3, 1, 4).reshape(3, 64, 96)
    blue, redv = torch.tensor([0, 0, 255]).view(3, 1, 1), torch.tensor([255, 0, 0]).view(3, 1, 1)
    assert (canvas[:, :8] == blue).all() and (canvas[:, 56:] == blue).all()
    assert (canvas[:, 8:56] == redv).all()


def test_anyres_row_end_tokens() -> None:
    img = noise(96, 48)  # grid 2x3 with T=32
    on = AnyResTiles(tile_size=32, patch_size=8, max_tiles=6)(img)
    assert on.row_end_tokens == 2 * (32 // 8)
    assert on.grids == [(4, 4)] * 7
    off = AnyResTiles(tile_size=32, patch_size=8, max_tiles=6, row_end_token=False)(img)
    assert off.row_end_tokens == 0
    no_glob = AnyResTiles(tile_size=32, patch_size=8, max_tiles=6, global_view=False)(img)
    assert len(no_glob.grids) == 6
    # MLP2xGelu: 7 crops x 16 tokens + 8 row ends.
    assert on.num_tokens(counter(MLP2xGelu(8, 16))) == 7 * 16 + 8


def test_native_grid_budget_and_aspect() -> None:
    policy = NativeResolution(patch_size=8, max_num_patches=16)
    assert policy.grid(160, 40) == (2, 8)  # 4:1 kept, 16 patches
    assert policy.grid(40, 160) == (8, 2)
    assert policy.grid(16, 16) == (4, 4)  # small images are upscaled to the budget
    capped = NativeResolution(patch_size=8, max_num_patches=16, max_upscale=1.0)
    assert capped.grid(16, 16) == (2, 2)
    for w, h in SIZES:
        gh, gw = policy.grid(w, h)
        assert 1 <= gh * gw <= 16
    crops = policy(noise(160, 40))
    assert crops.pixels.shape == (1, 3, 16, 64) and crops.grids == [(2, 8)]


def test_native_matches_timm_naflex_transform() -> None:
    pytest.importorskip("torchvision")
    from timm.data.naflex_transforms import ResizeToSequence

    policy = NativeResolution(patch_size=16, max_num_patches=64)
    for w, h in [(300, 100), (100, 300), (257, 255), (1000, 20)]:
        out = ResizeToSequence(patch_size=16, max_seq_len=64)(torch.zeros(3, h, w))
        gh, gw = policy.grid(w, h)
        assert out.shape[1:] == (gh * 16, gw * 16)

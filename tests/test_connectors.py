"""Connectors: shapes agree with num_output_tokens, VILA 2x2 merge, avg-pool values, grads, YAML."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmpt.models.connectors import (
    AvgPoolMLP,
    MLP2xGelu,
    MLPDownsample,
    PerceiverResampler,
    merge_2x2,
    patch_grid,
)

VD, LD = 8, 16
# (N, grid): square grids (incl. SigLIP-384's 27x27) and non-square ones given as (h, w).
INPUTS = [(729, None), (16, None), (1, None), (15, (3, 5)), (24, (6, 4)), (14, (7, 2))]


def make(name: str) -> nn.Module:
    torch.manual_seed(0)
    return {
        "mlp2x": lambda: MLP2xGelu(VD, LD),
        "downsample": lambda: MLPDownsample(VD, LD),
        "avgpool": lambda: AvgPoolMLP(VD, LD, num_tokens=9),
        "perceiver": lambda: PerceiverResampler(VD, LD, num_latents=5, depth=2, heads=4),
    }[name]()


NAMES = ["mlp2x", "downsample", "avgpool", "perceiver"]


def feats(n: int, b: int = 2, c: int = VD, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, n, c, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("n", "grid"), INPUTS)
def test_output_shape_matches_num_output_tokens(name, n, grid):
    conn = make(name)
    out = conn(feats(n), grid=grid)
    assert out.shape == (2, conn.num_output_tokens(n, grid), LD)
    assert torch.isfinite(out).all()


def test_expected_token_counts():
    assert MLPDownsample(VD, LD).num_output_tokens(729) == 196  # 27x27 -> 14x14
    assert MLPDownsample(VD, LD).num_output_tokens(576) == 144  # 24x24 -> 12x12
    assert MLPDownsample(VD, LD).num_output_tokens(15, (3, 5)) == 6  # 2 x 3
    assert AvgPoolMLP(VD, LD).num_output_tokens(729) == 144
    assert AvgPoolMLP(VD, LD, num_tokens=729).num_output_tokens(576) == 729
    assert PerceiverResampler(VD, LD, heads=4).num_output_tokens(30) == 64
    assert MLP2xGelu(VD, LD).num_output_tokens(30) == 30


@pytest.mark.parametrize("name", ["downsample", "avgpool"])
def test_grid_connectors_need_a_grid_for_non_square_inputs(name):
    conn = make(name)
    with pytest.raises(ValueError, match="square grid"):
        conn.num_output_tokens(30)
    with pytest.raises(ValueError, match="square grid"):
        conn(feats(30))
    assert conn(feats(30), grid=(5, 6)).shape[1] == conn.num_output_tokens(30, (5, 6))


@pytest.mark.parametrize("name", NAMES)
def test_wrong_grid_or_width_is_a_clear_error(name):
    conn = make(name)
    with pytest.raises(ValueError, match="h \\* w != N"):
        conn(feats(16), grid=(3, 5))
    with pytest.raises(ValueError, match=f"\\(B, N, {VD}\\)"):
        conn(feats(16, c=VD + 1))


def test_constructor_errors():
    with pytest.raises(ValueError, match="perfect square"):
        AvgPoolMLP(VD, LD, num_tokens=150)
    with pytest.raises(ValueError, match="divide"):
        PerceiverResampler(VD, 18, heads=4)
    assert patch_grid(12, (3, 4)) == (3, 4) and patch_grid(49) == (7, 7)


def expected_merge(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Hand-written reference: token (i, j) = [x(2i,2j), x(2i,2j+1), x(2i+1,2j), x(2i+1,2j+1)]."""
    b, _, c = x.shape
    zero = torch.zeros(b, c)
    rows = []
    for i in range((h + 1) // 2):
        for j in range((w + 1) // 2):
            parts = []
            for r, col in (
                (2 * i, 2 * j),
                (2 * i, 2 * j + 1),
                (2 * i + 1, 2 * j),
                (2 * i + 1, 2 * j + 1),
            ):
                parts.append(x[:, r * w + col] if r < h and col < w else zero)
            rows.append(torch.cat(parts, dim=-1))
    return torch.stack(rows, dim=1)


def vila_flat_square(x: torch.Tensor) -> torch.Tensor:
    """VILA's DownSampleBlock.flat_square (later version, row-major output), for parity."""
    n, w, h, c = x.size()
    if w % 2 == 1:
        x = torch.cat([x, torch.zeros(n, 1, h, c)], dim=1)
        n, w, h, c = x.size()
    if h % 2 == 1:
        x = torch.cat([x, torch.zeros(n, w, 1, c)], dim=2)
        n, w, h, c = x.size()
    x = x.view(n, w, h // 2, c * 2).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, h // 2, w // 2, c * 4).permute(0, 2, 1, 3).contiguous()
    return x.reshape(n, -1, c * 4)


@pytest.mark.parametrize(("h", "w"), [(4, 4), (27, 27), (3, 5), (5, 2)])
def test_merge_2x2_concatenates_the_right_four_tokens(h, w):
    # Token (r, c) carries the values (r, c, 100 + batch) so every slot is identifiable.
    b = 2
    r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    x = torch.stack([r.flatten(), c.flatten()], dim=-1).float() + 1  # (h*w, 2), no zeros
    x = torch.stack([torch.cat([x, torch.full((h * w, 1), 100.0 + i)], -1) for i in range(b)])
    expected = expected_merge(x, h, w)
    assert torch.equal(merge_2x2(x, h, w), expected)
    if h == w:
        assert torch.equal(vila_flat_square(x.reshape(b, h, w, -1)), expected)
    # Through the module with the LayerNorm/MLP replaced by identity.
    conn = MLPDownsample(3, LD)
    conn.proj = nn.Identity()
    assert torch.equal(conn(x, grid=(h, w)), expected)
    if (h, w) == (27, 27):  # zero padding: last row/column of blocks has zero slots
        assert expected.shape[1] == 196
        assert torch.equal(expected[:, -1, 3:], torch.zeros(b, 9))
        zero = torch.zeros(b, 3)  # token (0, 13) = [x(0,26), pad, x(1,26), pad]
        assert torch.equal(expected[:, 13], torch.cat([x[:, 26], zero, x[:, 53], zero], -1))


def test_avgpool_averages_blocks_of_the_grid():
    conn = AvgPoolMLP(VD, LD, num_tokens=4)
    conn.proj = nn.Identity()
    x = feats(24)  # grid (4, 6) -> 2 x 2 tokens, each the mean of a 2 x 3 block
    out = conn(x, grid=(4, 6))
    grid = x.reshape(2, 4, 6, VD)
    expected = torch.stack(
        [
            grid[:, 2 * i : 2 * i + 2, 3 * j : 3 * j + 3].mean(dim=(1, 2))
            for i in (0, 1)
            for j in (0, 1)
        ],
        dim=1,
    )
    torch.testing.assert_close(out, expected)


def test_perceiver_is_invariant_to_token_order_and_any_length():
    conn = make("perceiver")
    x = feats(20)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(conn(x[:, perm]), conn(x), atol=1e-5, rtol=1e-5)
    assert conn(feats(7)).shape == conn(feats(50)).shape == (2, 5, LD)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter_and_the_input(name):
    conn = make(name)
    x = feats(25).requires_grad_(True)
    conn(x).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for pname, p in conn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize(
    ("cls", "init_args"),
    [
        ("MLP2xGelu", {}),
        ("MLPDownsample", {}),
        ("AvgPoolMLP", {"num_tokens": 4}),
        ("PerceiverResampler", {"num_latents": 3, "depth": 1, "heads": 2}),
    ],
)
def test_built_from_class_path_config(cls, init_args):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--connector", type=nn.Module)
    cfg = parser.parse_object(
        {
            "connector": {
                "class_path": f"mmpt.models.connectors.{cls}",
                "init_args": {"vision_dim": VD, "llm_dim": LD, **init_args},
            }
        }
    )
    conn = parser.instantiate_classes(cfg).connector
    assert type(conn).__name__ == cls
    assert conn(feats(16)).shape == (2, conn.num_output_tokens(16), LD)

"""ViTDet's simple feature pyramid: one ViT feature map -> maps at strides 4, 8, 16, 32.

Li et al., "Exploring Plain Vision Transformer Backbones for Object Detection" (ViTDet, 2022):
the last block's (stride ``p``) map is upsampled by transposed convolutions or downsampled by
max-pooling to each stride, then a 1x1 and a 3x3 convolution, each followed by a channel
LayerNorm, give ``out_channels`` per level. Any mmpt image tower with patch tokens
(``patch_features`` + ``patch_grid``: timm, open_clip, Hugging Face towers) can feed it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from timm.layers import LayerNorm2d
from torch import nn


def _scale_layers(dim: int, factor: float) -> tuple[list[nn.Module], int]:
    """Layers changing a stride-``p`` map by ``factor`` (a power of two) and their out width."""
    steps = round(math.log2(factor))
    if not math.isclose(2.0**steps, factor):
        raise ValueError(f"pyramid scale factor {factor} is not a power of two")
    layers: list[nn.Module] = []
    if steps < 0:
        layers.append(nn.MaxPool2d(kernel_size=2 ** (-steps), stride=2 ** (-steps)))
    for i in range(steps):
        if i:
            layers += [LayerNorm2d(dim), nn.GELU()]
        layers.append(nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2))
        dim //= 2
    return layers, dim


class SimpleFeaturePyramid(nn.Module):
    """ViTDet simple feature pyramid over a single-scale token map.

    Args:
        in_dim: Width D of the tower's patch tokens.
        patch_size: The tokens' stride in pixels (the tower's patch size).
        out_channels: Channels C of every pyramid level.
        strides: Output strides in pixels; each ``patch_size / stride`` must be a power of two.
    """

    def __init__(
        self,
        in_dim: int,
        patch_size: int,
        out_channels: int = 256,
        strides: Sequence[int] = (4, 8, 16, 32),
    ) -> None:
        super().__init__()
        self.strides = tuple(int(s) for s in strides)
        self.out_channels = out_channels
        self.levels = nn.ModuleList()
        for stride in self.strides:
            layers, dim = _scale_layers(in_dim, patch_size / stride)
            if dim < 1:
                raise ValueError(f"in_dim {in_dim} is too narrow to upsample to stride {stride}")
            layers += [
                nn.Conv2d(dim, out_channels, kernel_size=1, bias=False),
                LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
                LayerNorm2d(out_channels),
            ]
            self.levels.append(nn.Sequential(*layers))

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> list[torch.Tensor]:
        """Pyramid of a token map.

        Args:
            tokens: (B, h * w, D) patch tokens, row-major over ``grid``.
            grid: (h, w) token grid.

        Returns:
            One (B, C, H / s, W / s) map per stride s, finest first.
        """
        b, n, d = tokens.shape
        if n != grid[0] * grid[1]:
            raise ValueError(f"{n} tokens do not fill a {grid} grid")
        x = tokens.transpose(1, 2).reshape(b, d, *grid)
        return [level(x) for level in self.levels]


def tower_pyramid(tower: nn.Module, out_channels: int, strides: Sequence[int]) -> nn.Module:
    """A :class:`SimpleFeaturePyramid` sized for an mmpt image tower's patch tokens.

    Raises:
        ValueError: The tower has no patch tokens (``patch_features``/``patch_grid``).
    """
    if not all(hasattr(tower, a) for a in ("patch_features", "patch_grid", "feature_dim")):
        raise ValueError(
            f"{type(tower).__name__} has no patch tokens (patch_features/patch_grid): dense "
            "heads need a ViT-style tower (timm ViT, open_clip or Hugging Face vision tower)"
        )
    return SimpleFeaturePyramid(tower.feature_dim, tower.patch_size, out_channels, strides)


def pyramid_features(
    tower: nn.Module, pyramid: SimpleFeaturePyramid, images: torch.Tensor
) -> list[torch.Tensor]:
    """Pyramid maps of normalised images (B, C, H, W) through ``tower``'s patch tokens."""
    grid = tower.patch_grid(images.shape[-2], images.shape[-1])
    return pyramid(tower.patch_features(images), tuple(grid))


__all__ = ["SimpleFeaturePyramid", "pyramid_features", "tower_pyramid"]

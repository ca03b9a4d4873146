"""VILA `mlp_downsample` connector: merge each 2x2 patch block into channels, then an MLP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def patch_grid(num_tokens: int, grid: tuple[int, int] | None = None) -> tuple[int, int]:
    """Resolve the (h, w) patch grid of ``num_tokens`` row-major patch tokens.

    Shared by the grid-aware connectors.

    Args:
        num_tokens: N, patch tokens per image (CLS/register tokens already removed).
        grid: (h, w) for a non-square grid; None means the grid is square.

    Returns:
        (h, w) with h * w == N.

    Raises:
        ValueError: When ``grid`` is None and N is not a perfect square, or h * w != N.

    """
    if grid is None:
        side = math.isqrt(num_tokens) if num_tokens > 0 else 0
        if side == 0 or side * side != num_tokens:
            raise ValueError(
                f"{num_tokens} patch tokens do not form a square grid: pass grid=(h, w), and drop "
                "any CLS/register tokens from the vision features first."
            )
        return side, side
    h, w = (int(v) for v in grid)
    if h <= 0 or w <= 0 or h * w != num_tokens:
        raise ValueError(
            f"grid={tuple(grid)} does not hold {num_tokens} patch tokens (h * w != N)."
        )
    return h, w


def check_features(features: torch.Tensor, vision_dim: int) -> None:
    """Raise a clear error unless ``features`` is (B, N, vision_dim).

    Args:
        features: Tensor to check.
        vision_dim: Expected last dimension.

    Raises:
        ValueError: On a wrong rank or width.

    """
    if features.ndim != 3 or features.shape[-1] != vision_dim:
        raise ValueError(
            f"expected visual features of shape (B, N, {vision_dim}), got {tuple(features.shape)}"
        )


def merge_2x2(features: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Concatenate each 2x2 block of a patch grid into one token, zero-padding odd sides.

    Channel order follows VILA's ``DownSampleBlock``: for output token (i, j) the channels are
    ``[x(2i, 2j), x(2i, 2j+1), x(2i+1, 2j), x(2i+1, 2j+1)]`` (row, column), so VILA
    ``mlp_downsample`` weights fit ``MLPDownsample.proj`` (keys ``layers.{1,2,4}`` ->
    ``proj.{0,1,3}``). Output tokens are row-major, as VILA's code with the final permute (some
    versions omit it and emit them column-major). An odd height or width gets one row/column of
    zeros at the bottom/right, e.g. 27x27 -> 28x28 -> 14x14.

    Args:
        features: (B, h * w, C) row-major patch features.
        h: Grid height.
        w: Grid width.

    Returns:
        (B, ceil(h / 2) * ceil(w / 2), 4 * C) merged tokens, row-major.

    """
    b, _, c = features.shape
    x = features.reshape(b, h, w, c)
    x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))  # pad W then H at the end, with zeros
    h2, w2 = (h + 1) // 2, (w + 1) // 2
    x = x.reshape(b, h2, 2, w2, 2, c).permute(0, 1, 3, 2, 4, 5)  # (B, h2, w2, dr, dc, C)
    return x.reshape(b, h2 * w2, 4 * c)


class MLPDownsample(nn.Module):
    """2x2 patch merge (4x fewer tokens), then LayerNorm-Linear-GELU-Linear (VILA `mlp_downsample`).

    Attributes:
        vision_dim: Width of the incoming visual features.
        llm_dim: Width of the output tokens.
        proj: ``Sequential(LayerNorm(4 * vision_dim), Linear(4 * vision_dim, llm_dim), GELU,
            Linear(llm_dim, llm_dim))``, applied after ``merge_2x2``.

    """

    def __init__(self, vision_dim: int, llm_dim: int) -> None:
        """Build the norm and MLP over merged tokens.

        Args:
            vision_dim: Width of the vision tower's patch features.
            llm_dim: Hidden size of the LLM.

        """
        super().__init__()
        self.vision_dim = vision_dim
        self.llm_dim = llm_dim
        self.proj = nn.Sequential(
            nn.LayerNorm(4 * vision_dim),
            nn.Linear(4 * vision_dim, llm_dim),
            nn.GELU(),
            nn.Linear(llm_dim, llm_dim),
        )

    def num_output_tokens(self, num_input_tokens: int, grid: tuple[int, int] | None = None) -> int:
        """Tokens emitted for an h x w grid: ceil(h / 2) * ceil(w / 2) (27x27=729 -> 196).

        Args:
            num_input_tokens: N, patch tokens per image (no CLS).
            grid: (h, w) when the grid is not square.

        Returns:
            ceil(h / 2) * ceil(w / 2).

        Raises:
            ValueError: When the grid cannot be resolved (see ``patch_grid``).

        """
        h, w = patch_grid(num_input_tokens, grid)
        return ((h + 1) // 2) * ((w + 1) // 2)

    def forward(self, features: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Merge 2x2 blocks and project.

        Args:
            features: (B, N, vision_dim) row-major patch features, N = h * w.
            grid: (h, w) when the grid is not square.

        Returns:
            (B, ceil(h / 2) * ceil(w / 2), llm_dim) tokens for the LLM.

        Raises:
            ValueError: On a wrong feature shape or an unresolvable grid.

        """
        check_features(features, self.vision_dim)
        h, w = patch_grid(features.shape[1], grid)
        return self.proj(merge_2x2(features, h, w))

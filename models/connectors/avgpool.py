"""Open-Qwen2VL avg-pool connector: adaptive 2D average pool to N tokens, then an MLP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .downsample import check_features, patch_grid


class AvgPoolMLP(nn.Module):
    """Pool the patch grid to sqrt(N) x sqrt(N) tokens, then Linear-GELU-Linear (Open-Qwen2VL).

    Open-Qwen2VL uses N = 144 in pretraining and N = 729 in SFT. The pool is
    ``adaptive_avg_pool2d``, so any input grid (square or not, larger or smaller than the
    target) gives exactly N tokens; pooling before the MLP keeps the MLP cost at N tokens.

    Attributes:
        vision_dim: Width of the incoming visual features.
        llm_dim: Width of the output tokens.
        num_tokens: N, tokens per image.
        side: sqrt(N), side of the pooled grid.
        proj: ``Sequential(Linear(vision_dim, llm_dim), GELU, Linear(llm_dim, llm_dim))``.

    """

    def __init__(self, vision_dim: int, llm_dim: int, num_tokens: int = 144) -> None:
        """Build the pooled-token MLP.

        Args:
            vision_dim: Width of the vision tower's patch features.
            llm_dim: Hidden size of the LLM.
            num_tokens: N, output tokens per image; must be a perfect square (144 = 12 x 12).

        Raises:
            ValueError: When ``num_tokens`` is not a positive perfect square.

        """
        super().__init__()
        side = math.isqrt(num_tokens) if num_tokens > 0 else 0
        if side == 0 or side * side != num_tokens:
            raise ValueError(
                f"AvgPoolMLP num_tokens must be a positive perfect square (144, 196, 729 ...), "
                f"got {num_tokens}"
            )
        self.vision_dim = vision_dim
        self.llm_dim = llm_dim
        self.num_tokens = num_tokens
        self.side = side
        self.proj = nn.Sequential(
            nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim)
        )

    def num_output_tokens(self, num_input_tokens: int, grid: tuple[int, int] | None = None) -> int:
        """Tokens emitted per image: always ``num_tokens``.

        Args:
            num_input_tokens: N_in, patch tokens per image (no CLS).
            grid: (h, w) when the input grid is not square.

        Returns:
            ``num_tokens``.

        Raises:
            ValueError: When the input grid cannot be resolved (see ``patch_grid``).

        """
        patch_grid(num_input_tokens, grid)
        return self.num_tokens

    def forward(self, features: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Pool and project.

        Args:
            features: (B, h * w, vision_dim) row-major patch features.
            grid: (h, w) when the grid is not square.

        Returns:
            (B, num_tokens, llm_dim) tokens, row-major over the pooled grid.

        Raises:
            ValueError: On a wrong feature shape or an unresolvable grid.

        """
        check_features(features, self.vision_dim)
        h, w = patch_grid(features.shape[1], grid)
        b, _, c = features.shape
        x = features.transpose(1, 2).reshape(b, c, h, w)
        x = F.adaptive_avg_pool2d(x, (self.side, self.side))  # (B, C, side, side)
        return self.proj(x.flatten(2).transpose(1, 2))

"""LLaVA/VILA `mlp2x_gelu` connector: Linear-GELU-Linear on every visual token."""

from __future__ import annotations

import torch
from torch import nn

from .downsample import check_features, patch_grid


class MLP2xGelu(nn.Module):
    """Project each visual token to the LLM width with Linear-GELU-Linear; keeps the token count.

    Attributes:
        vision_dim: Width of the incoming visual features.
        llm_dim: Width of the output tokens (the LLM hidden size).
        proj: ``Sequential(Linear(vision_dim, llm_dim), GELU, Linear(llm_dim, llm_dim))``.

    """

    def __init__(self, vision_dim: int, llm_dim: int) -> None:
        """Build the two linear layers.

        Args:
            vision_dim: Width of the vision tower's patch features.
            llm_dim: Hidden size of the LLM.

        """
        super().__init__()
        self.vision_dim = vision_dim
        self.llm_dim = llm_dim
        self.proj = nn.Sequential(
            nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim)
        )

    def num_output_tokens(self, num_input_tokens: int, grid: tuple[int, int] | None = None) -> int:
        """Tokens this connector emits for ``num_input_tokens`` patch tokens (the same number).

        Args:
            num_input_tokens: N, patch tokens per image (no CLS).
            grid: Optional (h, w); checked against N when given, otherwise unused.

        Returns:
            N.

        Raises:
            ValueError: When ``grid`` is given and h * w != N.

        """
        if grid is not None:
            patch_grid(num_input_tokens, grid)
        return num_input_tokens

    def forward(self, features: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Project patch features.

        Args:
            features: (B, N, vision_dim) patch features.
            grid: Optional (h, w) with h * w == N; checked, otherwise unused.

        Returns:
            (B, N, llm_dim) tokens for the LLM.

        Raises:
            ValueError: On a wrong feature shape, or when ``grid`` is given and h * w != N.

        """
        check_features(features, self.vision_dim)
        self.num_output_tokens(features.shape[1], grid)
        return self.proj(features)

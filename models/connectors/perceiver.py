"""Perceiver resampler connector: a fixed number of learned latents cross-attend to the patches."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .downsample import check_features, patch_grid


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, H * d) -> (B, H, L, d)."""
    b, n, _ = x.shape
    return x.reshape(b, n, heads, -1).transpose(1, 2)


class _ResamplerLayer(nn.Module):
    """Latents attend to [patches; latents] (Flamingo), then a feed-forward; both residual."""

    def __init__(self, dim: int, heads: int, ff_mult: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        self.ff = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, ff_mult * dim, bias=False),
            nn.GELU(),
            nn.Linear(ff_mult * dim, dim, bias=False),
        )

    def forward(self, latents: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
        """Update latents (B, L, D) from media (B, N, D); returns (B, L, D)."""
        lat = self.norm_latents(latents)
        kv = torch.cat([self.norm_media(media), lat], dim=1)  # (B, N + L, D)
        k, v = self.to_kv(kv).chunk(2, dim=-1)
        q, k, v = (_split_heads(t, self.heads) for t in (self.to_q(lat), k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, d)
        latents = latents + self.to_out(out.transpose(1, 2).flatten(2))
        return latents + self.ff(latents)


class PerceiverResampler(nn.Module):
    """Resample any number of patch tokens to ``num_latents`` tokens (Flamingo-style).

    Patches are first projected to ``llm_dim``; ``depth`` layers then let the learned latents
    attend to the concatenation of patches and latents, each followed by a feed-forward, and a
    final LayerNorm gives the output. No positional embedding is added: ViT patch features
    already carry their position.

    Attributes:
        vision_dim: Width of the incoming visual features.
        llm_dim: Width of the latents and the output tokens.
        num_latents: M, output tokens per image.
        proj_in: Linear(vision_dim, llm_dim) on the patches.
        latents: (M, llm_dim) learned queries.
        layers: ``depth`` resampler layers.
        norm: Final LayerNorm(llm_dim).

    """

    def __init__(
        self,
        vision_dim: int,
        llm_dim: int,
        num_latents: int = 64,
        depth: int = 2,
        heads: int = 8,
        ff_mult: int = 4,
    ) -> None:
        """Build the latents and layers.

        Args:
            vision_dim: Width of the vision tower's patch features.
            llm_dim: Hidden size of the LLM; also the resampler's width.
            num_latents: M, output tokens per image.
            depth: Number of cross-attention + feed-forward layers.
            heads: Attention heads; must divide ``llm_dim``.
            ff_mult: Feed-forward hidden width as a multiple of ``llm_dim``.

        Raises:
            ValueError: When ``heads`` does not divide ``llm_dim`` or a size is not positive.

        """
        super().__init__()
        if min(num_latents, depth, heads, ff_mult) < 1:
            raise ValueError("num_latents, depth, heads and ff_mult must all be >= 1")
        if llm_dim % heads:
            raise ValueError(f"heads={heads} must divide llm_dim={llm_dim}")
        self.vision_dim = vision_dim
        self.llm_dim = llm_dim
        self.num_latents = num_latents
        self.depth, self.heads, self.ff_mult = depth, heads, ff_mult
        self.proj_in = nn.Linear(vision_dim, llm_dim)
        self.latents = nn.Parameter(torch.randn(num_latents, llm_dim) * 0.02)
        self.layers = nn.ModuleList(_ResamplerLayer(llm_dim, heads, ff_mult) for _ in range(depth))
        self.norm = nn.LayerNorm(llm_dim)

    def num_output_tokens(self, num_input_tokens: int, grid: tuple[int, int] | None = None) -> int:
        """Tokens emitted per image: always ``num_latents``.

        Args:
            num_input_tokens: N, patch tokens per image (any N >= 1).
            grid: Optional (h, w); checked against N when given, otherwise unused.

        Returns:
            ``num_latents``.

        Raises:
            ValueError: When N < 1, or ``grid`` is given and h * w != N.

        """
        if num_input_tokens < 1:
            raise ValueError(f"need at least one patch token, got {num_input_tokens}")
        if grid is not None:
            patch_grid(num_input_tokens, grid)
        return self.num_latents

    def forward(self, features: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Resample patch features.

        Args:
            features: (B, N, vision_dim) patch features; any N, order does not matter.
            grid: Optional (h, w); checked against N when given, otherwise unused.

        Returns:
            (B, num_latents, llm_dim) tokens for the LLM.

        Raises:
            ValueError: On a wrong feature shape, or a ``grid`` that does not match N.

        """
        check_features(features, self.vision_dim)
        self.num_output_tokens(features.shape[1], grid)
        media = self.proj_in(features)
        latents = self.latents.expand(features.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(latents, media)
        return self.norm(latents)

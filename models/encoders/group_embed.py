"""SatMAE-style patch embedding: one projection per band group, one token per group and patch."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from timm.layers import trunc_normal_
from torch import nn


class GroupPatchEmbed(nn.Module):
    """Patch embedding for timm ``VisionTransformer(embed_layer=...)`` over band groups.

    Each group of input channels has its own ``Conv2d(len(group), embed_dim, p, stride=p)``
    that sees only that group's channels, plus a learned group embedding (trunc-normal, std
    0.02) added to all of the group's tokens. Tokens are group-major: every patch of group 0
    (row-major over the (h, w) patch grid), then every patch of group 1, and so on. Channels in
    no group are ignored (SatMAE drops B1, B9, B10).

    timm sees a ``(G * h, w)`` token grid, so its learned position embedding has one entry per
    (group, position) token. Only fixed input sizes are supported (no ``dynamic_img_size``,
    non-strict sizes or dynamic padding).

    Attributes:
        groups: Channel indices of each group.
        num_groups: G.
        patch_size: (p, p).
        img_size: (H, W) the model takes.
        spatial_grid: (h, w) = (H // p, W // p), the patch grid of one group.
        grid_size: (G * h, w), the token grid timm uses for its position embedding.
        num_patches: G * h * w tokens.
        proj: One ``Conv2d`` per group.
        group_embed: (G, D) learned group embedding.
        norm: Norm applied to every token (``Identity`` unless timm passes ``norm_layer``).
    """

    def __init__(
        self,
        groups: Sequence[Sequence[int]],
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        norm_layer: Callable[..., nn.Module] | None = None,
        flatten: bool = True,
        output_fmt: str | None = None,
        bias: bool = True,
        strict_img_size: bool = True,
        dynamic_img_pad: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Build one projection per group; the keyword arguments are those timm passes.

        Args:
            groups: Channel indices (into the ``in_chans`` input channels) of each group.
            img_size: Input size (int for square).
            patch_size: Patch side (int or a square tuple).
            in_chans: Input channel count C.
            embed_dim: Token width D.
            norm_layer: Optional norm over D applied to every token.
            flatten, output_fmt, strict_img_size, dynamic_img_pad: Must stay at their defaults
                (flattened NLC output, fixed input size).
            bias: Bias in the projections.
            device, dtype: Parameter placement.

        Raises:
            ValueError: Dynamic sizes or padding, non-square patches, or invalid groups.
        """
        super().__init__()
        if not strict_img_size or output_fmt is not None or not flatten or dynamic_img_pad:
            raise ValueError(
                "band-group patch embedding needs a fixed input size: drop dynamic_img_size / "
                "dynamic_img_pad (and strict_img_size=False) from model_kwargs"
            )
        p = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if p[0] != p[1]:
            raise ValueError(f"band-group patch embedding needs square patches, got {p}")
        self.groups = tuple(tuple(int(c) for c in g) for g in groups)
        flat = [c for g in self.groups for c in g]
        if not self.groups or any(not g for g in self.groups):
            raise ValueError(f"band groups must be non-empty, got {self.groups}")
        if len(set(flat)) != len(flat) or not all(0 <= c < in_chans for c in flat):
            raise ValueError(
                f"band groups {self.groups} must use distinct channels in [0, {in_chans})"
            )
        self.num_groups = len(self.groups)
        self.patch_size = p
        self.img_size = size
        self.spatial_grid = (size[0] // p[0], size[1] // p[1])
        self.grid_size = (self.num_groups * self.spatial_grid[0], self.spatial_grid[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.flatten = True
        self.strict_img_size = True
        self.dynamic_img_pad = False
        dd = {"device": device, "dtype": dtype}
        self.proj = nn.ModuleList(
            nn.Conv2d(len(g), embed_dim, kernel_size=p, stride=p, bias=bias, **dd)
            for g in self.groups
        )
        self.group_embed = nn.Parameter(torch.empty(self.num_groups, embed_dim, **dd))
        self.norm = norm_layer(embed_dim, **dd) if norm_layer else nn.Identity()
        for i, g in enumerate(self.groups):
            self.register_buffer(f"_index{i}", torch.tensor(g, device=device), persistent=False)
        self.init_weights()

    def init_weights(self) -> None:
        """Re-draw the group embedding (timm's ViT init calls this; the convs reset themselves)."""
        trunc_normal_(self.group_embed, std=0.02)

    def feat_ratio(self, as_scalar: bool = True) -> int | tuple[int, int]:
        """Pixels per token along each side (the patch size), as timm's ``PatchEmbed``."""
        return self.patch_size[0] if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """Token grid (G * H // p, W // p) for an (H, W) input."""
        h, w = img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]
        return self.num_groups * h, w

    def set_input_size(self, img_size: object = None, patch_size: object = None) -> None:
        """Resizing is not supported.

        Raises:
            ValueError: Always, unless nothing changes.
        """
        same_size = img_size is None or self.img_size == (
            (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        )
        same_patch = patch_size is None or self.feat_ratio(
            as_scalar=isinstance(patch_size, int)
        ) == (patch_size if isinstance(patch_size, int) else tuple(patch_size))
        if not (same_size and same_patch):
            raise ValueError("band-group patch embedding cannot change its input or patch size")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed every group's patches.

        Args:
            x: (B, C, H, W) images of the size the model was built for.

        Returns:
            (B, G * h * w, D) tokens, group-major, each row-major over the (h, w) grid.

        Raises:
            ValueError: Wrong input size.
        """
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"band-group patch embedding was built for {self.img_size} inputs, got "
                f"{tuple(x.shape[-2:])}"
            )
        tokens = []
        for i, proj in enumerate(self.proj):
            y = proj(x.index_select(1, getattr(self, f"_index{i}"))).flatten(2).transpose(1, 2)
            tokens.append(y + self.group_embed[i].to(y.dtype))
        return self.norm(torch.cat(tokens, dim=1))


def group_embed_layer(groups: Sequence[Sequence[int]]) -> Callable[..., GroupPatchEmbed]:
    """``embed_layer`` for timm ``VisionTransformer``: :class:`GroupPatchEmbed` over ``groups``.

    Args:
        groups: Channel indices of each band group (``mmpt.bands.resolve_groups``).

    Returns:
        A picklable factory that timm calls with its patch-embedding keyword arguments.
    """
    return functools.partial(GroupPatchEmbed, tuple(tuple(int(c) for c in g) for g in groups))

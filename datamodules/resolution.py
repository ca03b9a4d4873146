"""Dynamic resolution policies: image -> uint8 crops + patch grids, and token counts before decode.

Contract. A policy is a small picklable class built from YAML with plain typed arguments:

- ``policy(img) -> ImageCrops``: runs in the data workers; pixels stay uint8 (normalise per
  batch later with ``normalize_images``). ``ImageCrops.pixels`` is uint8 (n_crops, 3, H, W);
  H = W = the crop side for ``FixedResolution`` and ``AnyResTiles``, and for
  ``NativeResolution`` it is one crop whose H, W are multiples of the patch size (patchify it
  per batch, e.g. timm's ``patchify_image``, for NaFlexVit). ``grids[i]`` is the vision
  tower's patch grid (h, w) of crop i; ``row_end_tokens`` counts extra separator tokens.
- ``policy.num_tokens(width, height, tokens_for_grid) -> int``: the LLM tokens an image of that
  size will cost, from its size alone (no decode), so the packer can budget sequences.
  ``tokens_for_grid`` is the connector's count for one crop, e.g.
  ``lambda g: connector.num_output_tokens(g[0] * g[1], g)``. It always equals
  ``policy(img).num_tokens(tokens_for_grid)`` for an image of that size.

avg-pool-N has no policy class: it is ``FixedResolution`` + the ``AvgPoolMLP(num_tokens=N)``
connector, whose ``num_output_tokens`` is N for any grid, so ``FixedResolution.num_tokens``
already reports N. A separate class would duplicate that and add nothing.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from timm.data.naflex_transforms import get_image_size_for_seq

from mmpt.datamodules.transforms import ImageTransform

TokensForGrid = Callable[[tuple[int, int]], int]


@dataclass
class ImageCrops:
    """What a resolution policy emits for one image.

    Attributes:
        pixels: uint8 (n_crops, 3, H, W), crops in the order the LLM sees them.
        grids: Vision-tower patch grid (h, w) of each crop; ``len(grids) == n_crops``.
        row_end_tokens: Extra separator tokens (AnyRes row-end / newline tokens), else 0.
        tiles: AnyRes tile grid (rows, cols) of the tiled crops, else None.
        global_view: Whether crop 0 is a global view (AnyRes), not a tile.
    """

    pixels: torch.Tensor
    grids: list[tuple[int, int]]
    row_end_tokens: int = 0
    tiles: tuple[int, int] | None = None
    global_view: bool = False

    def num_tokens(self, tokens_for_grid: TokensForGrid) -> int:
        """LLM tokens: the connector's tokens for every crop plus the row-end tokens."""
        return sum(tokens_for_grid(g) for g in self.grids) + self.row_end_tokens


def header_size(data: bytes) -> tuple[int, int]:
    """(width, height) of encoded image bytes, read from the header without decoding pixels."""
    with Image.open(io.BytesIO(data)) as img:
        return img.size


def _to_uint8(img: Image.Image) -> torch.Tensor:
    """PIL image -> uint8 (3, H, W)."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


class FixedResolution:
    """One square crop: centre crop of the short side, bicubic resize to ``image_size``.

    Args:
        image_size: Output side S in pixels.
        patch_size: Vision-tower patch size; grid is (S // patch_size, S // patch_size).
    """

    def __init__(self, image_size: int = 384, patch_size: int = 14) -> None:
        self.image_size, self.patch_size = image_size, patch_size
        self._transform = ImageTransform(image_size, train=False)

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (h, w) of the single crop."""
        side = self.image_size // self.patch_size
        return (side, side)

    def __call__(self, img: Image.Image) -> ImageCrops:
        """Returns one crop, pixels uint8 (1, 3, S, S)."""
        return ImageCrops(self._transform(img).unsqueeze(0), [self.grid])

    def num_tokens(self, width: int, height: int, tokens_for_grid: TokensForGrid) -> int:
        """Tokens for any image size: ``tokens_for_grid(grid)``."""
        return tokens_for_grid(self.grid)


class AnyResTiles:
    """LLaVA-NeXT AnyRes: best tile grid, resize to fit, pad, split; optional global view.

    Grid choice: every (rows, cols) with rows * cols <= ``max_tiles`` gives a canvas of
    (cols * T) x (rows * T) pixels (T = ``tile_size``). The image is scaled to fit the canvas
    keeping aspect; the grid maximising the effective resolution min(scaled w * h, w * h) wins,
    ties broken by the least wasted canvas area (canvas area - effective), then by the first in
    (rows, cols) ascending order. The image is resized (bicubic) to fit, centred on the canvas
    padded with ``pad_color`` (default black, as LLaVA-NeXT), and split row-major into tiles.

    The global view (when on) is the whole image squashed to T x T (LLaVA-NeXT) and comes
    FIRST. Row-end tokens (when on) count one per row of vision-tower patches across the tiled
    canvas: rows * (T // patch_size). They do not depend on the connector (a 2x2-merging
    connector still gets one per tower patch row) and the global view gets none.

    Args:
        tile_size: Tile side T in pixels.
        patch_size: Vision-tower patch size.
        max_tiles: Most tiles in the grid (the global view is not counted).
        global_view: Prepend the whole image resized to one tile.
        row_end_token: Add one separator token per tower patch row of the tiled canvas.
        pad_color: RGB of the padding.
    """

    def __init__(
        self,
        tile_size: int = 336,
        patch_size: int = 14,
        max_tiles: int = 6,
        global_view: bool = True,
        row_end_token: bool = True,
        pad_color: tuple[int, int, int] = (0, 0, 0),
    ) -> None:
        if max_tiles < 1:
            raise ValueError(f"max_tiles must be >= 1, got {max_tiles}")
        self.tile_size, self.patch_size, self.max_tiles = tile_size, patch_size, max_tiles
        self.global_view, self.row_end_token = global_view, row_end_token
        self.pad_color = tuple(pad_color)

    def candidate_grids(self) -> list[tuple[int, int]]:
        """All (rows, cols) with rows * cols <= max_tiles, rows then cols ascending."""
        n = self.max_tiles
        return [(r, c) for r in range(1, n + 1) for c in range(1, n // r + 1)]

    def select_grid(self, width: int, height: int) -> tuple[int, int]:
        """The (rows, cols) tile grid for a ``width`` x ``height`` image (see class doc)."""
        best, best_eff, best_waste = (1, 1), -1, math.inf
        for rows, cols in self.candidate_grids():
            cw, ch = cols * self.tile_size, rows * self.tile_size
            scale = min(cw / width, ch / height)
            eff = min(int(width * scale) * int(height * scale), width * height)
            waste = cw * ch - eff
            if eff > best_eff or (eff == best_eff and waste < best_waste):
                best, best_eff, best_waste = (rows, cols), eff, waste
        return best

    def canvas(self, img: Image.Image, grid: tuple[int, int]) -> Image.Image:
        """``img`` resized to fit the grid's canvas keeping aspect, centred, padded (RGB)."""
        rows, cols = grid
        cw, ch = cols * self.tile_size, rows * self.tile_size
        w, h = img.size
        if cw / w < ch / h:
            nw, nh = cw, min(math.ceil(h * cw / w), ch)
        else:
            nw, nh = min(math.ceil(w * ch / h), cw), ch
        resized = img.convert("RGB").resize((nw, nh), Image.Resampling.BICUBIC)
        out = Image.new("RGB", (cw, ch), self.pad_color)
        out.paste(resized, ((cw - nw) // 2, (ch - nh) // 2))
        return out

    def _grids_and_row_ends(self, grid: tuple[int, int]) -> tuple[list[tuple[int, int]], int]:
        side = self.tile_size // self.patch_size
        n_crops = grid[0] * grid[1] + int(self.global_view)
        row_ends = grid[0] * side if self.row_end_token else 0
        return [(side, side)] * n_crops, row_ends

    def __call__(self, img: Image.Image) -> ImageCrops:
        """Tiles (global view first); pixels uint8 (global_view + rows * cols, 3, T, T)."""
        img = img.convert("RGB")
        grid = self.select_grid(*img.size)
        t = self.tile_size
        canvas = _to_uint8(self.canvas(img, grid))  # (3, rows * T, cols * T)
        rows, cols = grid
        tiles = canvas.view(3, rows, t, cols, t).permute(1, 3, 0, 2, 4).reshape(-1, 3, t, t)
        if self.global_view:
            glob = _to_uint8(img.resize((t, t), Image.Resampling.BICUBIC))
            tiles = torch.cat([glob.unsqueeze(0), tiles])
        grids, row_ends = self._grids_and_row_ends(grid)
        return ImageCrops(tiles.contiguous(), grids, row_ends, grid, self.global_view)

    def num_tokens(self, width: int, height: int, tokens_for_grid: TokensForGrid) -> int:
        """Tokens for a ``width`` x ``height`` image: crops' connector tokens + row-ends."""
        grids, row_ends = self._grids_and_row_ends(self.select_grid(width, height))
        return sum(tokens_for_grid(g) for g in grids) + row_ends


class NativeResolution:
    """NaFlex / NaViT native resolution: one crop, aspect kept, at most ``max_num_patches``.

    The target size comes from timm's ``get_image_size_for_seq`` (what NaFlexVit's transforms
    use): the largest scale whose patch-rounded size (each side rounded UP to a multiple of the
    patch size, at least one patch) fits the budget. Sides are rounded independently, so the
    aspect ratio is kept up to one patch. Small images are upscaled to fill the budget unless
    ``max_upscale`` caps the scale. Pixels are one uint8 (1, 3, gh * p, gw * p) crop; patchify
    it per batch for NaFlexVit.

    Args:
        patch_size: Vision-tower patch size p.
        max_num_patches: Patch budget; the grid (gh, gw) has gh * gw <= max_num_patches.
        max_upscale: Optional cap on the scale factor (1.0 = never upscale).
    """

    def __init__(
        self, patch_size: int = 16, max_num_patches: int = 256, max_upscale: float | None = None
    ) -> None:
        self.patch_size, self.max_num_patches, self.max_upscale = (
            patch_size,
            max_num_patches,
            max_upscale,
        )

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """Patch grid (gh, gw) for a ``width`` x ``height`` image.

        Raises:
            ValueError: From timm when the image needs a scale outside (1e-6, 100).
        """
        _, (th, tw) = get_image_size_for_seq(
            (height, width), self.patch_size, self.max_num_patches, max_ratio=self.max_upscale
        )
        return (th // self.patch_size, tw // self.patch_size)

    def __call__(self, img: Image.Image) -> ImageCrops:
        """One crop, pixels uint8 (1, 3, gh * p, gw * p)."""
        gh, gw = self.grid(*img.size)
        size = (gw * self.patch_size, gh * self.patch_size)
        out = img.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        return ImageCrops(_to_uint8(out).unsqueeze(0), [(gh, gw)])

    def num_tokens(self, width: int, height: int, tokens_for_grid: TokensForGrid) -> int:
        """Tokens for a ``width`` x ``height`` image: ``tokens_for_grid(grid(width, height))``."""
        return tokens_for_grid(self.grid(width, height))

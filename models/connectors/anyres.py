"""AnyRes layout of an image's connector tokens: tiles stitched into one canvas, row-end tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mmpt.batch import ImageLayout


def arrange_crops(
    crops: list[torch.Tensor], layout: ImageLayout, newline: torch.Tensor | None
) -> torch.Tensor:
    """One image's LLM tokens from its crops' connector tokens, as the data laid them out.

    Without row-end tokens the crops are concatenated. With them (LLaVA-NeXT AnyRes), the
    tiles' token grids are stitched into one (rows * h, cols * w) canvas and ``newline`` ends
    every canvas row; a global view stays first, unchanged.

    Args:
        crops: (N_i, D) tokens of each crop, in the layout's order (global view first).
        layout: The image's layout from the data (tiles, per-crop grids, row-end count).
        newline: (D,) learned row-end embedding, or None when the model has none.

    Returns:
        (K, D) tokens, K the image's token count in the packed row.

    Raises:
        ValueError: Row-end tokens without a ``newline`` or tiles, or a count that does not
            match the canvas.
    """
    if not layout.row_end_tokens:
        return torch.cat(crops)
    if newline is None or layout.tiles is None:
        raise ValueError("row-end tokens in the data but the model has no image_newline")
    start = int(layout.global_view)
    rows, cols = layout.tiles
    h, w = layout.grids[start]
    if rows * h != layout.row_end_tokens:
        raise ValueError(f"{layout.row_end_tokens} row-end tokens for {rows} x {h} rows")
    dim = crops[0].shape[-1]
    canvas = torch.stack(crops[start:]).view(rows, cols, h, w, dim)
    canvas = canvas.permute(0, 2, 1, 3, 4).reshape(rows * h, cols * w, dim)
    canvas = torch.cat([canvas, newline.to(canvas.dtype).expand(rows * h, 1, dim)], dim=1)
    return torch.cat([*crops[:start], canvas.reshape(-1, dim)])

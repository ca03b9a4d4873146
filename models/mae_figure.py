"""Figures of MAE reconstructions: masked input, reconstruction and original per image."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from mmpt.bands import display_channels
from mmpt.eval.report import new_figure
from mmpt.preprocess import ImagePreprocess


def _shown_channels(pre: ImagePreprocess) -> list[int]:
    """Channels drawn as red, green, blue."""
    if pre.bands is None and pre.channels == 3:
        return [0, 1, 2]
    return list(display_channels(pre.bands or tuple(str(i) for i in range(pre.channels))))


def display_tiles(
    columns: Sequence[torch.Tensor], pre: ImagePreprocess, reference: int = -1
) -> list[torch.Tensor]:
    """Turn images in pixel units (normalisation undone) into RGB tiles to draw.

    RGB images (``pre.bands`` None, 3 channels) are clipped to [0, 1]. Multispectral ones show
    :func:`mmpt.bands.display_channels` as red, green, blue, stretched per image so that the
    2nd-98th percentile of those three bands in ``columns[reference]`` maps to [0, 1]; the
    same stretch applies to every column of an image.

    Args:
        columns: (B, C, H, W) images each, e.g. masked input, reconstruction, original.
        pre: The encoder's image preprocessing (bands, channel count).
        reference: Column whose percentiles set the stretch.

    Returns:
        (B, H, W, 3) float tiles in [0, 1], one per column.
    """
    rgb = _shown_channels(pre)
    if pre.bands is None and pre.channels == 3:
        return [c.float().clamp(0, 1).permute(0, 2, 3, 1) for c in columns]
    ref = columns[reference][:, rgb].float().flatten(1)
    lo, hi = (ref.quantile(q, dim=1).view(-1, 1, 1, 1) for q in (0.02, 0.98))
    scale = (hi - lo).clamp_min(1e-6)
    return [((c[:, rgb].float() - lo) / scale).clamp(0, 1).permute(0, 2, 3, 1) for c in columns]


def reconstruction_figure(
    images: torch.Tensor,
    rec: torch.Tensor,
    mask_images: torch.Tensor,
    pre: ImagePreprocess,
    title: str = "",
) -> Figure:
    """Grid of masked input, reconstruction and original, one row per image.

    Masked pixels of the input are drawn mid-grey.

    Args:
        images: (B, C, H, W) normalised images.
        rec: (B, C, H, W) reconstructions in pixel units (``MAEModule.reconstruct``).
        mask_images: (B, 1 or C, H, W), 1 = masked.
        pre: The encoder's image preprocessing (mean/std, bands).
        title: Figure title.

    Returns:
        A matplotlib figure (Agg canvas).
    """
    mean, std = (images.new_tensor(v).view(1, -1, 1, 1) for v in (pre.mean, pre.std))
    original = images * std + mean
    masked, recon, orig = display_tiles([original, rec, original], pre)
    hidden = mask_images.expand(-1, images.shape[1], -1, -1)[:, _shown_channels(pre)]
    masked = torch.where(hidden.permute(0, 2, 3, 1) > 0, 0.5, masked)
    rows = images.shape[0]
    fig = new_figure(3 * 2.0, rows * 2.0 + 0.4)
    axes = fig.subplots(rows, 3, squeeze=False)
    for i in range(rows):
        for j, (tile, name) in enumerate(
            zip((masked, recon, orig), ("masked input", "reconstruction", "original"), strict=True)
        ):
            axes[i][j].imshow(tile[i].cpu().numpy(), interpolation="nearest")
            axes[i][j].set_axis_off()
            if i == 0:
                axes[i][j].set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def figure_pixels(fig: Figure) -> torch.Tensor:
    """Render ``fig`` (Agg canvas) to a uint8 (H, W, 3) tensor, e.g. for TensorBoard."""
    fig.canvas.draw()
    return torch.from_numpy(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())

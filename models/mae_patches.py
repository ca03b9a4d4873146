"""MAE building blocks: random-shuffle masking, (un)patchify and the masked pixel loss."""

from __future__ import annotations

import math

import torch


def random_masking(
    x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a random subset of tokens per sample (random-shuffle masking).

    Args:
        x: (B, N, D) tokens.
        mask_ratio: Fraction of tokens to mask; every sample keeps ``int(N * (1 - ratio))``.
        generator: Optional RNG on ``x.device`` for reproducible masks.

    Returns:
        x_visible: (B, N_keep, D) kept tokens, in shuffled order.
        mask: (B, N) float, 1 = masked, in the original token order.
        ids_restore: (B, N) long; ``gather(cat(visible, masked), 1, ids_restore)`` restores the
            original order.
    """
    b, n, d = x.shape
    keep = int(n * (1 - mask_ratio))
    ids_shuffle = torch.rand(b, n, device=x.device, generator=generator).argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    x_visible = x.gather(1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
    mask = torch.ones(b, n, device=x.device, dtype=x.dtype)
    mask[:, :keep] = 0
    return x_visible, mask.gather(1, ids_restore), ids_restore


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """Split (B, C, H, W) images (H, W divisible by ``p``) into p x p patches.

    Returns:
        (B, N, p * p * C) patches, row-major over the (H / p, W / p) grid, each flattened in
        (row, column, channel) order.
    """
    b, c, h, w = imgs.shape
    x = imgs.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, N, p * p * C) -> (B, C, h * p, w * p).

    ``grid`` is the patch grid (h, w) with h * w = N; a square one when None.
    """
    b, n, dim = x.shape
    h, w = grid = grid or (math.isqrt(n), math.isqrt(n))
    if h * w != n or dim % (p * p):
        raise ValueError(f"{n} patches of width {dim} do not fit grid {grid} and patch {p}")
    c = dim // (p * p)
    x = x.reshape(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, h * p, w * p)


def normalize_patches(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``(t - mean) / sqrt(var + eps)`` per patch (last dim); unbiased var as in MAE."""
    mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps) ** 0.5


def patch_errors(pred: torch.Tensor, target: torch.Tensor, norm_pix: bool = True) -> torch.Tensor:
    """Mean squared error of every patch, in the inputs' dtype and at least float32.

    Half-precision predictions (autocast) are compared in float32; float64 stays float64.

    Args:
        pred: (B, N, p * p * C) predicted patches.
        target: (B, N, p * p * C) patches of the input (:func:`patchify`).
        norm_pix: Compare with per-patch normalised target pixels (:func:`normalize_patches`).

    Returns:
        (B, N) per-patch MSE.
    """
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    target = target.to(dtype)
    if norm_pix:
        target = normalize_patches(target)
    return (pred.to(dtype) - target).pow(2).mean(dim=-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, N) ``values`` over the entries where the (B, N) ``mask`` is 1 (scalar).

    The result has ``values``' dtype.
    """
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def mae_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True
) -> torch.Tensor:
    """Mean squared error on masked patches only.

    Args:
        pred: (B, N, p * p * C) predicted patches.
        target: (B, N, p * p * C) patches of the input (:func:`patchify`).
        mask: (B, N), 1 = masked (counted), 0 = visible (ignored).
        norm_pix: Compare with per-patch normalised target pixels (:func:`normalize_patches`).

    Returns:
        Scalar, the per-patch MSE averaged over the masked patches.
    """
    return masked_mean(patch_errors(pred, target, norm_pix), mask)

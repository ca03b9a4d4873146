"""Shared parts of the contrastive losses: a learnable, clamped logit scale and input checks."""

from __future__ import annotations

import torch
from torch import nn


class ScaledContrastiveLoss(nn.Module):
    """Base of losses whose logits are ``exp(logit_scale) * cosine similarity``.

    Args:
        init_logit_scale: Initial ``logit_scale`` (log space).
        max_logit_scale: Upper clamp of ``logit_scale``, applied by :meth:`clamp_`.
        learnable_scale: Train the scale (False freezes it).
    """

    def __init__(
        self, init_logit_scale: float, max_logit_scale: float, learnable_scale: bool = True
    ) -> None:
        super().__init__()
        self.max_logit_scale = max_logit_scale
        self.logit_scale = nn.Parameter(
            torch.tensor(float(init_logit_scale)), requires_grad=learnable_scale
        )

    @property
    def scale(self) -> torch.Tensor:
        """Tensor (): the multiplier ``exp(logit_scale)``, detached, for logging."""
        return self.logit_scale.detach().exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp ``logit_scale`` in place into ``[0, max_logit_scale]`` (after each step)."""
        self.logit_scale.clamp_(0.0, self.max_logit_scale)


def check_pair(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    """Raise ``ValueError`` unless both are (B, D) with identical shapes."""
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            "expected image and text features of the same shape (B, D), got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )


def fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half/bfloat16 to float32; float32 and float64 pass through."""
    return x.to(torch.promote_types(x.dtype, torch.float32))

"""CLIP's symmetric InfoNCE loss with a learnable, clamped temperature, exact under DDP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmpt.models.losses.gather import gather_with_grad, world_info


class ClipLoss(nn.Module):
    """Symmetric InfoNCE (image->text and text->image cross-entropy), as in CLIP.

    With ``s = exp(logit_scale)`` and a global batch of N = W*B pairs, the loss is::

        L = ( CE(s * I @ T.T, arange(N)) + CE(s * T @ I.T, arange(N)) ) / 2

    with CE averaged over rows. Under data parallelism each rank gathers both feature sets
    with gradient and computes only its own B rows against all N columns (B x N logits,
    labels ``arange(B) + rank*B``). The per-row mean over the B local rows is the average of
    the global per-row terms over this rank's rows, so the mean over ranks of the local
    losses equals ``L`` exactly; with DDP's gradient averaging, every gradient is that of
    ``L`` (see ``gather_with_grad``). Local batch sizes must be equal across ranks.

    The temperature lives in log space; call ``clamp_()`` after every optimizer step to keep
    ``logit_scale`` in ``[0, max_logit_scale]`` (CLIP caps the scale at 100).

    Args:
        init_logit_scale: Initial ``logit_scale`` (log of the multiplier), ln(1/0.07).
        max_logit_scale: Upper bound applied by ``clamp_()``, ln(100).
        learnable_scale: If False, ``logit_scale`` is a frozen parameter.

    """

    def __init__(
        self,
        init_logit_scale: float = math.log(1 / 0.07),
        max_logit_scale: float = math.log(100),
        learnable_scale: bool = True,
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
        """Clamp ``logit_scale`` in place into ``[0, max_logit_scale]``."""
        self.logit_scale.clamp_(0.0, self.max_logit_scale)

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, gather: bool = True
    ) -> torch.Tensor:
        """Compute this rank's share of the symmetric contrastive loss.

        Args:
            image_features: Tensor (B, D), L2-normalised image embeddings (not normalised
                here; cosine similarity is assumed).
            text_features: Tensor (B, D), L2-normalised text embeddings; row i pairs with
                image row i.
            gather: Contrast against every rank's batch (training). False computes the loss
                on this rank's batch alone, with no collective (validation, where ranks may
                hold different batch sizes and counts).

        Returns:
            Scalar tensor: the local loss; its mean over ranks is the global-batch loss.
            Computed in float32 (float64 for float64 inputs) with autocast disabled.

        """
        _check_pair(image_features, text_features)
        rank, _ = world_info() if gather else (0, 1)
        b = image_features.shape[0]
        all_images = (
            gather_with_grad(image_features) if gather else image_features
        )  # gathered in the input dtype
        all_texts = gather_with_grad(text_features, check_sizes=False) if gather else text_features
        # Logits in fp32 even under autocast: at scale 100 bf16 logits are 0.5 apart.
        with torch.autocast(image_features.device.type, enabled=False):
            scale = _fp32(self.logit_scale).exp()
            logits_per_image = scale * _fp32(image_features) @ _fp32(all_texts).T  # (B, W*B)
            logits_per_text = scale * _fp32(text_features) @ _fp32(all_images).T  # (B, W*B)
            labels = torch.arange(b, device=image_features.device) + rank * b
            return (
                F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)
            ) / 2


def _check_pair(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    """Raise ``ValueError`` unless both are (B, D) with identical shapes."""
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            "expected image and text features of the same shape (B, D), got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half/bfloat16 to float32; float32 and float64 pass through."""
    return x.to(torch.promote_types(x.dtype, torch.float32))

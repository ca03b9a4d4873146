"""CLIP's symmetric InfoNCE loss with a learnable, clamped temperature, exact under DDP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mmpt.models.losses.base import ScaledContrastiveLoss, check_pair, fp32
from mmpt.models.losses.gather import gather_with_grad, world_info


class ClipLoss(ScaledContrastiveLoss):
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
        super().__init__(init_logit_scale, max_logit_scale, learnable_scale)

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
        check_pair(image_features, text_features)
        rank, _ = world_info() if gather else (0, 1)
        b = image_features.shape[0]
        all_images = (
            gather_with_grad(image_features) if gather else image_features
        )  # gathered in the input dtype
        all_texts = gather_with_grad(text_features, check_sizes=False) if gather else text_features
        # Logits in fp32 even under autocast: at scale 100 bf16 logits are 0.5 apart.
        with torch.autocast(image_features.device.type, enabled=False):
            scale = fp32(self.logit_scale).exp()
            logits_per_image = scale * fp32(image_features) @ fp32(all_texts).T  # (B, W*B)
            logits_per_text = scale * fp32(text_features) @ fp32(all_images).T  # (B, W*B)
            labels = torch.arange(b, device=image_features.device) + rank * b
            return (
                F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)
            ) / 2

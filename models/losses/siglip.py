"""SigLIP's pairwise sigmoid loss with learnable scale and bias, exact under DDP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmpt.models.losses.base import ScaledContrastiveLoss, check_pair, fp32
from mmpt.models.losses.gather import gather_with_grad, world_info


class SigLipLoss(ScaledContrastiveLoss):
    """Pairwise sigmoid loss (SigLIP, Zhai et al. 2023).

    With ``s = exp(logit_scale)``, bias ``b`` and labels ``z_ij = +1`` if i == j else -1,
    the single-process loss on a batch of N pairs is::

        L = -1/N * sum_{i,j} logsigmoid(z_ij * (s * I_i . T_j + b))

    Under data parallelism (W ranks, B = N/W local pairs) each rank gathers the texts with
    gradient and computes its B image rows against all N texts, the +1 block sitting at
    columns ``[rank*B, (rank+1)*B)``, and divides the sum by its local B. The ranks' row
    blocks partition the N x N matrix, so ``sum_k B * L_k = N * L``, i.e.
    ``mean_k L_k = L``: the mean over ranks of the local losses is the global loss, and
    with DDP's gradient averaging every gradient is that of ``L``. Local batch sizes must
    be equal across ranks. Images need no gather: each image row lives on one rank.

    Call ``clamp_()`` after every optimizer step to keep ``logit_scale`` in
    ``[0, max_logit_scale]``; the bias is not clamped.

    Args:
        init_logit_scale: Initial ``logit_scale`` (log of the multiplier), ln(10).
        init_bias: Initial ``logit_bias``, -10.
        max_logit_scale: Upper bound applied by ``clamp_()``, ln(100).

    """

    def __init__(
        self,
        init_logit_scale: float = math.log(10),
        init_bias: float = -10.0,
        max_logit_scale: float = math.log(100),
    ) -> None:
        super().__init__(init_logit_scale, max_logit_scale)
        self.logit_bias = nn.Parameter(torch.tensor(float(init_bias)))

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, gather: bool = True
    ) -> torch.Tensor:
        """Compute this rank's share of the sigmoid loss.

        Args:
            image_features: Tensor (B, D), L2-normalised image embeddings (not normalised
                here; cosine similarity is assumed).
            text_features: Tensor (B, D), L2-normalised text embeddings; row i pairs with
                image row i.
            gather: Contrast against every rank's batch (training). False computes the loss
                on this rank's batch alone, with no collective (validation, where ranks may
                hold different batch sizes and counts).

        Returns:
            Scalar tensor: the local loss (sum over the B x W*B logits divided by B);
            its mean over ranks is the global-batch loss. Computed in float32 (float64 for
            float64 inputs) with autocast disabled.

        """
        check_pair(image_features, text_features)
        rank, _ = world_info() if gather else (0, 1)
        b = image_features.shape[0]
        all_texts = (
            gather_with_grad(text_features) if gather else text_features
        )  # (W*B, D), gathered in the input dtype
        # fp32 even under autocast: bf16 logits are coarse and a bf16 sum of B*W*B terms worse.
        with torch.autocast(image_features.device.type, enabled=False):
            scale = fp32(self.logit_scale).exp()
            logits = scale * fp32(image_features) @ fp32(all_texts).T + fp32(self.logit_bias)
            rows = torch.arange(b, device=logits.device) + rank * b
            cols = torch.arange(all_texts.shape[0], device=logits.device)
            labels = 2 * (rows[:, None] == cols[None, :]).to(logits.dtype) - 1  # (B, W*B)
            return -F.logsigmoid(labels * logits).sum() / b

"""MIL-NCE (Miech et al. 2020): contrastive loss with a bag of candidate captions per clip."""

from __future__ import annotations

import math

import torch

from mmpt.models.losses.base import ScaledContrastiveLoss, fp32
from mmpt.models.losses.gather import gather_with_grad, world_info


def _masked_logsumexp(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log-sum-exp over the last dim of ``x`` where ``mask`` is True: (..., M) -> (...)."""
    return torch.logsumexp(x.masked_fill(~mask, float("-inf")), dim=-1)


class MILNCELoss(ScaledContrastiveLoss):
    """MIL-NCE over each clip's candidate captions (the loss UniVL's joint objective uses).

    Clip ``i`` has a bag ``P_i`` of candidate captions (its ASR segment and neighbouring
    ones, or several paraphrases), any of which may describe it. With ``s = exp(logit_scale)``,
    ``S[k, j] = s * v_k . t_j`` over the global batch of N clips and M captions, and
    ``P_i = {j : text_to_video[j] == i}``, the loss is, as in the reference implementation
    (antoine77340/MIL-NCE_HowTo100M, ``loss.py``)::

        L = mean_i [ logsumexp( S[i, :] ++ S[:, P_i] ) - logsumexp( S[i, P_i] ) ]

    The denominator holds every caption against clip ``i`` and every clip against clip
    ``i``'s captions (so the positives appear in both halves, as in the reference). With one
    caption per clip this is a sum of the two InfoNCE directions in a single softmax.

    Under data parallelism every rank gathers clips and captions with gradient and computes
    the terms of its own clips (see :class:`~mmpt.models.losses.ClipLoss`); local clip and
    caption counts must be equal across ranks.

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
        self,
        video_features: torch.Tensor,
        text_features: torch.Tensor,
        text_to_video: torch.Tensor,
        gather: bool = True,
    ) -> torch.Tensor:
        """This rank's share of the MIL-NCE loss.

        Args:
            video_features: (N, D) L2-normalised clip embeddings.
            text_features: (M, D) L2-normalised caption embeddings.
            text_to_video: Long (M,), the clip (row of ``video_features``) of each caption.
            gather: Contrast against every rank's batch (training); False: this rank alone.

        Returns:
            Scalar float32 tensor (float64 for float64 inputs).

        Raises:
            ValueError: Mismatched shapes, an owner out of range, or a clip without caption.
        """
        n, m = video_features.shape[0], text_features.shape[0]
        owner = text_to_video.to(video_features.device, torch.long)
        if video_features.ndim != 2 or text_features.ndim != 2 or owner.shape != (m,):
            raise ValueError(
                f"expected videos (N, D), texts (M, D) and text_to_video (M,), got "
                f"{tuple(video_features.shape)}, {tuple(text_features.shape)}, "
                f"{tuple(owner.shape)}"
            )
        if m and (owner.min() < 0 or owner.max() >= n):
            raise ValueError(f"text_to_video holds clip indices outside [0, {n})")
        if torch.bincount(owner, minlength=n).min() == 0:
            raise ValueError("every clip needs at least one candidate caption for MIL-NCE")
        rank, _ = world_info() if gather else (0, 1)
        all_v = gather_with_grad(video_features) if gather else video_features
        all_t = gather_with_grad(text_features) if gather else text_features
        all_owner = gather_with_grad(owner + rank * n, check_sizes=False) if gather else owner
        rows = torch.arange(n, device=owner.device) + rank * n
        with torch.autocast(video_features.device.type, enabled=False):
            scale = fp32(self.logit_scale).exp()
            v2t = scale * fp32(video_features) @ fp32(all_t).T  # (N, M_all)
            t2v = scale * fp32(all_v) @ fp32(text_features).T  # (N_all, M)
            positive = all_owner[None, :] == rows[:, None]  # (N, M_all)
            numerator = _masked_logsumexp(v2t, positive)
            # logsumexp over clips k and captions j in P_i of t2v[k, j], per clip i
            own = owner[None, :] == torch.arange(n, device=owner.device)[:, None]  # (N, M)
            columns = _masked_logsumexp(torch.logsumexp(t2v, dim=0).expand(n, -1), own)
            denominator = torch.logaddexp(torch.logsumexp(v2t, dim=-1), columns)
            return (denominator - numerator).mean()

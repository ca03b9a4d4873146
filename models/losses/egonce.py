"""EgoNCE (EgoVLP): InfoNCE with noun-and-verb positives, fixed temperature, exact under DDP."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from mmpt.models.losses.base import check_pair, fp32
from mmpt.models.losses.gather import gather_with_grad, world_info


def _presence(tags: torch.Tensor) -> torch.Tensor:
    """Multi-hot tags (bool, int or float) as float32 0/1 (any non-zero entry counts)."""
    return (tags != 0).to(torch.float32)


def _check_tags(name: str, tags: torch.Tensor, batch: int) -> None:
    """Raise ``ValueError`` unless ``tags`` is (B, N) with B == ``batch``."""
    if tags.ndim != 2 or tags.shape[0] != batch:
        raise ValueError(
            f"expected {name} of shape ({batch}, N) (multi-hot, one row per pair), "
            f"got {tuple(tags.shape)}"
        )


class EgoNCELoss(nn.Module):
    """Symmetric InfoNCE whose positives are all pairs sharing a noun AND a verb (EgoVLP).

    Lin et al. 2022, "Egocentric Video-Language Pretraining". With a global batch of N
    pairs, ``S = V @ T.T / temperature`` (N x N) and the positive mask ``P`` with
    ``P[i, j] = (nouns_i . nouns_j > 0) and (verbs_i . verbs_j > 0)`` or ``i == j``, each row
    contributes the negative log of the softmax mass that falls on its positives (the sum
    over positives sits INSIDE the log, as in EgoVLP's ``model/loss.py``)::

        v2t_i = -log( sum_j P_ij exp(S_ij) / sum_j exp(S_ij) )
        t2v_j = -log( sum_i P_ij exp(S_ij) / sum_i exp(S_ij) )
        L = mean_i v2t_i + mean_j t2v_j          (combine="sum", EgoVLP's "t2v + v2t")
        L = (mean_i v2t_i + mean_j t2v_j) / 2    (combine="mean", ClipLoss's convention)

    ``P`` is symmetric, so swapping the video and text features leaves ``L`` unchanged; if
    no two pairs share both a noun and a verb, ``P`` is the identity and ``L`` is CLIP's
    InfoNCE at the fixed scale ``1 / temperature`` (twice ``ClipLoss`` with "sum").

    Scene-aware negatives. EgoVLP appends, for every sampled clip, one more clip from the
    same video starting within 60 s of it, with its own narration and tags. The loss takes
    them as ordinary pairs: the datamodule concatenates the B anchors and their B
    neighbours into one batch of 2B pairs (``video``, ``text``, ``nouns`` and ``verbs``
    all concatenated the same way; the order of rows does not matter) and passes that
    batch here. The neighbours are regular rows: their own v2t and t2v terms count in the
    means, and they are negatives for their anchor only through their presence in the
    softmax denominators; a neighbour whose narration shares a noun and a verb with its
    anchor is a positive by the rule above, exactly as in EgoVLP. Under DDP every rank must
    hold the same number of rows (2B).

    Distributed: video and text features are gathered with gradient, the tags (no
    gradient) in one more gather; each rank computes its own rows against all N columns,
    both directions, and the mean over its rows. The ranks' rows partition the N rows (and
    ``P`` is symmetric, so the t2v rows of rank r use ``P``'s rows r too), so the mean
    over ranks of the local losses is ``L`` and, with DDP's averaging, every gradient is
    that of ``L`` (see ``gather_with_grad``).

    The temperature is a plain float, neither a parameter nor a buffer, so no optimizer,
    freeze list or checkpoint can change it.

    Args:
        temperature: Softmax temperature, 0.05 in EgoVLP. Fixed.
        combine: How the two directions are combined: "sum" (EgoVLP) or "mean".

    """

    def __init__(self, temperature: float = 0.05, combine: Literal["sum", "mean"] = "sum") -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if combine not in ("sum", "mean"):
            raise ValueError(f"combine must be 'sum' or 'mean', got {combine!r}")
        self.temperature = float(temperature)
        self.combine = combine

    @property
    def scale(self) -> torch.Tensor:
        """Tensor (): the fixed logit multiplier ``1 / temperature``, for logging."""
        return torch.tensor(1.0 / self.temperature)

    def clamp_(self) -> None:
        """No-op: the temperature is fixed (same interface as the learnable-scale losses)."""

    def positive_mask(self, nouns: torch.Tensor, verbs: torch.Tensor) -> torch.Tensor:
        """Single-process positive mask of a batch.

        Args:
            nouns: Tensor (N, Nn), multi-hot noun tags (bool, int or float; non-zero = present).
            verbs: Tensor (N, Nv), multi-hot verb tags.

        Returns:
            Bool tensor (N, N): True where two pairs share a noun and a verb, and on the
            diagonal.

        """
        _check_tags("nouns", nouns, nouns.shape[0])
        _check_tags("verbs", verbs, nouns.shape[0])
        n, v = _presence(nouns), _presence(verbs)
        return self._mask(n, v, n, v, torch.arange(n.shape[0], device=n.device))

    @staticmethod
    def _mask(
        nouns: torch.Tensor,
        verbs: torch.Tensor,
        all_nouns: torch.Tensor,
        all_verbs: torch.Tensor,
        rows: torch.Tensor,
    ) -> torch.Tensor:
        """Bool (B, N) positives of local rows ``rows`` (global indices) against all N pairs."""
        with torch.autocast(nouns.device.type, enabled=False):
            shared = (nouns @ all_nouns.T > 0) & (verbs @ all_verbs.T > 0)
        diag = rows[:, None] == torch.arange(all_nouns.shape[0], device=rows.device)[None, :]
        return shared | diag

    def forward(
        self,
        video_features: torch.Tensor,
        text_features: torch.Tensor,
        nouns: torch.Tensor,
        verbs: torch.Tensor,
        gather: bool = True,
    ) -> torch.Tensor:
        """Compute this rank's share of the EgoNCE loss.

        Args:
            video_features: Tensor (B, D), L2-normalised video embeddings (not normalised
                here). B includes any appended scene-aware negatives (see the class doc).
            text_features: Tensor (B, D), L2-normalised narration embeddings; row i pairs
                with video row i.
            nouns: Tensor (B, Nn), multi-hot noun tags of each pair's narration (bool, int or
                float; any non-zero entry means present).
            verbs: Tensor (B, Nv), multi-hot verb tags.
            gather: Contrast against every rank's batch (training). False computes the loss
                on this rank's batch alone, with no collective (validation).

        Returns:
            Scalar tensor: the local loss; its mean over ranks is the global-batch loss.
            Computed in float32 (float64 for float64 inputs) with autocast disabled.

        Raises:
            ValueError: On mismatched shapes.

        """
        check_pair(video_features, text_features)
        b = video_features.shape[0]
        _check_tags("nouns", nouns, b)
        _check_tags("verbs", verbs, b)
        rank, _ = world_info() if gather else (0, 1)
        tags = torch.cat([_presence(nouns), _presence(verbs)], dim=1)  # (B, Nn + Nv)
        if gather:
            all_videos = gather_with_grad(video_features)  # checks equal B once
            all_texts = gather_with_grad(text_features, check_sizes=False)
            all_tags = gather_with_grad(tags, check_sizes=False)  # no grad: plain gather
        else:
            all_videos, all_texts, all_tags = video_features, text_features, tags
        n_nouns = nouns.shape[1]
        rows = torch.arange(b, device=video_features.device) + rank * b
        positives = self._mask(
            tags[:, :n_nouns], tags[:, n_nouns:], all_tags[:, :n_nouns], all_tags[:, n_nouns:], rows
        )  # (B, W*B)
        # fp32 logits even under autocast: at 1/0.05 = 20 bf16 logits are 0.125 apart.
        with torch.autocast(video_features.device.type, enabled=False):
            v2t = fp32(video_features) @ fp32(all_texts).T / self.temperature  # (B, W*B)
            t2v = fp32(text_features) @ fp32(all_videos).T / self.temperature  # (B, W*B)
            v2t_loss = self._row_losses(v2t, positives).mean()
            t2v_loss = self._row_losses(t2v, positives).mean()
            total = v2t_loss + t2v_loss
            return total if self.combine == "sum" else total / 2

    @staticmethod
    def _row_losses(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
        """Per-row ``logsumexp(all) - logsumexp(positives)``: (B, N) logits -> (B,)."""
        pos = logits.masked_fill(~positives, -math.inf)  # the diagonal keeps every row finite
        return torch.logsumexp(logits, dim=1) - torch.logsumexp(pos, dim=1)

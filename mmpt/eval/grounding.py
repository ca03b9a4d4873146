"""Phrase-grounding metrics: box R@k per phrase, referring-expression accuracy, centre baseline.

R@k follows Flickr30k Entities' any-box protocol; accuracy is RefCOCO's (the referent's top box
at IoU >= 0.5).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou

#: IoU a predicted box needs with a ground-truth box to count as correct.
IOU_THRESHOLD = 0.5


def phrase_hits(ranked: Tensor, targets: Tensor, target_mask: Tensor) -> Tensor:
    """Whether each of a phrase's top-k boxes overlaps one of its boxes at IoU >= 0.5.

    Args:
        ranked: (P, K, 4) predicted boxes per phrase, best first, normalised xyxy.
        targets: (P, G, 4) ground-truth boxes per phrase (padded), normalised xyxy.
        target_mask: (P, G) bool, real boxes (each phrase has one at least).

    Returns:
        (P, K) bool: box k of phrase p is correct.

    """
    iou = torch.stack([box_iou(r, t) for r, t in zip(ranked, targets, strict=True)])  # (P, K, G)
    return ((iou >= IOU_THRESHOLD) & target_mask[:, None, :]).any(-1)


def grounding_metrics(
    ranked: Tensor,
    targets: Tensor,
    target_mask: Tensor,
    referent: Tensor,
    ks: tuple[int, ...] = (1, 5),
) -> dict[str, float]:
    """R@k per phrase and the accuracy of the referent phrases.

    Args:
        ranked: (P, K, 4) predicted boxes per phrase, best first.
        targets: (P, G, 4) ground-truth boxes per phrase (padded).
        target_mask: (P, G) bool, real boxes.
        referent: (P,) bool, the first phrase of its caption (a referring expression's target).
        ks: Recall cut-offs (each <= K).

    Returns:
        ``R@k`` (share of phrases with a correct box among the top k) and ``accuracy`` (share
        of referent phrases whose top box is correct).

    """
    hits = phrase_hits(ranked, targets, target_mask)
    out = {f"R@{k}": float(hits[:, :k].any(-1).float().mean()) for k in ks if k <= hits.shape[1]}
    out["accuracy"] = float(hits[referent, 0].float().mean()) if referent.any() else 0.0
    return out


def centre_boxes(targets: Tensor, target_mask: Tensor) -> Tensor:
    """The centre-box baseline: (P, 1, 4) boxes centred in the image with the mean target size.

    The size is the mean width and height of all ground-truth boxes of the evaluated set (an
    oracle the baseline could not know, which only makes it stronger).
    """
    real = targets[target_mask]
    w, h = (real[:, 2] - real[:, 0]).mean(), (real[:, 3] - real[:, 1]).mean()
    box = torch.stack([0.5 - w / 2, 0.5 - h / 2, 0.5 + w / 2, 0.5 + h / 2])
    return box.expand(targets.shape[0], 1, 4)

"""Phrase-grounding losses (FIBER fine-grained stage, MDETR): matching, L1, GIoU, alignment.

Predicted boxes are matched to the boxes of the caption's phrases by the Hungarian algorithm.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou


def alignment_probs(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the L tokens and the no-object slot: (..., L + 1) -> (..., L + 1)."""
    return logits.float().softmax(-1)


def hungarian_match(
    boxes: torch.Tensor,
    probs: torch.Tensor,
    targets: torch.Tensor,
    target_tokens: torch.Tensor,
    l1_weight: float = 5.0,
    giou_weight: float = 2.0,
    align_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One-to-one assignment of predictions to the target boxes of one image (DETR cost).

    ``cost[q, g] = l1_weight * |b_q - t_g|_1 (cxcywh) - giou_weight * GIoU(b_q, t_g)
    - align_weight * sum_{l in tokens(g)} p_q(l)``, minimised with
    ``scipy.optimize.linear_sum_assignment``.

    Args:
        boxes: (Q, 4) predicted boxes, normalised xyxy.
        probs: (Q, L + 1) alignment probabilities (:func:`alignment_probs`).
        targets: (G, 4) target boxes, normalised xyxy, G <= Q.
        target_tokens: (G, L) bool, the tokens of the phrase(s) naming each box.
        l1_weight: Weight of the L1 cost.
        giou_weight: Weight of the GIoU cost.
        align_weight: Weight of the token-alignment cost.

    Returns:
        Long (G,) prediction indices and long (G,) target indices (sorted by prediction).

    """
    from scipy.optimize import linear_sum_assignment

    if len(targets) == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    with torch.no_grad():
        l1 = torch.cdist(_cxcywh(boxes).float(), _cxcywh(targets).float(), p=1)
        giou = generalized_box_iou(boxes.float(), targets.float())
        align = probs[:, :-1].float() @ target_tokens.float().T  # (Q, G)
        cost = l1_weight * l1 - giou_weight * giou - align_weight * align
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


def _cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    return box_convert(boxes, "xyxy", "cxcywh")


def box_losses(matched: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L1 (on cxcywh) and GIoU losses of matched pairs, summed over the pairs.

    Args:
        matched: (N, 4) predicted boxes, normalised xyxy.
        targets: (N, 4) their targets, normalised xyxy.

    Returns:
        ``sum_n |cxcywh(b_n) - cxcywh(t_n)|_1`` and ``sum_n 1 - GIoU(b_n, t_n)``.

    """
    l1 = (_cxcywh(matched) - _cxcywh(targets)).abs().sum()
    giou = torch.diagonal(generalized_box_iou(matched, targets))
    return l1, (1 - giou).sum()


def token_alignment_loss(
    logits: torch.Tensor, target: torch.Tensor, no_object_weight: float = 0.1
) -> torch.Tensor:
    """Soft-token prediction (MDETR): cross-entropy to a distribution over tokens + no-object.

    A matched prediction's target is uniform over the tokens of its box's phrase; an unmatched
    one's is the no-object slot (last), weighted ``no_object_weight``.
    ``loss = sum_q w_q * (-sum_l target[q, l] * log softmax(logits[q])_l) / sum_q w_q``.

    Args:
        logits: (Q, L + 1) alignment logits (padding at -inf).
        target: (Q, L + 1) target distributions (rows sum to 1).
        no_object_weight: Weight of the rows whose target is the no-object slot.

    Returns:
        Scalar loss.

    """
    logp = logits.float().log_softmax(-1)
    per_query = -(target * logp.masked_fill(target == 0, 0.0)).sum(-1)
    weights = torch.where(target[:, -1] == 1, no_object_weight, 1.0)
    return (weights * per_query).sum() / weights.sum()


class GroundingLoss(nn.Module):
    """Matching + ``l1_weight * L1 + giou_weight * GIoU + align_weight * alignment``.

    L1 and GIoU are summed over matched boxes and divided by the number of target boxes in
    the batch (DETR); the alignment loss is averaged per image.

    Args:
        l1_weight: Weight of the L1 loss (and cost).
        giou_weight: Weight of the GIoU loss (and cost).
        align_weight: Weight of the token-alignment loss (and cost).
        no_object_weight: Weight of unmatched predictions in the alignment loss.

    """

    def __init__(
        self,
        l1_weight: float = 5.0,
        giou_weight: float = 2.0,
        align_weight: float = 1.0,
        no_object_weight: float = 0.1,
    ) -> None:
        super().__init__()
        self.l1_weight, self.giou_weight, self.align_weight = l1_weight, giou_weight, align_weight
        self.no_object_weight = no_object_weight

    def forward(
        self,
        boxes: torch.Tensor,
        logits: torch.Tensor,
        targets: torch.Tensor,
        target_mask: torch.Tensor,
        target_tokens: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Losses of a batch.

        Args:
            boxes: (B, Q, 4) predicted boxes, normalised xyxy.
            logits: (B, Q, L + 1) alignment logits over the caption tokens and no-object.
            targets: (B, G, 4) target boxes (padded), normalised xyxy.
            target_mask: (B, G) bool, real targets.
            target_tokens: (B, G, L) bool, the tokens naming each target.

        Returns:
            ``l1``, ``giou``, ``align`` (unweighted) and ``loss`` (weighted sum).

        """
        probs = alignment_probs(logits.detach())
        l1 = giou = boxes.sum() * 0.0
        align = []
        for b in range(boxes.shape[0]):
            real = target_mask[b]
            tgt, tok = targets[b][real], target_tokens[b][real]
            q, g = hungarian_match(
                boxes[b], probs[b], tgt, tok, self.l1_weight, self.giou_weight, self.align_weight
            )
            q, g = q.to(boxes.device), g.to(boxes.device)
            if len(q):
                l1_b, giou_b = box_losses(boxes[b, q], tgt[g])
                l1, giou = l1 + l1_b, giou + giou_b
            target = torch.zeros_like(logits[b], dtype=torch.float32)
            target[:, -1] = 1.0
            spans = tok[g].float()
            spans = spans / spans.sum(-1, keepdim=True).clamp(min=1)
            target[q] = torch.cat([spans, torch.zeros_like(spans[:, :1])], -1)
            align.append(token_alignment_loss(logits[b], target, self.no_object_weight))
        count = target_mask.sum().clamp(min=1)
        terms = {"l1": l1 / count, "giou": giou / count, "align": torch.stack(align).mean()}
        terms["loss"] = (
            self.l1_weight * terms["l1"]
            + self.giou_weight * terms["giou"]
            + self.align_weight * terms["align"]
        )
        return terms

"""UniVL's objective formulas on plain tensors: masking, masked-frame NCE, alignment NCE."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def mask_whole_text(
    tokens: torch.Tensor, mask_token_id: int, special_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """EnhancedV: every non-special token of each row becomes the mask token.

    Args:
        tokens: (B, L) long ids.
        mask_token_id: Id of the mask token.
        special_ids: (S,) ids kept as they are (CLS, SEP, PAD ...).

    Returns:
        (B, L) inputs and (B, L) MLM labels (the original id on masked positions, -100 elsewhere).
    """
    special = torch.isin(tokens, special_ids)
    return torch.where(special, tokens, mask_token_id), torch.where(special, IGNORE, tokens)


def mask_frames(
    valid: torch.Tensor, probability: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(N, T) bool of frames to mask: each real frame with ``probability``."""
    draw = torch.rand(valid.shape, device=valid.device, generator=generator)
    return (draw < probability) & valid


def masked_frame_nce(
    predicted: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, masked: torch.Tensor
) -> torch.Tensor:
    """Masked frame modelling as NCE (UniVL): a reconstruction must pick its true frame.

    Every masked frame's reconstruction ``p`` scores every real frame ``f`` of the batch by
    the dot product ``p . f``; the loss is the cross-entropy of the true frame, averaged over
    the masked frames::

        L = mean_{masked (n, t)} -log softmax_{valid (n', t')}(P[n, t] . F[n', t'])[(n, t)]

    Args:
        predicted: (N, T, D) reconstructed features.
        target: (N, T, D) true (unmasked) features.
        valid: (N, T) bool real frames (the candidates).
        masked: (N, T) bool masked frames (the queries; a subset of ``valid``).

    Returns:
        Scalar; 0 (still in the graph) when nothing is masked.
    """
    d = predicted.shape[-1]
    logits = predicted.reshape(-1, d).float() @ target.reshape(-1, d).float().T  # (NT, NT)
    logits = logits.masked_fill(~valid.reshape(1, -1), float("-inf"))
    rows = masked.reshape(-1).nonzero().squeeze(1)
    if rows.numel() == 0:
        return predicted.sum() * 0.0
    return F.cross_entropy(logits[rows], rows)


def alignment_nce(scores: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Video-text alignment NCE on cross encoder pair scores (UniVL's ``CrossEn``).

    Args:
        scores: (B, C) scores of text i with its C candidate videos; with ``target`` None,
            C == B and the pairs are on the diagonal (every video of the batch).
        target: Long (B,), the column of each text's own video.

    Returns:
        Scalar ``mean_i -log softmax_c(scores[i, :])[target[i]]``.
    """
    if target is None:
        target = torch.arange(scores.shape[0], device=scores.device)
    return F.cross_entropy(scores.float(), target)


def shift_caption(tokens: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher forcing: (B, L) captions -> decoder inputs (B, L-1) and targets (B, L-1).

    Targets are the next tokens, -100 on padding.
    """
    target = tokens[:, 1:]
    return tokens[:, :-1], torch.where(target == pad_id, IGNORE, target)

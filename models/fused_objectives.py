"""Objectives on fused vision-text towers (EgoVLPv2, FIBER): hard-negative matching and MLM.

Shared by every module that fuses in the backbone: hard negatives drawn from a similarity
matrix (ALBEF), the matching pairs built from them, BERT masking and the masked-LM head and loss.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForMaskedLM, AutoTokenizer

from mmpt.models.encoders.hf_text import HFTextTower

log = logging.getLogger(__name__)


def sample_hard_negatives(
    logits: torch.Tensor, positives: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one hard negative per row and per column from the softmax of a similarity matrix.

    As ALBEF/EgoVLPv2: for video i a text j ~ softmax_j(logits[i, j]) over its negatives, for
    text j a video i ~ softmax_i(logits[i, j]); positives get probability exactly 0.

    Args:
        logits: (N, N) video-text similarities (already divided by a temperature).
        positives: (N, N) bool, True for pairs that must never be drawn (the diagonal at least).
        generator: Optional RNG (on the logits' device).

    Returns:
        Long (N,) negative text of each video and long (N,) negative video of each text; -1 for
        a row or column without any negative.

    """

    def draw(lg: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        has_neg = (~pos).any(1)
        lg = lg.float().masked_fill(pos, float("-inf"))
        lg = torch.where(has_neg[:, None], lg, 0.0)  # rows without negatives: drawn, then dropped
        idx = torch.multinomial(lg.softmax(-1), 1, generator=generator).squeeze(1)
        return torch.where(has_neg, idx, -1)

    logits, positives = logits.detach(), positives.bool()
    return draw(logits, positives), draw(logits.T, positives.T)


def mask_tokens(
    tokens: torch.Tensor,
    mask_token_id: int,
    special_ids: torch.Tensor,
    replacement_ids: torch.Tensor,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: 80% mask token, 10% random token, 10% unchanged.

    A ``probability`` share of the non-special tokens is picked; special tokens never are.

    Args:
        tokens: (B, L) long ids.
        mask_token_id: Id of the mask token.
        special_ids: (S,) ids never picked (CLS, SEP, PAD ...).
        replacement_ids: (R,) ids random replacements are drawn from (no special ids, so that
            no padding or separator appears).
        probability: Chance that a non-special token is picked.
        generator: Optional RNG (on the tokens' device).

    Returns:
        (B, L) inputs and (B, L) labels: the original id where picked, -100 elsewhere.

    """

    def rand() -> torch.Tensor:
        return torch.rand(tokens.shape, device=tokens.device, generator=generator)

    picked = (rand() < probability) & ~torch.isin(tokens, special_ids)
    labels = torch.where(picked, tokens, -100)
    action = rand()
    drawn = torch.randint(
        len(replacement_ids), tokens.shape, device=tokens.device, generator=generator
    )
    inputs = torch.where(picked & (action < 0.8), mask_token_id, tokens)
    random = picked & (action >= 0.8) & (action < 0.9)
    return torch.where(random, replacement_ids[drawn], inputs), labels


def mlm_head(text: HFTextTower, kind: str) -> nn.Module:
    """MLM head (K, D_t) -> (K, vocab), decoder tied to the tower's input embeddings.

    "auto": the head of ``AutoModelForMaskedLM`` loaded from the tower's folder (pretrained
    transform weights when the checkpoint has them); "small", or when that fails:
    Linear-GELU-LayerNorm-decoder.
    """
    emb = text.model.get_input_embeddings()
    head: nn.Module | None = None
    if kind == "auto":
        try:
            mlm = AutoModelForMaskedLM.from_pretrained(text.tokenizer.path, local_files_only=True)
            base = getattr(mlm, mlm.base_model_prefix)
            heads = [m for _, m in mlm.named_children() if m is not base]
            out = mlm.get_output_embeddings()
            if len(heads) == 1 and out is not None and out.weight.shape == emb.weight.shape:
                head, out.weight = heads[0].train(), emb.weight  # from_pretrained: eval mode
        except (ValueError, OSError, KeyError) as err:
            log.warning(
                "no masked-LM head for %s (%s): using a small one", text.tokenizer.path, err
            )
    if head is None:
        hidden = emb.weight.shape[1]
        decoder = nn.Linear(hidden, emb.weight.shape[0])
        decoder.weight = emb.weight
        head = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden), decoder)
    return head


def mlm_token_sets(text: HFTextTower) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The mask token id, the (S,) special ids and the (R,) ids random replacements come from.

    Raises:
        ValueError: When the tower's tokenizer has no mask token.

    """
    tok = AutoTokenizer.from_pretrained(text.tokenizer.path, local_files_only=True)
    if tok.mask_token_id is None:
        raise ValueError(f"the tokenizer in {text.tokenizer.path} has no mask token for MLM")
    vocab = text.model.get_input_embeddings().weight.shape[0]
    special = torch.tensor(sorted(set(tok.all_special_ids)), dtype=torch.long)
    ids = torch.arange(vocab)
    return int(tok.mask_token_id), special, ids[~torch.isin(ids, special)]


def matching_pairs(
    neg_text: torch.Tensor, neg_vision: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The N positive pairs, each item with its negative text, each text with its negative item.

    Args:
        neg_text: (N,) long negative text of every item (-1: none), from
            :func:`sample_hard_negatives`.
        neg_vision: (N,) long negative item of every text (-1: none).

    Returns:
        Item indices (P,), text indices (P,) and (P,) long labels (1 for the N positives first,
        0 for the negatives), P <= 3N.

    """
    n = len(neg_text)
    rows = torch.arange(n, device=neg_text.device)
    has_t, has_v = neg_text >= 0, neg_vision >= 0
    vi = torch.cat([rows, rows[has_t], neg_vision[has_v]])
    ti = torch.cat([rows, neg_text[has_t], rows[has_v]])
    return vi, ti, (torch.arange(len(vi), device=vi.device) < n).long()


def masked_lm_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the MLM head on the picked positions.

    Args:
        head: (K, D_t) -> (K, vocab).
        hidden: (B, L, D_t) fused text hidden states.
        labels: (B, L) long, the original id where picked, -100 elsewhere.

    Returns:
        Scalar mean over the picked tokens; 0 (still in the graph) when none is picked.

    """
    picked = labels != -100
    logits = head(hidden[picked])  # (K, vocab)
    if picked.any():
        return F.cross_entropy(logits.float(), labels[picked])
    return logits.sum() * 0.0 + hidden.sum() * 0.0

"""Greedy and beam-search decoding from UniVL's caption decoder (no KV cache: short captions)."""

from __future__ import annotations

import torch

from mmpt.models.univl_parts import CaptionDecoder


@torch.no_grad()
def decode_captions(
    decoder: CaptionDecoder,
    memory: torch.Tensor,
    memory_mask: torch.Tensor,
    bos_id: int,
    eos_id: int,
    max_new_tokens: int = 20,
    num_beams: int = 1,
) -> list[list[int]]:
    """Generate token ids for each memory row: greedy (``num_beams=1``) or beam search.

    Beams are ranked by their summed log-probability divided by their length (the
    end token included), the Hugging Face ``length_penalty=1`` rule.

    Args:
        decoder: The caption decoder.
        memory: (B, S_m, H) cross encoder states; ``memory_mask`` (B, S_m) bool valid.
        bos_id: Start token (the tokenizer's [CLS]).
        eos_id: End token (the tokenizer's [SEP]); not included in the output.
        max_new_tokens: Most tokens generated per row.
        num_beams: Beam width.

    Returns:
        B lists of generated ids.
    """
    if num_beams < 1 or max_new_tokens < 1:
        raise ValueError(f"need num_beams >= 1 and max_new_tokens >= 1, got {num_beams}, "
                         f"{max_new_tokens}")  # fmt: skip
    b, k = memory.shape[0], num_beams
    max_new_tokens = min(max_new_tokens, decoder.max_len - 1)
    memory, memory_mask = memory.repeat_interleave(k, 0), memory_mask.repeat_interleave(k, 0)
    seqs = torch.full((b * k, 1), bos_id, dtype=torch.long, device=memory.device)
    scores = torch.full((b, k), float("-inf"), device=memory.device)
    scores[:, 0] = 0.0  # one live beam at the start
    done = torch.zeros(b * k, dtype=torch.bool, device=memory.device)
    lengths = torch.zeros(b * k, device=memory.device)
    for _ in range(max_new_tokens):
        logp = decoder(seqs, memory, memory_mask)[:, -1].float().log_softmax(-1)  # (B*K, V)
        vocab = logp.shape[-1]
        # a finished beam only extends with the end token, at no cost
        logp = torch.where(done[:, None], torch.full_like(logp, float("-inf")), logp)
        logp[done, eos_id] = 0.0
        total = (scores.view(-1, 1) + logp).view(b, k * vocab)
        scores, idx = total.topk(k, dim=-1)  # (B, K)
        beam = (idx // vocab + torch.arange(b, device=idx.device)[:, None] * k).view(-1)
        token = (idx % vocab).view(-1)
        lengths = lengths[beam] + (~done[beam]).float()
        done = done[beam] | (token == eos_id)
        seqs = torch.cat([seqs[beam], token[:, None]], dim=1)
        if done.all():
            break
    best = (scores.view(-1) / lengths.clamp(min=1)).view(b, k).argmax(-1)
    out = []
    for i in range(b):
        ids = seqs[i * k + int(best[i]), 1:].tolist()
        out.append(ids[: ids.index(eos_id)] if eos_id in ids else ids)
    return out

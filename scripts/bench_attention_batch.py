"""The VLM-like packed batch of the attention benchmark, and its real-token index maps.

Sample lengths mix image-text pairs (576 image + 24-224 text tokens), interleaved documents
(1000-4000 tokens) and text-only samples (100-2000 tokens, lognormal), scaled by
``max_seq_len / 4096`` below 4096; they are packed with mmpt's ``pack_sequences``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch

from mmpt.datamodules.packing import first_fit_decreasing, pack_sequences

REF_LEN = 4096  # the sample length mix is defined for rows of this length
IMAGE_TOKENS = 576


def draw_length(rng: random.Random, pair_frac: float, doc_frac: float, scale: float) -> int:
    """One sample length of the VLM mix (before scaling: pair, interleaved doc or text)."""
    u = rng.random()
    if u < pair_frac:
        n = IMAGE_TOKENS + rng.randint(24, 224)
    elif u < pair_frac + doc_frac:
        n = rng.randint(1000, 4000)
    else:
        n = min(2000, max(100, round(rng.lognormvariate(math.log(500), 0.7))))
    return max(2, round(n * scale))


def draw_lengths(
    rows: int, max_len: int, seed: int, pair_frac: float, doc_frac: float
) -> list[int]:
    """Sample lengths, in stream order, that first-fit-decreasing packs into ``rows`` rows.

    Samples are drawn one by one; one that would need an extra row is skipped, and drawing
    stops when the rows are full or 50 draws in a row did not fit.
    """
    rng = random.Random(seed)
    scale = min(1.0, max_len / REF_LEN)
    kept: list[int] = []
    misses = 0
    while misses < 50 and sum(kept) < rows * max_len:
        n = min(max_len, draw_length(rng, pair_frac, doc_frac, scale))
        if len(first_fit_decreasing([*kept, n], max_len)) <= rows:
            kept.append(n)
            misses = 0
        else:
            misses += 1
    return kept


@dataclass
class Batch:
    """One packed batch and the map from its real tokens to the padded layout."""

    lengths: list[int]  # per sample, stream order (= padded batch order)
    packed: dict[str, Any]  # pack_sequences output
    packed_index: torch.Tensor  # (N,) flat index of each real token in the R * L packed tokens
    padded_index: torch.Tensor  # (N,) flat index of the same token in the B * T padded tokens

    @property
    def rows(self) -> int:
        return int(self.packed["input_ids"].shape[0])

    @property
    def row_len(self) -> int:
        return int(self.packed["input_ids"].shape[1])

    @property
    def pad_len(self) -> int:
        return max(self.lengths)

    @property
    def real_tokens(self) -> int:
        return sum(self.lengths)


def make_batch(lengths: list[int], max_len: int, vocab: int, seed: int) -> Batch:
    """Random token ids of ``lengths``, packed; plus the real-token index maps."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for n in lengths:
        ids = torch.randint(1, vocab, (n,), generator=g)
        seqs.append({"input_ids": ids, "labels": ids.clone()})
    packed = pack_sequences(seqs, max_len, pad_id=0)
    packed["samples"] = seqs
    t = max(lengths)
    p_idx, d_idx = [], []
    for r, row in enumerate(packed["bins"]):
        offset = r * max_len
        for i in row:
            n = lengths[i]
            p_idx.append(torch.arange(offset, offset + n))
            d_idx.append(torch.arange(i * t, i * t + n))
            offset += n
    return Batch(lengths, packed, torch.cat(p_idx), torch.cat(d_idx))


def to_padded(x: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(R, H, L, D) packed -> (B, H, T, D) padded with zeros, same values on real tokens."""
    r, h, length, d = x.shape
    flat = x.transpose(1, 2).reshape(r * length, h, d)
    out = flat.new_zeros(len(batch.lengths) * batch.pad_len, h, d)
    out[batch.padded_index.to(x.device)] = flat[batch.packed_index.to(x.device)]
    return out.view(len(batch.lengths), batch.pad_len, h, d).transpose(1, 2).contiguous()


def real_tokens(x: torch.Tensor, index: torch.Tensor, heads_first: bool) -> torch.Tensor:
    """Rows of the real tokens of (N, H, T, D) (``heads_first``) or (N, T, ...) tensors."""
    if heads_first:
        x = x.transpose(1, 2)
    return x.reshape(-1, *x.shape[2:])[index.to(x.device)]

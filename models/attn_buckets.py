"""Packed attention through SDPA on length buckets: each segment attends only to itself.

A dense block-diagonal mask makes SDPA compute all T x T scores of a packed row and throw
most of them away (a 1024-token row of 50-token samples does ~20x the work it needs). Here
the segments of all rows are sorted into buckets of similar length, each bucket is gathered
into a right-padded (n, H, L, D) batch and run through SDPA with its own causal kernel (or a
key mask, for bidirectional blocks), and the outputs are gathered back into the packed
layout. The work is about the sum of the squared segment lengths, as with varlen kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attn_segments import Memo, segment_lengths

#: Segments whose lengths are within this factor share a bucket (padded to the longest).
BUCKET_GROWTH = 1.5

_PLANS = Memo()


@dataclass
class Bucket:
    """Segments of similar length, gathered into one right-padded batch.

    Attributes:
        index: (n, L) long, flat token index of each slot (pads point at token 0).
        valid: (n, L) bool, True for a real token; None when no slot is padding.
    """

    index: torch.Tensor
    valid: torch.Tensor | None


@dataclass
class Plan:
    """How one ``cu_seqlens`` maps packed tokens to buckets and back.

    Attributes:
        buckets: The length buckets, longest first.
        unpermute: (B * T,) long, for every flat token its position among the buckets' real
            tokens (concatenated in bucket order, row-major inside a bucket).
    """

    buckets: list[Bucket]
    unpermute: torch.Tensor


def bucket_plan(cu_seqlens: torch.Tensor, rows: int, row_len: int) -> Plan:
    """Group the segments of ``cu_seqlens`` into length buckets.

    Args:
        cu_seqlens: Int (S + 1,) flat segment offsets from 0 to ``rows * row_len``.
        rows: B, the packed rows.
        row_len: T, tokens per row.

    Returns:
        The :class:`Plan`; its tensors are on ``cu_seqlens``' device.
    """
    cu = cu_seqlens.tolist()
    segment_lengths(cu_seqlens, rows, row_len)  # validates the offsets
    segs = sorted(((b - a, a) for a, b in zip(cu[:-1], cu[1:], strict=True) if b > a), reverse=True)
    groups: list[list[tuple[int, int]]] = []
    for n, start in segs:
        if groups and groups[-1][0][0] <= BUCKET_GROWTH * n:
            groups[-1].append((n, start))
        else:
            groups.append([(n, start)])
    device = cu_seqlens.device
    buckets, order = [], []
    for group in groups:
        width = group[0][0]
        pos = torch.arange(width)
        starts = torch.tensor([s for _, s in group])[:, None]
        lengths = torch.tensor([n for n, _ in group])[:, None]
        valid = pos[None, :] < lengths
        index = torch.where(valid, starts + pos[None, :], 0)
        order.append(index[valid])
        all_valid = bool(valid.all())
        buckets.append(Bucket(index.to(device), None if all_valid else valid.to(device)))
    flat = torch.cat(order)
    unpermute = torch.empty_like(flat)
    unpermute[flat] = torch.arange(flat.numel())
    return Plan(buckets, unpermute.to(device))


def bucketed_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """SDPA over packed rows where every segment sees only itself, without a dense mask.

    Args:
        query: (B, Hq, T, D).
        key: (B, Hkv, T, D) with Hq a multiple of Hkv.
        value: (B, Hkv, T, D).
        cu_seqlens: Int (S + 1,) flat segment offsets from 0 to B * T, every row start a
            boundary (as ``datamodules.packing`` makes them).
        causal: Causal within each segment; False gives bidirectional blocks.
        scale: Softmax scale; None uses D ** -0.5.
        dropout: Attention dropout probability.

    Returns:
        (B, Hq, T, D) attention output, equal (up to rounding) to SDPA with the dense
        block-diagonal mask.
    """
    b, hq, t, d = query.shape
    plan = _PLANS.get(cu_seqlens, (b, t), lambda: bucket_plan(cu_seqlens, b, t))
    flat = [x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (query, key, value)]
    gqa = hq != key.shape[1]
    outs = []
    for bucket in plan.buckets:
        q, k, v = (x[bucket.index].transpose(1, 2) for x in flat)  # (n, H, L, D)
        mask = None
        if bucket.valid is not None and not causal:  # causal: pads come after every real key
            mask = bucket.valid[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q, k, v, mask, dropout, causal, scale=scale, enable_gqa=gqa
        )
        out = out.transpose(1, 2)  # (n, L, Hq, D)
        outs.append(out.reshape(-1, hq, d) if bucket.valid is None else out[bucket.valid])
    out = torch.cat(outs)[plan.unpermute]  # (B * T, Hq, D)
    return out.view(b, t, hq, d).transpose(1, 2)

"""The FlexAttention backend of packed attention: a document ``BlockMask``, GQA native.

Each packed row keeps its own batch index; a token attends to the tokens of its own segment
(``mask_mod``: same segment id, and ``q >= kv`` when causal). ``create_block_mask`` turns
that into a ``BlockMask`` once per ``cu_seqlens`` tensor (memoized, shared by every layer),
so the kernel skips the blocks between segments. On CUDA ``flex_attention`` runs compiled
(its fused kernels, forward and backward); elsewhere eagerly, which torch supports for the
forward only (checks and tests on CPU).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from .attn_segments import Memo, segment_ids, segment_lengths

_MASK = Memo()
_COMPILED: list[Callable] = []


def document_mask_mod(segments: torch.Tensor, causal: bool) -> Callable:
    """The ``mask_mod`` of packed rows.

    Args:
        segments: (B, T) segment id of every token.
        causal: Also require ``q_idx >= kv_idx``.

    Returns:
        ``mask_mod(b, h, q_idx, kv_idx) -> bool`` tensor, True = attend.
    """

    def same_segment(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202 (traced by torch)
        return segments[b, q_idx] == segments[b, kv_idx]

    def causal_same_segment(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202
        return (q_idx >= kv_idx) & (segments[b, q_idx] == segments[b, kv_idx])

    return causal_same_segment if causal else same_segment


def flex_block_mask(
    cu_seqlens: torch.Tensor, rows: int, row_len: int, causal: bool, device: torch.device
) -> BlockMask:
    """The document ``BlockMask`` of B packed rows (memoized per ``cu_seqlens`` tensor).

    Args:
        cu_seqlens: Int (S + 1,) flat segment offsets from 0 to B * T, row starts included.
        rows: B.
        row_len: T.
        causal: Causal within each segment.
        device: The query's device.

    Returns:
        A ``BlockMask`` of shape (B, 1, T, T).
    """

    def build() -> BlockMask:
        segment_lengths(cu_seqlens, rows, row_len)  # validates
        segments = segment_ids(cu_seqlens.to(device), rows * row_len).view(rows, row_len)
        mod = document_mask_mod(segments, causal)
        return create_block_mask(mod, rows, None, row_len, row_len, device=device)

    return _MASK.get(cu_seqlens, (causal, rows, row_len, str(device)), build)


def _kernel(device: torch.device) -> Callable:
    """Compiled ``flex_attention`` on CUDA (built once), the eager function elsewhere."""
    if device.type != "cuda":
        return flex_attention
    if not _COMPILED:
        _COMPILED.append(torch.compile(flex_attention, dynamic=False))
    return _COMPILED[0]


def flex_packed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    causal: bool,
    scale: float | None,
    dropout: float,
) -> torch.Tensor:
    """Packed attention through FlexAttention.

    Args:
        query: (B, Hq, T, D).
        key: (B, Hkv, T, D), Hq a multiple of Hkv.
        value: (B, Hkv, T, D).
        cu_seqlens: Int (S + 1,) flat segment offsets from 0 to B * T.
        causal: Causal within each segment.
        scale: Softmax scale; None uses D ** -0.5.
        dropout: Must be 0: FlexAttention has no attention dropout.

    Returns:
        (B, Hq, T, D) attention output.

    Raises:
        ValueError: ``dropout`` > 0.
    """
    if dropout:
        raise ValueError(
            f"attention dropout {dropout} with attn_backend: flex: FlexAttention has no "
            "dropout; set the model's attention_dropout to 0 or pick attn_backend: sdpa"
        )
    b, hq, t, _ = query.shape
    mask = flex_block_mask(cu_seqlens, b, t, causal, query.device)
    gqa = hq != key.shape[1]
    return _kernel(query.device)(query, key, value, block_mask=mask, scale=scale, enable_gqa=gqa)

"""One attention function for packed sequences: xformers on CUDA, torch SDPA elsewhere."""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger("mmpt.attention")

try:  # the GPU path; xformers has no CPU kernels
    import xformers.ops as xops
    from xformers.ops.fmha import attn_bias as xbias
except ImportError:
    xops = xbias = None


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Flat segment boundaries of packed rows: a new segment starts wherever positions restart.

    Args:
        position_ids: (B, T) long positions; a 0 (or the start of a row) opens a segment.

    Returns:
        Int32 tensor (S + 1,) of offsets into the row-major flattened (B * T) tokens, from 0
        to B * T; every row start is a boundary.
    """
    if position_ids.ndim != 2:
        raise ValueError(f"position_ids must be (B, T), got shape {tuple(position_ids.shape)}")
    starts = position_ids == 0
    starts[:, 0] = True
    flat = starts.reshape(-1).nonzero().squeeze(1)
    end = torch.tensor([position_ids.numel()], device=flat.device, dtype=flat.dtype)
    return torch.cat([flat, end]).to(torch.int32)


def hf_packing_kwargs(cu_seqlens: torch.Tensor, max_seqlen: int) -> dict[str, Any]:
    """The keyword arguments that carry packing info through an HF model's ``forward``.

    They are transformers' own names (those its flash-attention path uses for packed rows),
    so the same batch also works with ``attn_implementation="flash_attention_2"``.

    Args:
        cu_seqlens: (S + 1,) flat segment offsets (see ``packed_attention``).
        max_seqlen: Length of the longest segment.
    """
    return {
        "cu_seq_lens_q": cu_seqlens,
        "cu_seq_lens_k": cu_seqlens,
        "max_length_q": max_seqlen,
        "max_length_k": max_seqlen,
    }


class _Memo:
    """Remembers one value per key tensor, so all layers of a forward share one mask."""

    def __init__(self) -> None:
        self._ref: weakref.ref | None = None
        self._key: tuple = ()
        self._value: Any = None

    def get(self, tensor: torch.Tensor, key: tuple, build: Callable[[], Any]) -> Any:
        full = (tensor._version, *key)
        if self._ref is None or self._ref() is not tensor or self._key != full:
            self._ref, self._key, self._value = weakref.ref(tensor), full, build()
        return self._value


_XF_BIAS, _SDPA_MASK, _CU_FROM_POS = _Memo(), _Memo(), _Memo()


def _segment_lengths(cu_seqlens: torch.Tensor, rows: int, row_len: int) -> list[int]:
    """Non-empty segment lengths, checked to rise from 0 to B * T and to cut at row starts."""
    cu = cu_seqlens.tolist()  # one host sync per forward (memoized)
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:], strict=True)]
    cuts = set(range(0, rows * row_len + 1, row_len))
    if cu[0] != 0 or cu[-1] != rows * row_len or min(lengths) < 0 or not cuts <= set(cu):
        raise ValueError(
            f"cu_seqlens must rise from 0 to B * T = {rows} * {row_len} with every row start "
            f"a boundary; got {cu[:4]}...{cu[-2:]}"
        )
    return [n for n in lengths if n > 0]


def _xformers(q, k, v, cu_seqlens, causal, scale, dropout) -> torch.Tensor:
    """The xformers path; q (B, Hq, T, D), k/v (B, Hkv, T, D) -> (B, Hq, T, D)."""
    (b, hq, t, _), hkv = q.shape, k.shape[1]
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, T, H, D) is xformers' layout
    if cu_seqlens is not None:  # packed: one flat row, block-diagonal bias
        kind = xbias.BlockDiagonalCausalMask if causal else xbias.BlockDiagonalMask
        bias = _XF_BIAS.get(
            cu_seqlens,
            (causal, b, t),
            lambda: kind.from_seqlens(_segment_lengths(cu_seqlens, b, t), device=q.device),
        )
        q, k, v = (x.reshape(1, b * t, *x.shape[2:]) for x in (q, k, v))
    else:
        bias = xbias.LowerTriangularMask() if causal else None
    if hq != hkv:  # GQA: xformers' (B, T, G, H, D) layout, K/V expanded with stride 0
        rep = hq // hkv
        q = q.unflatten(2, (hkv, rep))
        k, v = (x.unsqueeze(3).expand(*x.shape[:3], rep, x.shape[-1]) for x in (k, v))
    out = xops.memory_efficient_attention(q, k, v, attn_bias=bias, p=dropout, scale=scale)
    return out.reshape(b, t, hq, -1).transpose(1, 2)


def _dense_mask(cu_seqlens, b, tq, tk, causal, sliding_window, device) -> torch.Tensor:
    """Boolean (B or 1, 1, Tq, Tk) mask, True = attend; queries are bottom-right aligned."""
    qi = torch.arange(tq, device=device)[:, None] + (tk - tq)
    ki = torch.arange(tk, device=device)[None, :]
    mask = (ki <= qi) | (not causal)
    if sliding_window is not None:
        mask = mask & (qi - ki < sliding_window)
    mask = mask[None, None]
    if cu_seqlens is not None:  # same segment: compare segment ids, one per token
        _segment_lengths(cu_seqlens, b, tq)
        tokens = torch.arange(b * tq, device=device, dtype=cu_seqlens.dtype)
        seg = torch.searchsorted(cu_seqlens[1:].contiguous(), tokens, right=True).view(b, tq)
        mask = mask & (seg[:, :, None] == seg[:, None, :])[:, None]
    return mask


def packed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    dropout: float = 0.0,
    key_padding_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Attention where packed segments never see each other.

    With ``cu_seqlens`` the B rows are read as one flat stream of B * T tokens cut into
    segments (every row start must be a segment start, as ``datamodules.packing`` makes
    them); a token attends only to earlier (``causal``) or all tokens of its own segment.
    On CUDA with xformers this runs ``memory_efficient_attention`` with a
    ``BlockDiagonalCausalMask``; otherwise torch SDPA with the equivalent boolean mask,
    built once per ``cu_seqlens`` tensor and shared by every layer and head. Padding masks,
    sliding windows and Tq != Tk (decoding with a cache, bottom-right aligned) take the
    SDPA path.

    Args:
        query: (B, Hq, Tq, D), the layout transformers' attention functions receive.
        key: (B, Hkv, Tk, D) with Hq a multiple of Hkv (grouped-query attention).
        value: (B, Hkv, Tk, D).
        cu_seqlens: Int (S + 1,) flat segment offsets from 0 to B * T; None for plain
            per-row attention. Requires Tq == Tk.
        causal: Causal within each segment; False gives bidirectional blocks (encoders).
        scale: Softmax scale; None uses D ** -0.5.
        dropout: Attention dropout probability (pass 0.0 in eval).
        key_padding_mask: Optional bool (B, Tk), True = real token.
        sliding_window: Optional window: query i sees keys j with i - j < window.

    Returns:
        (B, Hq, Tq, D) attention output.
    """
    b, hq, tq, _ = query.shape
    tk = key.shape[2]
    if hq % key.shape[1]:
        raise ValueError(f"{hq} query heads are not a multiple of {key.shape[1]} key heads")
    if cu_seqlens is not None and tq != tk:
        raise ValueError(f"packed attention needs Tq == Tk, got {tq} and {tk}")
    if sliding_window is not None and sliding_window >= tk:
        sliding_window = None  # cannot bind: keep the fast paths
    flat = key_padding_mask is None and sliding_window is None and tq == tk
    if query.is_cuda and xops is not None and flat:
        return _xformers(query, key, value, cu_seqlens, causal, scale, dropout)
    args = (b, tq, tk, causal, sliding_window, query.device)
    mask = None  # None: plain attention, SDPA picks its fastest kernel
    if cu_seqlens is not None:
        mask = _SDPA_MASK.get(cu_seqlens, args, lambda: _dense_mask(cu_seqlens, *args))
    elif not flat or (causal and tq != tk):
        mask = _dense_mask(None, *args)
    if key_padding_mask is not None:
        mask = mask & key_padding_mask.bool()[:, None, None, :]
    gqa = hq != key.shape[1]
    return F.scaled_dot_product_attention(
        query, key, value, mask, dropout, causal and mask is None, scale=scale, enable_gqa=gqa
    )


def _packing_from_kwargs(
    query: torch.Tensor,
    key: torch.Tensor,
    cu_seq_lens_q: torch.Tensor | None,
    cu_seq_lens_k: torch.Tensor | None,
    position_ids: torch.Tensor | None,
) -> torch.Tensor | None:
    """Flat cu_seqlens from HF's varlen kwargs, else from restarting 2D position ids."""
    if cu_seq_lens_q is not None:
        k = cu_seq_lens_k
        if k is not None and k is not cu_seq_lens_q and not torch.equal(cu_seq_lens_q, k):
            raise ValueError("cu_seq_lens_q != cu_seq_lens_k: only self-attention packing")
        return cu_seq_lens_q
    b, _, t, _ = query.shape
    if position_ids is None or position_ids.ndim != 2 or position_ids.shape[-1] != t:
        return None  # (3, B, T) M-RoPE ids carry no boundaries: pass cu_seq_lens_q
    if key.shape[2] != t:
        return None
    pos = position_ids.expand(b, t)

    def build() -> torch.Tensor | None:
        restarts = bool((pos[:, 1:] == 0).any())  # none inside a row: not packed
        return cu_seqlens_from_position_ids(pos) if restarts else None

    return _CU_FROM_POS.get(position_ids, (b, t), build)


def _common_dtype(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v in one dtype: the autocast dtype under autocast, else the widest given.

    Under bf16 autocast HF's rotary embedding returns fp32 q/k while v stays bf16; xformers
    refuses mixed dtypes, and running everything in fp32 would waste the fast kernels.
    """
    device = tensors[0].device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    elif len({t.dtype for t in tensors}) > 1:
        dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors])
    else:
        return tensors
    return tuple(t.to(dtype) for t in tensors)


def _hf_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    is_causal: bool | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The transformers ``AttentionInterface`` entry: (B, H, T, D) in, (B, T, H, D) out."""
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ValueError(
            "this model uses attention logit softcapping or attention sinks, which mmpt's packed "
            "attention does not support: load it with attn_implementation='eager' or 'sdpa'"
        )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    query, key, value = _common_dtype(query, key, value)
    if attention_mask is not None and attention_mask.ndim == 4:  # a caller's own mask rules
        gqa = query.shape[1] != key.shape[1]
        out = F.scaled_dot_product_attention(
            query, key, value, attention_mask, dropout, scale=scaling, enable_gqa=gqa
        )
        return out.transpose(1, 2), None
    cu = _packing_from_kwargs(query, key, cu_seq_lens_q, cu_seq_lens_k, position_ids)
    if cu is not None and attention_mask is not None and query.is_cuda:
        log.warning(
            "attention_mask given with packed rows forces the dense SDPA path; packed pads "
            "are their own segment, so pass attention_mask=None"
        )
    out = packed_attention(
        query, key, value, cu, causal, scaling, dropout, attention_mask, sliding_window
    )
    return out.transpose(1, 2), None


def _hf_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """The ``AttentionMaskInterface`` entry: no dense 4D mask, only the padding (B, Tk)."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    return None if bool(attention_mask.all()) else attention_mask


def register_packed_attention(name: str = "mmpt_packed") -> str:
    """Register ``packed_attention`` with transformers' public attention interfaces.

    Packing info reaches every attention layer through the kwargs of ``model(...)``:
    ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (see ``hf_packing_kwargs``) when given, else
    restarts (0s) inside ``position_ids``. The mask function registered next to it keeps
    HF from building a dense 4D mask; a 2D padding mask still reaches the attention.

    Args:
        name: The implementation's name.

    Returns:
        ``name``, for ``from_pretrained(..., attn_implementation=name)``,
        ``from_config(..., attn_implementation=name)`` or ``model.set_attn_implementation``.
    """
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(name, _hf_attention)
    AttentionMaskInterface.register(name, _hf_mask)
    return name

"""One attention function for packed sequences, with backends chosen in YAML.

Backends (``attn_backend``): ``xformers`` (``memory_efficient_attention`` with a
``BlockDiagonalCausalMask``, :mod:`.attn_xformers`), ``flex`` (FlexAttention with a document
``BlockMask``, :mod:`.attn_flex`), ``sdpa`` (torch SDPA per segment on length buckets,
:mod:`.attn_buckets`; a dense boolean mask where padding or a sliding window applies) and
``auto`` (:func:`resolve_backend`).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.nn.functional as F

from .attn_buckets import bucketed_sdpa
from .attn_flex import flex_packed_attention
from .attn_segments import Memo, cu_seqlens_from_position_ids, segment_ids, segment_lengths
from .attn_xformers import xbias, xformers_attention, xformers_unusable_reason, xops

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "cu_seqlens_from_position_ids",
    "hf_packing_kwargs",
    "is_packed_implementation",
    "packed_attention",
    "register_packed_attention",
    "resolve_backend",
    "unusable_reason",
    "xbias",
    "xops",
]

log = logging.getLogger("mmpt.attention")

BACKENDS = ("auto", "xformers", "flex", "sdpa")
#: ``auto``'s preference per device type, fastest first; the first that can run is used.
#: CPU: SDPA. Measured: packed forward, 2 rows x 512 tokens, 8 / 2 heads x 64, fp32, one
#: thread, median of 10 (with the dense mask, before length buckets): SDPA 282 ms,
#: FlexAttention 974 ms (no fused CPU kernel outside torch.compile, and no CPU backward at
#: all); xformers has no CPU kernels. CUDA: not yet measured; the order is the design's:
#: xformers (varlen kernels that skip the blocks between segments), FlexAttention (compiled;
#: skips them too), SDPA (per-segment length buckets: a host sync per batch and gathers
#: around the kernel). ``scripts/gpu_check.sh`` measures all
#: three (``attention.json``); reorder this table from its numbers. Unlisted devices: SDPA.
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("xformers", "flex", "sdpa"), "cpu": ("sdpa",)}
_RESOLVED: dict[tuple[str, str], str] = {}
_FALLBACK_LOGGED: set[str] = set()


def unusable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run its own kernels on ``device`` (None: it can).

    Args:
        backend: ``xformers``, ``flex`` or ``sdpa``.
        device: The device the attention would run on.
    """
    if backend == "xformers":
        return xformers_unusable_reason(device)
    if backend == "flex" and device.type != "cuda":
        return f"FlexAttention has no fused {device.type} kernels (forward-only eager mode)"
    return None


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs on ``device`` for the configured ``attn_backend``.

    ``auto`` takes the first of ``AUTO_ORDER[device.type]`` that can run (SDPA where the
    device is not listed). An explicit backend that cannot run on a CUDA device is an
    error; on other devices xformers falls back to SDPA (it has no CPU kernels), and flex
    keeps running eagerly for the forward (see :func:`packed_attention`).

    Args:
        backend: One of ``BACKENDS``.
        device: The device of the query.

    Returns:
        ``"xformers"``, ``"flex"`` or ``"sdpa"``.

    Raises:
        ValueError: Unknown ``backend``, or an explicit one that cannot run on CUDA.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attn_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    key = (backend, str(device))
    if key in _RESOLVED:
        return _RESOLVED[key]
    if backend == "auto":
        order = AUTO_ORDER.get(device.type, ("sdpa",))
        chosen = next(b for b in (*order, "sdpa") if unusable_reason(b, device) is None)
        tried = order[: order.index(chosen)] if chosen in order else order
        skipped = [f"{b}: {unusable_reason(b, device)}" for b in tried]
        log.info("attn_backend auto -> %s on %s%s", chosen, device, f" ({skipped})" * bool(skipped))
    elif backend == "xformers" and (why := unusable_reason(backend, device)) is not None:
        if device.type == "cuda":
            raise ValueError(
                f"attn_backend: xformers cannot run: {why}. Install an xformers build for "
                f"torch {torch.__version__} (scripts/fetch_gpu_wheels.sh), or set "
                "attn_backend: flex, sdpa or auto"
            )
        log.warning("attn_backend: xformers on %s: %s; using SDPA", device, why)
        chosen = "sdpa"
    else:
        chosen = backend
    _RESOLVED[key] = chosen
    return chosen


def is_packed_implementation(name: str | None) -> bool:
    """Whether an HF ``attn_implementation`` name keeps packed samples apart."""
    return bool(name) and (name.startswith("mmpt_packed") or name == "flash_attention_2")


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


_SDPA_MASK, _CU_FROM_POS = Memo(), Memo()


def _dense_mask(cu_seqlens, b, tq, tk, causal, sliding_window, device) -> torch.Tensor:
    """Boolean (B or 1, 1, Tq, Tk) mask, True = attend; queries are bottom-right aligned."""
    qi = torch.arange(tq, device=device)[:, None] + (tk - tq)
    ki = torch.arange(tk, device=device)[None, :]
    mask = (ki <= qi) | (not causal)
    if sliding_window is not None:
        mask = mask & (qi - ki < sliding_window)
    mask = mask[None, None]
    if cu_seqlens is not None:  # same segment: compare segment ids, one per token
        segment_lengths(cu_seqlens, b, tq)
        seg = segment_ids(cu_seqlens, b * tq).view(b, tq)
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
    backend: str = "auto",
) -> torch.Tensor:
    """Attention where packed segments never see each other.

    With ``cu_seqlens`` the B rows are read as one flat stream of B * T tokens cut into
    segments (every row start must be a segment start, as ``datamodules.packing`` makes
    them); a token attends only to earlier (``causal``) or all tokens of its own segment.
    ``backend`` picks the kernel (:func:`resolve_backend`): xformers
    ``memory_efficient_attention`` with a ``BlockDiagonalCausalMask``, FlexAttention with a
    document ``BlockMask``, or torch SDPA per segment on length buckets (the dense boolean
    mask only where padding or a window applies); masks are built
    once per ``cu_seqlens`` tensor and shared by every layer and head. Padding masks,
    sliding windows and Tq != Tk (decoding with a cache, bottom-right aligned) always take
    the SDPA path, and so does unpacked attention under flex (SDPA's causal kernels). Off
    CUDA, flex runs eagerly for the forward only: a call that needs gradients there uses
    SDPA (logged once).

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
        backend: One of ``BACKENDS`` (``auto``, ``xformers``, ``flex``, ``sdpa``).

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
    kernel = resolve_backend(backend, query.device) if flat else "sdpa"
    if kernel == "xformers":
        return xformers_attention(query, key, value, cu_seqlens, causal, scale, dropout)
    if kernel == "flex" and dropout and backend == "auto":
        kernel = "sdpa"  # flex has no attention dropout; only an explicit flex refuses it
    if kernel == "flex" and cu_seqlens is not None:
        needs_grad = any(x.requires_grad for x in (query, key, value))
        if query.is_cuda or not (needs_grad and torch.is_grad_enabled()):
            return flex_packed_attention(query, key, value, cu_seqlens, causal, scale, dropout)
        if str(query.device) not in _FALLBACK_LOGGED:
            _FALLBACK_LOGGED.add(str(query.device))
            log.warning("FlexAttention has no %s backward: this call uses SDPA", query.device)
    if cu_seqlens is not None and flat:  # per-segment SDPA on length buckets, no dense mask
        return bucketed_sdpa(query, key, value, cu_seqlens, causal, scale, dropout)
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
    *,
    backend: str = "auto",
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
        query, key, value, cu, causal, scaling, dropout, attention_mask, sliding_window, backend
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


def register_packed_attention(name: str | None = None, backend: str = "auto") -> str:
    """Register ``packed_attention`` with transformers' public attention interfaces.

    Packing info reaches every attention layer through the kwargs of ``model(...)``:
    ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (see ``hf_packing_kwargs``) when given, else
    restarts (0s) inside ``position_ids``. The mask function registered next to it keeps
    HF from building a dense 4D mask; a 2D padding mask still reaches the attention.

    Args:
        name: The implementation's name; default ``mmpt_packed`` for ``backend="auto"``,
            else ``mmpt_packed_<backend>``.
        backend: The attention backend of this implementation (one of ``BACKENDS``).

    Returns:
        ``name``, for ``from_pretrained(..., attn_implementation=name)``,
        ``from_config(..., attn_implementation=name)`` or ``model.set_attn_implementation``.

    Raises:
        ValueError: Unknown ``backend``.
    """
    from transformers import AttentionInterface, AttentionMaskInterface

    if backend not in BACKENDS:
        raise ValueError(f"attn_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if name is None:
        name = "mmpt_packed" if backend == "auto" else f"mmpt_packed_{backend}"
    AttentionInterface.register(name, functools.partial(_hf_attention, backend=backend))
    AttentionMaskInterface.register(name, _hf_mask)
    return name

"""The xformers backend of packed attention: BlockDiagonalCausalMask, GQA in a trainable layout.

xformers' ``memory_efficient_attention`` takes BMHK (B, M, H, K) tensors, or BMGHK
(B, M, G, H, K) for grouped-query attention with K/V broadcast over the H heads of a group.
Only forward operators support BMGHK: every backward operator of xformers 0.0.35 (flash3,
flash, cutlass) has ``SUPPORTS_BMGHK = False``, and with dropout 0 the backward operator is
picked during the forward pass, so BMGHK inputs that need gradients fail with
NotImplementedError before any kernel runs (facebookresearch/xformers#937). Here GQA runs
in BMGHK with stride-0 K/V only when nothing needs a gradient; for training K/V are expanded
to the query heads and the call is plain BMHK (autograd sums the expanded K/V gradients back
onto the Hkv heads).
"""

from __future__ import annotations

import torch

from .attn_segments import Memo, segment_lengths

try:  # the GPU path; xformers has no CPU kernels
    import xformers.ops as xops
    from xformers.ops.fmha import attn_bias as xbias
except ImportError:
    xops = xbias = None

_BIAS = Memo()
_USABLE: dict[str, str | None] = {}


def extension_load_error() -> str | None:
    """Why xformers' CUDA extension did not load (its deepest cause), or None if it did.

    Without the extension xformers refuses every CUDA operator ("xFormers wasn't build with
    CUDA support"), even those that run torch's own kernels. The 0.0.35 wheel's extension
    links ``libcudart.so.12``, which a CUDA 13 torch does not ship: ``nvidia-cuda-runtime-cu12``
    on ``LD_LIBRARY_PATH`` lets it load (``scripts/gpu_check.sh`` does this).
    """
    if xops is None:
        return "xformers is not installed"
    from xformers import _cpp_lib

    err = getattr(_cpp_lib, "_cpp_library_load_exception", None)
    while err is not None and err.__cause__ is not None:
        err = err.__cause__
    return None if err is None else (str(err).strip().splitlines() or [type(err).__name__])[0]


def _probe(device: torch.device) -> str | None:
    """Run a tiny packed forward + backward through xformers on ``device``; None if it ran."""
    try:  # also when first called under no_grad / inference_mode (validation) or autocast
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            torch.autocast(device.type, enabled=False),
        ):
            q = torch.randn(1, 2, 2, 64, device=device, dtype=torch.float16)
            q.requires_grad_(True)
            bias = xbias.BlockDiagonalCausalMask.from_seqlens([1, 1], device=device)
            xops.memory_efficient_attention(q, q, q, attn_bias=bias).sum().backward()
    except (NotImplementedError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        why = f"xformers cannot run on {device}: {first}"
        if (load := extension_load_error()) is not None:
            why += f" (its CUDA extension did not load: {load})"
        return why
    return None


def xformers_unusable_reason(device: torch.device) -> str | None:
    """Why xformers cannot run attention on ``device``, or None when it can.

    Probes once per device with a tiny packed forward + backward, so a wheel built for
    another torch/CUDA (its CUDA extension fails to load and xformers refuses every
    operator) is found before training starts.

    Args:
        device: The device the attention will run on.

    Returns:
        None when usable, else a one-line reason.
    """
    if xops is None:
        return "xformers is not installed (pip install 'mmpt[gpu]')"
    if device.type != "cuda":
        return f"xformers has no {device.type} kernels"
    key = str(device)
    if key not in _USABLE:
        _USABLE[key] = _probe(device)
    return _USABLE[key]


def xformers_bias(
    cu_seqlens: torch.Tensor | None, rows: int, row_len: int, causal: bool, device: torch.device
) -> object | None:
    """The xformers attention bias for B packed rows read as one flat row of B * T tokens.

    Args:
        cu_seqlens: Int (S + 1,) flat segment offsets, or None for plain per-row attention.
        rows: B.
        row_len: T.
        causal: Causal within each segment.
        device: Where the bias' offsets live (the query's device).

    Returns:
        ``BlockDiagonalCausalMask`` (``BlockDiagonalMask`` when not causal) over the
        non-empty segments; ``LowerTriangularMask`` or None without ``cu_seqlens``.
    """
    if cu_seqlens is None:
        return xbias.LowerTriangularMask() if causal else None
    kind = xbias.BlockDiagonalCausalMask if causal else xbias.BlockDiagonalMask
    return _BIAS.get(
        cu_seqlens,
        (causal, rows, row_len, str(device)),
        lambda: kind.from_seqlens(segment_lengths(cu_seqlens, rows, row_len), device=device),
    )


def xformers_layout(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, packed: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q/k/v in the layout mmpt hands to ``memory_efficient_attention``.

    Args:
        query: (B, Hq, T, D).
        key: (B, Hkv, T, D), Hq a multiple of Hkv.
        value: (B, Hkv, T, D).
        packed: Flatten the B rows into one (block-diagonal biases need batch 1).

    Returns:
        BMHK (B', M, Hq, D) q/k/v (B' = 1, M = B * T when packed; K/V expanded to Hq heads
        when GQA and any input requires grad), or for GQA without gradients BMGHK
        (B', M, Hkv, Hq / Hkv, D) with K/V broadcast (stride 0) over each group.
    """
    b, hq, t, _ = query.shape
    hkv = key.shape[1]
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (B, T, H, D)
    if packed:
        q, k, v = (x.reshape(1, b * t, *x.shape[2:]) for x in (q, k, v))
    if hq == hkv:
        return q, k, v
    rep = hq // hkv
    if any(x.requires_grad for x in (query, key, value)):  # BMHK: has backward operators
        return q, k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    q = q.unflatten(2, (hkv, rep))
    k, v = (x.unsqueeze(3).expand(*x.shape[:3], rep, x.shape[-1]) for x in (k, v))
    return q, k, v


def xformers_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    causal: bool,
    scale: float | None,
    dropout: float,
) -> torch.Tensor:
    """Packed (or plain causal) attention through xformers.

    Args:
        query: (B, Hq, T, D) on CUDA.
        key: (B, Hkv, T, D).
        value: (B, Hkv, T, D).
        cu_seqlens: Int (S + 1,) flat segment offsets from 0 to B * T, or None.
        causal: Causal within each segment (or row).
        scale: Softmax scale; None uses D ** -0.5.
        dropout: Attention dropout probability.

    Returns:
        (B, Hq, T, D) attention output.
    """
    b, hq, t, _ = query.shape
    bias = xformers_bias(cu_seqlens, b, t, causal, query.device)
    q, k, v = xformers_layout(query, key, value, packed=cu_seqlens is not None)
    out = xops.memory_efficient_attention(q, k, v, attn_bias=bias, p=dropout, scale=scale)
    return out.reshape(b, t, hq, -1).transpose(1, 2)

"""Packed-row bookkeeping shared by every attention backend: segment offsets, ids, memo."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch


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


class Memo:
    """Remembers one value per key tensor, so all layers of a forward share one mask."""

    def __init__(self) -> None:
        self._ref: weakref.ref | None = None
        self._key: tuple = ()
        self._value: Any = None

    def get(self, tensor: torch.Tensor, key: tuple, build: Callable[[], Any]) -> Any:
        """The value built for this ``tensor`` (unmodified) and ``key``, else ``build()``.

        Inference tensors (``torch.inference_mode``) carry no version counter: for them the
        same tensor object is taken as unmodified (batches are not edited in place).
        """
        full = (None if tensor.is_inference() else tensor._version, *key)
        if self._ref is None or self._ref() is not tensor or self._key != full:
            self._ref, self._key, self._value = weakref.ref(tensor), full, build()
        return self._value


def segment_lengths(cu_seqlens: torch.Tensor, rows: int, row_len: int) -> list[int]:
    """Non-empty segment lengths, checked to rise from 0 to B * T and to cut at row starts.

    Args:
        cu_seqlens: Int (S + 1,) flat segment offsets.
        rows: B, the packed rows.
        row_len: T, tokens per row.

    Returns:
        The S' <= S non-zero segment lengths, in order; they sum to B * T.

    Raises:
        ValueError: The offsets do not rise from 0 to B * T or a row start is no boundary.
    """
    cu = cu_seqlens.tolist()  # one host sync per forward (memoized by the callers)
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:], strict=True)]
    cuts = set(range(0, rows * row_len + 1, row_len))
    if cu[0] != 0 or cu[-1] != rows * row_len or min(lengths) < 0 or not cuts <= set(cu):
        raise ValueError(
            f"cu_seqlens must rise from 0 to B * T = {rows} * {row_len} with every row start "
            f"a boundary; got {cu[:4]}...{cu[-2:]}"
        )
    return [n for n in lengths if n > 0]


def segment_ids(cu_seqlens: torch.Tensor, tokens: int) -> torch.Tensor:
    """The segment index of every flat token.

    Args:
        cu_seqlens: Int (S + 1,) flat segment offsets from 0 to ``tokens``.
        tokens: B * T.

    Returns:
        (B * T,) tensor of segment indices (cu_seqlens' dtype and device).
    """
    flat = torch.arange(tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), flat, right=True)

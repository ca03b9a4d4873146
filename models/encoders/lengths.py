"""Exact output lengths of strided 1-D stacks (conv feature encoders, STFTs, subsamplers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import torch

N = TypeVar("N", int, torch.Tensor)


@dataclass(frozen=True)
class ConvLengths:
    """Frames out of a stack of 1-D windows for a given input length. Picklable, weight-free.

    Layer ``i`` maps ``n -> (n + 2 * padding_i - kernel_i) // stride_i + 1`` (floored at 0),
    the formula of ``nn.Conv1d`` and of a centred STFT (kernel = ``n_fft``, stride = hop,
    padding = ``n_fft // 2``). wav2vec 2.0's feature encoder is
    ``ConvLengths((10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2))``: 16000 samples -> 49
    frames (20 ms frames, 50 Hz).

    Attributes:
        kernels: Kernel (window) size of each layer.
        strides: Stride (hop) of each layer.
        paddings: Padding on each side of each layer; empty means 0 everywhere.
    """

    kernels: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    paddings: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.kernels) != len(self.strides):
            raise ValueError(f"{len(self.kernels)} kernels for {len(self.strides)} strides")
        if self.paddings and len(self.paddings) != len(self.kernels):
            raise ValueError(f"{len(self.paddings)} paddings for {len(self.kernels)} kernels")

    def __call__(self, n: N) -> N:
        """Output length for input length ``n`` (an int, or a long tensor of lengths)."""
        pads = self.paddings or (0,) * len(self.kernels)
        for k, s, p in zip(self.kernels, self.strides, pads, strict=True):
            n = (n + 2 * p - k) // s + 1
            n = n.clamp(min=0) if isinstance(n, torch.Tensor) else max(0, n)
        return n

    def then(self, other: ConvLengths) -> ConvLengths:
        """This stack followed by ``other``."""
        pads = (self.paddings or (0,) * len(self.kernels)) + (
            other.paddings or (0,) * len(other.kernels)
        )
        return ConvLengths(self.kernels + other.kernels, self.strides + other.strides, pads)

    @property
    def stride(self) -> int:
        """Input samples per output frame (product of the strides)."""
        out = 1
        for s in self.strides:
            out *= s
        return out

    def min_input(self) -> int:
        """Shortest input that gives at least one output frame."""
        n = 1
        while self(n) < 1:
            n += 1
        return n


def length_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """Boolean validity mask from lengths.

    Args:
        lengths: Long tensor (B,) of valid lengths.
        size: Padded length T.

    Returns:
        Bool tensor (B, T), True on the first ``lengths[b]`` positions of row b.
    """
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


def masked_mean(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean over the valid frames of each row.

    Args:
        x: (B, T, D) frame features.
        lengths: Long tensor (B,), valid frames per row (at least 1).

    Returns:
        (B, D) means.
    """
    mask = length_mask(lengths, x.shape[1]).to(x.dtype).unsqueeze(-1)
    return (x * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def pool_frames(
    frames: torch.Tensor, lengths: torch.Tensor, proj: torch.nn.Module | None = None
) -> torch.Tensor:
    """An audio tower's clip embedding: the mean over valid frames, then ``proj`` if any.

    Args:
        frames: (B, T, D) frame features.
        lengths: Long tensor (B,), valid frames per clip.
        proj: Optional projection D -> E.

    Returns:
        (B, D) or (B, E).
    """
    pooled = masked_mean(frames, lengths)
    return proj(pooled) if proj is not None else pooled

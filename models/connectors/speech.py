"""BLSP modality adapter: speech-encoder frames -> fewer LLM-width tokens.

A strided 1-D convolution subsampler (each layer halves the frame rate) followed by a small
bottleneck adapter, as in BLSP (three stride-2 convolutions, then a bottleneck). Its
:attr:`SpeechAdapter.lengths` gives the exact token count for a frame count without weights,
so the data side can budget packed rows before anything is encoded.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mmpt.models.encoders.lengths import ConvLengths, length_mask


class _Bottleneck(nn.Module):
    """Pre-norm residual bottleneck: ``x + W2 gelu(W1 norm(x))``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, dim) -> (B, T, dim)."""
        return x + self.up(self.act(self.down(self.norm(x))))


class SpeechAdapter(nn.Module):
    """Conv subsampler + bottleneck adapter from audio frames to LLM tokens.

    Args:
        audio_dim: Width of the speech encoder's frame features.
        llm_dim: Width of the LLM's token embeddings.
        subsample: Frame-rate reduction, a power of two (log2(subsample) stride-2 convs with
            kernel 3); 1 keeps every frame. wav2vec 2.0's 50 Hz frames with subsample 8 give
            6.25 tokens per second.
        hidden: Channels of the convolutions (default: ``audio_dim``).
        bottleneck: Width of the bottleneck layers.
        adapter_layers: Residual bottleneck layers after the projection.
    """

    def __init__(
        self,
        audio_dim: int,
        llm_dim: int,
        subsample: int = 8,
        hidden: int | None = None,
        bottleneck: int = 512,
        adapter_layers: int = 1,
    ) -> None:
        super().__init__()
        if subsample < 1 or subsample & (subsample - 1):
            raise ValueError(f"model.audio_adapter.subsample must be a power of 2, got {subsample}")
        self.audio_dim, self.llm_dim, self.subsample = audio_dim, llm_dim, subsample
        self.hidden, self.bottleneck, self.adapter_layers = hidden, bottleneck, adapter_layers
        width = hidden or audio_dim
        convs: list[nn.Module] = []
        in_ch = audio_dim
        for _ in range(int(math.log2(subsample))):
            convs += [nn.Conv1d(in_ch, width, kernel_size=3, stride=2, padding=1), nn.GELU()]
            in_ch = width
        self.convs = nn.Sequential(*convs)
        self.proj = nn.Linear(in_ch, llm_dim)
        self.blocks = nn.Sequential(
            *(_Bottleneck(llm_dim, bottleneck) for _ in range(adapter_layers))
        )
        self.norm = nn.LayerNorm(llm_dim)

    @property
    def lengths(self) -> ConvLengths:
        """Frames in -> tokens out (exact, weight-free)."""
        n = int(math.log2(self.subsample))
        return ConvLengths((3,) * n, (2,) * n, (1,) * n)

    def forward(
        self, frames: torch.Tensor, frame_lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Subsample and adapt.

        Args:
            frames: (B, T, audio_dim) encoder frame features; frames past a clip's length are
                zeroed first and after every convolution, so padding never leaks into its
                last tokens (a clip gives the same tokens alone and padded in a batch).
            frame_lengths: Long tensor (B,), valid frames per clip.

        Returns:
            Tokens (B, T', llm_dim) and their valid counts (B,), ``T' = lengths(T)``.
        """
        x = frames * length_mask(frame_lengths, frames.shape[1]).unsqueeze(-1).to(frames.dtype)
        x, lengths, step = x.transpose(1, 2), frame_lengths, ConvLengths((3,), (2,), (1,))
        for layer in self.convs:  # re-zero past each clip, as its own zero padding would be
            x = layer(x)
            if isinstance(layer, nn.Conv1d):
                lengths = step(lengths)
                x = x * length_mask(lengths, x.shape[2]).unsqueeze(1).to(x.dtype)
        x = x.transpose(1, 2)
        x = self.norm(self.blocks(self.proj(x)))
        return x, self.lengths(frame_lengths)

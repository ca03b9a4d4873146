"""Audio tower trained from scratch: log-mel features -> conv subsampling -> transformer."""

from __future__ import annotations

import math
from typing import Any

import torch
import torchaudio
from torch import nn

from mmpt.preprocess import AudioPreprocess

from . import class_path
from .lengths import ConvLengths, length_mask, masked_mean, pool_frames

N_FFT, HOP = 400, 160  # 25 ms windows, 10 ms hop at 16 kHz
POSITIONS = ("sinusoidal", "learned")
SUB_LAYER = ConvLengths((3,), (2,), (1,))  # one subsampling conv: k=3, s=2, p=1


def sinusoidal_positions(length: int, width: int) -> torch.Tensor:
    """Fixed sin/cos position table (Vaswani et al., 2017).

    Returns:
        (length, width) float32: sines in the even columns, cosines in the odd ones.
    """
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(1e4) / width))
    table = torch.zeros(length, width)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: width // 2])
    return table


class LogMelTower(nn.Module):
    """A CLAP-style audio transformer over per-utterance normalised log-mel frames.

    Samples -> centred STFT mel spectrogram (zero-padded at the edges, so a clip gives the
    same frames alone and padded in a batch) -> ``log(x + 1e-6)`` -> mean/variance
    normalisation per mel bin over the clip's valid frames -> ``subsample`` x time reduction
    by stride-2 convolutions -> linear to ``width`` -> positions -> ``depth`` pre-norm
    transformer layers (padding masked) -> LayerNorm.

    Attributes:
        feature_dim: ``width``.
        output_dim: ``embed_dim`` if > 0, else ``width``.
        proj: Linear ``width -> embed_dim``, or None.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        n_mels: int = 64,
        width: int = 256,
        depth: int = 4,
        heads: int = 4,
        subsample: int = 2,
        embed_dim: int = 0,
        max_seconds: float = 10.0,
        positions: str = "sinusoidal",
    ) -> None:
        """Build the tower (random init).

        Args:
            sample_rate: Input rate in Hz (STFT: 400-sample windows, 160-sample hop).
            n_mels: Mel bins.
            width: Transformer width.
            depth: Transformer layers.
            heads: Attention heads.
            subsample: Time reduction after the STFT: 1, 2 or 4 (stride-2 conv layers).
            embed_dim: Projection width of ``forward``; 0 for none.
            max_seconds: Longest clip; sizes the position table.
            positions: ``"sinusoidal"`` (fixed) or ``"learned"``.

        Raises:
            ValueError: For another ``subsample`` or ``positions``.
        """
        super().__init__()
        if subsample not in (1, 2, 4):
            raise ValueError(f"subsample must be 1, 2 or 4, got {subsample}")
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
        self._init_args: dict[str, Any] = {
            "sample_rate": sample_rate,
            "n_mels": n_mels,
            "width": width,
            "depth": depth,
            "heads": heads,
            "subsample": subsample,
            "embed_dim": embed_dim,
            "max_seconds": max_seconds,
            "positions": positions,
        }
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate, n_fft=N_FFT, win_length=N_FFT, hop_length=HOP, n_mels=n_mels,
            center=True, pad_mode="constant",
        )  # fmt: skip
        self._stft = ConvLengths((N_FFT,), (HOP,), (N_FFT // 2,))
        n_sub = int(math.log2(subsample))
        self._lengths = self._stft
        for _ in range(n_sub):
            self._lengths = self._lengths.then(SUB_LAYER)
        self.subsample = nn.ModuleList(
            nn.Sequential(nn.Conv1d(n_mels, n_mels, 3, stride=2, padding=1), nn.GELU())
            for _ in range(n_sub)
        )
        self.input_proj = nn.Linear(n_mels, width)
        self._audio_preprocess = AudioPreprocess(
            sample_rate=sample_rate,
            max_seconds=max_seconds,
            min_seconds=self._lengths.min_input() / sample_rate,
            normalize=False,  # the tower normalises its own features
        )
        max_frames = self._lengths(self._audio_preprocess.max_samples)
        table = sinusoidal_positions(max_frames, width)
        if positions == "learned":
            self.pos_embed = nn.Parameter(table.normal_(std=0.02))
        else:
            self.register_buffer("pos_embed", table, persistent=False)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width,
                heads,
                4 * width,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )  # fmt: skip
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.feature_dim = width
        self.output_dim = embed_dim if embed_dim > 0 else width
        self.proj = nn.Linear(width, embed_dim) if embed_dim > 0 else None

    @property
    def audio_preprocess(self) -> AudioPreprocess:
        """Sample rate and crop length; ``normalize`` False (features are normalised here)."""
        return self._audio_preprocess

    @property
    def lengths(self) -> ConvLengths:
        """Samples -> frames: centred STFT then the subsampling convolutions."""
        return self._lengths

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Valid frames (B,) for clip lengths (B,) in samples."""
        return self.lengths(lengths)

    def log_mel(self, audio: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Normalised log-mel frames, zero past each clip's frames.

        Args:
            audio: (B, N) float waveforms, zero-padded.
            lengths: Long tensor (B,), clip lengths in samples.

        Returns:
            (B, T0, n_mels) with T0 = N // 160 + 1; each bin zero-mean unit-variance over the
            clip's ``lengths // 160 + 1`` valid frames.
        """
        audio = audio * length_mask(lengths, audio.shape[1]).to(audio.dtype)
        with torch.autocast(audio.device.type, enabled=False):
            x = torch.log(self.mel(audio.float()) + 1e-6).transpose(1, 2)
        frames = self._stft(lengths)
        mean = masked_mean(x, frames)[:, None]
        var = masked_mean((x - mean).pow(2), frames)[:, None]
        x = (x - mean) / torch.sqrt(var + 1e-5)
        return x * length_mask(frames, x.shape[1]).unsqueeze(-1).to(x.dtype)

    def frame_features(
        self, audio: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Transformer frame features of a zero-padded batch.

        Args:
            audio: (B, N) float waveforms.
            lengths: Long tensor (B,), clip lengths in samples.

        Returns:
            features: (B, T, width) with T = ``lengths(N)``.
            frame_lengths: Long tensor (B,), valid frames per row.

        Raises:
            ValueError: When the clip is longer than ``max_seconds`` (position table).
        """
        x = self.log_mel(audio, lengths).transpose(1, 2)  # (B, n_mels, T0)
        frames = self._stft(lengths)
        for layer in self.subsample:  # re-zero padding so it matches a clip's own zero pad
            x, frames = layer(x), SUB_LAYER(frames)
            x = x * length_mask(frames, x.shape[2]).unsqueeze(1).to(x.dtype)
        x = self.input_proj(x.transpose(1, 2))
        if x.shape[1] > self.pos_embed.shape[0]:
            raise ValueError(
                f"{audio.shape[1]} samples give {x.shape[1]} frames, more than max_seconds="
                f"{self.audio_preprocess.max_seconds} allows ({self.pos_embed.shape[0]})"
            )
        x = x + self.pos_embed[: x.shape[1]].to(x.dtype)
        padding = ~length_mask(frames, x.shape[1])
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=padding)
        return self.norm(x), frames

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Pooled clip embeddings.

        Args:
            audio: (B, N) float waveforms, zero-padded.
            lengths: Long tensor (B,), clip lengths in samples.

        Returns:
            (B, output_dim): mean over valid frames, projected when ``embed_dim`` > 0.
        """
        return pool_frames(*self.frame_features(audio, lengths), self.proj)

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable ``class_path``/``init_args`` that rebuild this tower."""
        return {"class_path": class_path(self), "init_args": dict(self._init_args)}

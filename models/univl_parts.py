"""UniVL's transformer parts: video encoder over frame features, cross encoder, caption decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def transformer_encoder(
    hidden: int, layers: int, heads: int, ff_mult: int, dropout: float
) -> nn.TransformerEncoder:
    """Pre-norm GELU ``nn.TransformerEncoder`` (batch first) with a final LayerNorm."""
    layer = nn.TransformerEncoderLayer(
        hidden, heads, ff_mult * hidden, dropout, "gelu", batch_first=True, norm_first=True
    )
    return nn.TransformerEncoder(
        layer, layers, norm=nn.LayerNorm(hidden), enable_nested_tensor=False
    )


class FrameFeatureEncoder(nn.Module):
    """UniVL's video encoder: linear-projected frame (or clip) features + positions + transformer.

    Args:
        input_dim: Feature width D_in (1024 for S3D features).
        hidden: Model width H (the text encoder's hidden size).
        layers: Transformer layers (6 in UniVL).
        heads: Attention heads.
        ff_mult: Feed-forward width multiple.
        max_frames: Longest feature sequence (position embeddings).
        dropout: Dropout in the layers.
    """

    def __init__(
        self,
        input_dim: int,
        hidden: int,
        layers: int,
        heads: int,
        ff_mult: int = 4,
        max_frames: int = 48,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.proj = nn.Linear(input_dim, hidden)
        self.pos = nn.Embedding(max_frames, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.encoder = transformer_encoder(hidden, layers, heads, ff_mult, dropout)
        self.max_frames = max_frames

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(N, T, D_in) features, (N, T) bool valid frames -> (N, T, H) states."""
        t = features.shape[1]
        if t > self.max_frames:
            raise ValueError(
                f"{t} frames exceed max_frames={self.max_frames} of the video encoder "
                "(model.max_frames, or data.max_frames to cut them)"
            )
        x = self.proj(features) + self.pos(torch.arange(t, device=features.device))
        return self.encoder(self.norm(x), src_key_padding_mask=~mask)


class CrossEncoder(nn.Module):
    """Transformer over the concatenation [text states; video states], with type embeddings.

    Args:
        hidden: Width H of both streams.
        layers: Transformer layers (2 in UniVL).
        heads: Attention heads.
        ff_mult: Feed-forward width multiple.
        dropout: Dropout in the layers.
    """

    def __init__(
        self, hidden: int, layers: int, heads: int, ff_mult: int = 4, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.types = nn.Embedding(2, hidden)
        self.encoder = transformer_encoder(hidden, layers, heads, ff_mult, dropout)

    def forward(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        video: torch.Tensor,
        video_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fuse paired streams.

        Args:
            text: (B, L, H) text states; ``text_mask`` (B, L) bool, True on real tokens.
            video: (B, T, H) video states; ``video_mask`` (B, T) bool, True on real frames.

        Returns:
            (B, L + T, H) fused states (text first: position 0 is the text's [CLS]) and the
            (B, L + T) bool mask.
        """
        x = torch.cat([text + self.types.weight[0], video + self.types.weight[1]], dim=1)
        mask = torch.cat([text_mask, video_mask], dim=1)
        return self.encoder(x, src_key_padding_mask=~mask), mask


class CaptionDecoder(nn.Module):
    """Causal transformer decoder with cross-attention to the cross encoder, writing text.

    Word embeddings (and the output projection) are tied to the text encoder's, as in UniVL.

    Args:
        embedding: The text encoder's input word embedding (vocab, H); shared, not copied.
        layers: Decoder layers (3 in UniVL).
        heads: Attention heads.
        ff_mult: Feed-forward width multiple.
        max_len: Longest token sequence (position embeddings).
        dropout: Dropout in the layers.
    """

    def __init__(
        self,
        embedding: nn.Embedding,
        layers: int,
        heads: int,
        ff_mult: int = 4,
        max_len: int = 64,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        vocab, hidden = embedding.weight.shape
        self.embed = embedding
        self.pos = nn.Embedding(max_len, hidden)
        self.norm_in = nn.LayerNorm(hidden)
        layer = nn.TransformerDecoderLayer(
            hidden, heads, ff_mult * hidden, dropout, "gelu", batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerDecoder(layer, layers, norm=nn.LayerNorm(hidden))
        self.bias = nn.Parameter(torch.zeros(vocab))
        self.max_len = max_len

    def forward(
        self, tokens: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor
    ) -> torch.Tensor:
        """Next-token logits.

        Args:
            tokens: (B, S) long ids, starting with the start token.
            memory: (B, S_m, H) cross encoder states; ``memory_mask`` (B, S_m) bool valid.

        Returns:
            (B, S, vocab) logits; row s predicts token s + 1.
        """
        s = tokens.shape[1]
        if s > self.max_len:
            raise ValueError(f"{s} tokens exceed the decoder's max_len={self.max_len}")
        x = self.embed(tokens) + self.pos(torch.arange(s, device=tokens.device))
        causal = nn.Transformer.generate_square_subsequent_mask(s, device=tokens.device)
        h = self.decoder(
            self.norm_in(x),
            memory,
            tgt_mask=causal,
            tgt_is_causal=True,
            memory_key_padding_mask=~memory_mask,
        )
        return F.linear(h, self.embed.weight, self.bias)

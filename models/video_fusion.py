"""Fusion in the backbone (EgoVLPv2, FIBER): gated cross-attention in the top layers of both towers.

A video ViT tower and a BERT/RoBERTa tower run layer by layer together (explicit co-forward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.masking_utils import create_bidirectional_mask

from mmpt.models.encoders.hf_text import HFTextTower
from mmpt.models.encoders.video_vit import VideoViTTower
from mmpt.models.fusion import GatedCrossAttentionBlock


@dataclass(eq=False)
class TextStream:
    """Hidden states of the text tower at some depth, with their padding mask.

    Attributes:
        hidden: (B, L, D_t) hidden states.
        mask: (B, L) bool, True for real tokens (keys of self- and cross-attention).

    """

    hidden: torch.Tensor
    mask: torch.Tensor

    def select(self, index: torch.Tensor) -> TextStream:
        """Rows ``index`` (K,) of the batch, e.g. to pair texts with other videos."""
        return TextStream(self.hidden[index], self.mask[index])


def text_layers(text: HFTextTower) -> nn.ModuleList:
    """The encoder layers of a BERT/RoBERTa-style tower (``model.encoder.layer``).

    Raises:
        TypeError: For an encoder without ``encoder.layer`` (e.g. DistilBERT).

    """
    layers = getattr(getattr(text.model, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(
            f"{type(text.model).__name__} has no `encoder.layer` list: backbone fusion supports "
            "BERT/RoBERTa-style Hugging Face encoders."
        )
    return layers


class BackboneFusion(nn.Module):
    """Gated cross-attention blocks for the top ``layers`` layers of both towers.

    The towers are passed to every call instead of being stored, so their parameters keep their
    names (``vision.*``, ``text.*``) and live once in the owning module. The forward is split:
    :meth:`video_bottom` / :meth:`text_bottom` run the embeddings and the bottom layers of each
    tower independently (the same computation as the towers' own forward), then :meth:`top` runs
    the top ``layers`` layers of both together. In fused mode, before top layer j of each tower,
    both streams exchange information at the same depth (both updates read the inputs of the
    layer, so the order does not matter)::

        v = v + tanh(a_v) XAttn(LN(v), t) ; v = v + tanh(f_v) FF(v)      (video <- text)
        t = t + tanh(a_t) XAttn(LN(t), v) ; t = t + tanh(f_t) FF(t)      (text <- video)

    with :class:`~mmpt.models.fusion.GatedCrossAttentionBlock` (keys/values projected from the
    other stream's width, gates initialised at 0). Video queries are all tokens of all frames,
    keys the text tokens (padding masked); text queries are all text tokens, keys all tokens of
    all frames. The towers' depths may differ: top layer j is video block ``Lv - K + j`` and text
    layer ``Lt - K + j``. With ``fuse=False``, or with all gates at 0, :meth:`top` gives exactly
    the towers' own outputs.

    Attributes:
        layers: K, the number of fused top layers.
        video_blocks: K blocks, queries video (D_v), keys text (D_t).
        text_blocks: K blocks, queries text (D_t), keys video (D_v).

    """

    def __init__(self, vision: VideoViTTower, text: HFTextTower, layers: int = 6, ff_mult: int = 4):
        """Build the blocks for the two towers' widths and head counts.

        Args:
            vision: The video tower (widths read here, not stored).
            text: The BERT/RoBERTa text tower (widths read here, not stored).
            layers: K, fused top layers; at most the depth of the shallower tower.
            ff_mult: Feed-forward width multiple of the blocks.

        Raises:
            ValueError: When ``layers`` is not in ``1..min(depths)``.

        """
        super().__init__()
        depth = min(len(vision.model.blocks), len(text_layers(text)))
        if not 1 <= layers <= depth:
            raise ValueError(f"fusion layers must be in 1..{depth} (the shallower tower's depth)")
        dv, dt = int(vision.model.embed_dim), int(text.model.config.hidden_size)
        hv = int(vision.temporal[0].attn.num_heads)
        ht = int(text.model.config.num_attention_heads)
        self.layers = layers
        self.video_blocks = nn.ModuleList(
            GatedCrossAttentionBlock(dv, dt, hv, ff_mult) for _ in range(layers)
        )
        self.text_blocks = nn.ModuleList(
            GatedCrossAttentionBlock(dt, dv, ht, ff_mult) for _ in range(layers)
        )

    def gates(self) -> list[nn.Parameter]:
        """All scalar gates (attention and feed-forward, both directions)."""
        blocks = [*self.video_blocks, *self.text_blocks]
        return [g for b in blocks for g in (b.attn_gate, b.ff_gate)]

    def video_bottom(self, vision: VideoViTTower, videos: torch.Tensor) -> torch.Tensor:
        """Embeddings and the bottom ``Lv - K`` blocks, as in ``VideoViTTower.frame_tokens``.

        Args:
            vision: The video tower.
            videos: (B, T, C, H, W) normalised frames, T <= ``vision.max_frames``.

        Returns:
            (B, T, L, D_v) tokens (L = prefix + patch tokens), before the top K blocks.

        """
        if videos.ndim != 5 or videos.shape[1] > vision.max_frames:
            raise ValueError(f"expected (B, T<={vision.max_frames}, C, H, W), got {videos.shape}")
        b, t = videos.shape[:2]
        m = vision.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(videos.flatten(0, 1)))))
        length, dim = x.shape[1:]
        x = (x.view(b, t, length, dim) + vision.temporal_pos_embed[:t, None]).view(-1, length, dim)
        for i in range(len(m.blocks) - self.layers):
            x = _video_layer(vision, x, i, t)
        return x.view(b, t, length, dim)

    def text_bottom(
        self, text: HFTextTower, tokens: torch.Tensor, mask: torch.Tensor | None = None
    ) -> TextStream:
        """Embeddings and the bottom ``Lt - K`` layers, as in ``HFTextTower.forward``.

        Args:
            text: The text tower.
            tokens: (B, L) long ids.
            mask: (B, L) bool, True for real tokens; default ``tokens != text.pad_id``. Pass the
                mask of the unmasked text when ``tokens`` hold MLM replacements.

        Returns:
            The stream before the top K layers.

        """
        mask = (tokens != text.pad_id) if mask is None else mask.bool()
        stream = TextStream(text.model.embeddings(input_ids=tokens), mask)
        layers = text_layers(text)
        return _text_layers(text, stream, range(len(layers) - self.layers))

    def top(
        self,
        vision: VideoViTTower,
        text: HFTextTower,
        video: torch.Tensor,
        stream: TextStream,
        fuse: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the top K layers of both towers, exchanging information when ``fuse``.

        Args:
            vision: The video tower.
            text: The text tower.
            video: (B, T, L_v, D_v) output of :meth:`video_bottom`.
            stream: Output of :meth:`text_bottom`, same B.
            fuse: False: the towers run independently (dual encoder).

        Returns:
            (B, T, L_v, D_v) final normed video tokens (as ``frame_tokens``) and (B, L, D_t) last
            text hidden states.

        """
        b, t, length, dv = video.shape
        if stream.hidden.shape[0] != b:
            raise ValueError(f"{b} videos but {stream.hidden.shape[0]} texts")
        start_v = len(vision.model.blocks) - self.layers
        start_t = len(text_layers(text)) - self.layers
        x = video.reshape(b * t, length, dv)
        for j in range(self.layers):
            if fuse:
                flat = x.reshape(
                    b, t * length, dv
                )  # cross-attention is per query: frames flattened
                fused = self.video_blocks[j](flat, stream.hidden, visual_mask=stream.mask)
                hidden = self.text_blocks[j](stream.hidden, flat)
                x, stream = fused.view(b * t, length, dv), TextStream(hidden, stream.mask)
            x = _video_layer(vision, x, start_v + j, t)
            stream = _text_layers(text, stream, [start_t + j])
        return vision.model.norm(x).view(b, t, length, dv), stream.hidden


def _video_layer(vision: VideoViTTower, x: torch.Tensor, index: int, frames: int) -> torch.Tensor:
    """Temporal attention then timm block ``index`` on (B * T, L, D) tokens."""

    def layer(x: torch.Tensor) -> torch.Tensor:
        x = x + vision.temporal[index](x, frames)
        return vision.model.blocks[index](x)

    if vision.grad_checkpointing and torch.is_grad_enabled():
        return checkpoint(layer, x, use_reentrant=False)
    return layer(x)


def _text_layers(text: HFTextTower, stream: TextStream, indices: range | list[int]) -> TextStream:
    """HF layers ``indices`` with the model's own 4D mask for its attention implementation."""
    indices = list(indices)
    if not indices:
        return stream
    model, hidden = text.model, stream.hidden
    # Built exactly as BertModel/RobertaModel do (None when nothing is padded, with SDPA).
    mask4d = create_bidirectional_mask(
        config=model.config, inputs_embeds=hidden, attention_mask=stream.mask.long()
    )
    layers = text_layers(text)
    for i in indices:
        out = layers[i](hidden, mask4d)
        hidden = out[0] if isinstance(out, tuple) else out  # transformers < 5 returns tuples
    return TextStream(hidden, stream.mask)


def video_embedding(vision: VideoViTTower, tokens: torch.Tensor) -> torch.Tensor:
    """Tower output from final tokens: (B, T, L, D_v) -> (B, E), as ``VideoViTTower.forward``."""
    b, t = tokens.shape[:2]
    return vision.model.forward_head(tokens.flatten(0, 1)).view(b, t, -1).mean(dim=1)


def text_embedding(text: HFTextTower, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Tower output from last hidden states (B, L, D_t) and (B, L) mask -> (B, E).

    Pools as ``HFTextTower.forward`` (first token or masked mean), then projects.
    """
    if text.pooling == "cls":
        pooled = hidden[:, 0]
    else:
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    return text.proj(pooled)

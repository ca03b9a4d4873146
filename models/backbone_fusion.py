"""Fusion in the backbone (EgoVLPv2, FIBER): gated cross-attention in the top layers of both towers.

A vision tower (video ViT, timm ViT or Swin) and a BERT/RoBERTa tower run layer by layer together
(explicit co-forward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

from mmpt.models.encoders.hf_text import HFTextTower
from mmpt.models.fusion import GatedCrossAttentionBlock
from mmpt.models.fusion_towers import vision_stack


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
    :meth:`vision_bottom` / :meth:`text_bottom` run the embeddings and the bottom layers of each
    tower independently (the same computation as the towers' own forward), then :meth:`top` runs
    the top ``layers`` layers of both together. In fused mode, before top layer j of each tower,
    both streams exchange information at the same depth (both updates read the inputs of the
    layer, so the order does not matter)::

        v = v + tanh(a_v) XAttn(LN(v), t) ; v = v + tanh(f_v) FF(v)      (vision <- text)
        t = t + tanh(a_t) XAttn(LN(t), v) ; t = t + tanh(f_t) FF(t)      (text <- vision)

    with :class:`~mmpt.models.fusion.GatedCrossAttentionBlock` (keys/values projected from the
    other stream's width, gates initialised at 0). Vision queries are all its tokens (all frames
    of a clip), keys the text tokens (padding masked); text queries are all text tokens, keys all
    vision tokens. The vision tower is any :func:`~mmpt.models.fusion_towers.vision_stack`
    (video ViT, timm ViT, timm Swin: EgoVLPv2 and FIBER share this code). The towers' depths may
    differ: top layer j is vision block ``Lv - K + j`` and text layer ``Lt - K + j``. With
    ``fuse=False``, or with all gates at 0, :meth:`top` gives exactly the towers' own outputs.

    Attributes:
        layers: K, the number of fused top layers.
        video_blocks: K blocks, queries vision (D_v of that block), keys text (D_t). (The name
            is kept from the video-only version so EgoVLPv2 checkpoints still load.)
        text_blocks: K blocks, queries text (D_t), keys vision.

    """

    def __init__(self, vision: nn.Module, text: HFTextTower, layers: int = 6, ff_mult: int = 4):
        """Build the blocks for the two towers' widths and head counts.

        Args:
            vision: The vision tower (widths read here, not stored).
            text: The BERT/RoBERTa text tower (widths read here, not stored).
            layers: K, fused top layers; at most the depth of the shallower tower.
            ff_mult: Feed-forward width multiple of the blocks.

        Raises:
            ValueError: When ``layers`` is not in ``1..min(depths)``.

        """
        super().__init__()
        stack = vision_stack(vision)
        depth = min(stack.depth, len(text_layers(text)))
        if not 1 <= layers <= depth:
            raise ValueError(f"fusion layers must be in 1..{depth} (the shallower tower's depth)")
        dt = int(text.model.config.hidden_size)
        ht = int(text.model.config.num_attention_heads)
        top = range(stack.depth - layers, stack.depth)
        self.layers = layers
        self.video_blocks = nn.ModuleList(
            GatedCrossAttentionBlock(stack.width(i), dt, stack.heads(i), ff_mult) for i in top
        )
        self.text_blocks = nn.ModuleList(
            GatedCrossAttentionBlock(dt, stack.width(i), ht, ff_mult) for i in top
        )

    def gates(self) -> list[nn.Parameter]:
        """All scalar gates (attention and feed-forward, both directions)."""
        blocks = [*self.video_blocks, *self.text_blocks]
        return [g for b in blocks for g in (b.attn_gate, b.ff_gate)]

    def vision_bottom(self, vision: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """Embeddings and the bottom ``Lv - K`` blocks, as in the tower's own forward.

        Args:
            vision: The vision tower.
            pixels: Normalised (B, C, H, W) images, or (B, T, C, H, W) clips for a video tower.

        Returns:
            The batch-first state before the top K blocks: (B, T, L, D_v) for video, (B, L, D_v)
            for a ViT, (B, h, w, C) for Swin.

        """
        if hasattr(vision, "check_channels"):
            pixels = vision.check_channels(pixels)
        stack = vision_stack(vision)
        x = stack.embed(pixels)
        for i in range(stack.depth - self.layers):
            x = stack.block(x, i)
        return x

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
        vision: nn.Module,
        text: HFTextTower,
        state: torch.Tensor,
        stream: TextStream,
        fuse: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the top K layers of both towers, exchanging information when ``fuse``.

        Args:
            vision: The vision tower.
            text: The text tower.
            state: Output of :meth:`vision_bottom` (B first).
            stream: Output of :meth:`text_bottom`, same B.
            fuse: False: the towers run independently (dual encoder).

        Returns:
            Final normed vision tokens (layout of ``state``; for video as ``frame_tokens``) and
            (B, L, D_t) last text hidden states.

        """
        if not fuse:
            return self.vision_top(vision, state), self.text_top(text, stream).hidden
        b = state.shape[0]
        if stream.hidden.shape[0] != b:
            raise ValueError(f"{b} images or videos but {stream.hidden.shape[0]} texts")
        stack = vision_stack(vision)
        start_v = stack.depth - self.layers
        start_t = len(text_layers(text)) - self.layers
        x = state
        for j in range(self.layers):
            if fuse:
                flat = stack.flat(x)
                fused = self.video_blocks[j](flat, stream.hidden, visual_mask=stream.mask)
                hidden = self.text_blocks[j](stream.hidden, flat)
                x, stream = stack.unflat(fused, x), TextStream(hidden, stream.mask)
            x = stack.block(x, start_v + j)
            stream = _text_layers(text, stream, [start_t + j])
        return stack.final(x), stream.hidden

    def vision_top(self, vision: nn.Module, state: torch.Tensor) -> torch.Tensor:
        """The top K vision blocks and the final norm, unfused (any batch size)."""
        stack = vision_stack(vision)
        for i in range(stack.depth - self.layers, stack.depth):
            state = stack.block(state, i)
        return stack.final(state)

    def text_top(self, text: HFTextTower, stream: TextStream) -> TextStream:
        """The top K text layers, unfused (any batch size)."""
        depth = len(text_layers(text))
        return _text_layers(text, stream, range(depth - self.layers, depth))

    def pair_outputs(
        self,
        vision: nn.Module,
        text: HFTextTower,
        state: torch.Tensor,
        stream: TextStream,
        fuse: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`top`, then the towers' outputs and the matching heads' pair state.

        Returns:
            Vision (B, E) and text (B, E) tower outputs (not normalised) and the (B, D_v + D_t)
            pair state: :func:`vision_pooled` and :func:`text_pooled` (the [CLS] token of a
            ``pooling="cls"`` tower, the masked token mean of a ``"mean"`` one).

        """
        final, hidden = self.top(vision, text, state, stream, fuse=fuse)
        pooled = text_pooled(text, hidden, stream.mask)
        cls = torch.cat([vision_pooled(vision, final), pooled], dim=-1)
        return vision_embedding(vision, final), text.proj(pooled), cls


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


def vision_embedding(vision: nn.Module, final: torch.Tensor) -> torch.Tensor:
    """Tower output (B, E) from the final tokens of :meth:`BackboneFusion.top` (as the tower)."""
    return vision_stack(vision).embedding(final)


def vision_pooled(vision: nn.Module, final: torch.Tensor) -> torch.Tensor:
    """(B, D_v) summary of the final vision tokens for matching heads (class token ...)."""
    return vision_stack(vision).pooled(final)


def text_pooled(text: HFTextTower, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, D_t) summary of last hidden states (B, L, D_t) with (B, L) mask, before projection.

    Pools as ``HFTextTower.forward``: the first token, or the mean over real tokens.
    """
    if text.pooling == "cls":
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def text_embedding(text: HFTextTower, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Tower output (B, E): :func:`text_pooled` of (B, L, D_t) hidden states, projected."""
    return text.proj(text_pooled(text, hidden, mask))

"""Flamingo-style gated cross-attention inserted into an HF decoder: fusion without token injection.

``insert_gated_cross_attention(llm, vision_dim, every)`` gives decoder layers ``every - 1,
2 * every - 1, ...`` (as OpenFlamingo) a ``GatedCrossAttentionBlock`` child ``gated_cross_attn``
run by a forward pre-hook on the layer's input; nothing in transformers is patched, and the LLM's
parameter names and layer classes are unchanged. Blocks share a ``FusionContext`` (an attribute
of each block, not a global)::

    blocks = insert_gated_cross_attention(llm, vision_dim=1152, every=4)
    blocks.context.set(visual_tokens, visual_mask=vm, text_mask=tm)
    llm(input_ids=ids, labels=labels).loss.backward()  # keep the context set until backward

Masks (Flamingo convention): ``text_mask[b, t]`` is True from the first image marker of sample b
on (marker included; ``text_mask_from_image_tokens``). Tokens before it, and samples without
images, see nothing and pass through unchanged (cross-attention AND feed-forward skipped; Flamingo
runs the feed-forward on all tokens), so text-only data runs the original LLM. ``cross_mask``
(B, T, N) restricts which visual tokens each token sees (packed rows; latest image only).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from mmpt.batch import VLMBatch

BLOCK_ATTR = "gated_cross_attn"


@dataclass
class FusionConfig:
    """Gated cross-attention fusion (Flamingo) instead of token injection.

    Attributes:
        every: A block before every k-th decoder layer.
        heads: Cross-attention heads (default: the LLM's).
        ff_mult: Feed-forward width multiple of the blocks.
    """

    every: int = 4
    heads: int | None = None
    ff_mult: int = 4


def text_mask_from_image_tokens(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Flamingo text mask from image markers: (B, T) ids -> (B, T) bool, True from the first on."""
    return (input_ids == image_token_id).cumsum(dim=-1) > 0


@dataclass(eq=False)
class FusionContext:
    """Visual inputs that the gated blocks read in the following LLM forward passes.

    ``set`` keeps them until the next ``set``/``clear`` (none set: blocks skipped). Keep them
    until ``backward``: checkpointing around a whole layer (torch ``checkpoint_wrapper``,
    transformers < 5) re-runs the hook in backward. ``generate`` works: with k beams/returned
    sequences each sample is repeated k times (as ``input_ids``); with a KV cache, decode steps
    see images iff a prompt token of their sample does (``text_mask``) and see what the last
    prompt token sees (``cross_mask``; generation prompts are left-padded).

    Attributes:
        features: (B, N, vision_dim) visual tokens (e.g. connector outputs), or None.
        visual_mask: (B, N) bool, True for real visual tokens (False = padding; the opposite of
            torch's ``key_padding_mask``, like HF attention masks), or None (all real).
        text_mask: (B, T) bool, True for text tokens that may see images, or None (all may).
        cross_mask: (B, T, N) bool, True where text token t may see visual token n, or None.

    """

    features: torch.Tensor | None = None
    visual_mask: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    cross_mask: torch.Tensor | None = None

    def set(
        self,
        features: torch.Tensor,
        visual_mask: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        cross_mask: torch.Tensor | None = None,
    ) -> None:
        """Store visual tokens (B, N, D) and optional bool/0-1 masks (see the attributes).

        Raises:
            ValueError: When a mask is not (B, N), (B, T) or (B, T, N) respectively.

        """
        if features.ndim != 3:
            raise ValueError(f"features must be (B, N, vision_dim), got {tuple(features.shape)}")
        b, n, _ = features.shape
        t = next((m.shape[1] for m in (text_mask, cross_mask) if m is not None and m.ndim > 1), 0)
        shapes = {"visual": (b, n), "text": (b, t), "cross": (b, t, n)}
        for name, mask in zip(shapes, (visual_mask, text_mask, cross_mask), strict=True):
            if mask is not None and tuple(mask.shape) != shapes[name]:
                raise ValueError(f"{name}_mask must be {shapes[name]}, got {tuple(mask.shape)}")
        self.features = features
        self.visual_mask, self.text_mask, self.cross_mask = (
            None if m is None else m.bool() for m in (visual_mask, text_mask, cross_mask)
        )

    def clear(self) -> None:
        """Forget the visual inputs (the blocks become no-ops) and release their memory."""
        self.features = self.visual_mask = self.text_mask = self.cross_mask = None

    def inputs_for(self, batch: int, length: int) -> tuple[torch.Tensor, tuple[Any, Any, Any]]:
        """Features and (visual, text, cross) masks matched to hidden states (batch, length, D).

        Raises:
            RuntimeError: When no features are set.
            ValueError: When batch or length cannot be matched (see the class docstring).

        """
        if self.features is None:
            raise RuntimeError("FusionContext has no features: call context.set(...) first")
        features = self.features
        visual, text, cross = self.visual_mask, self.text_mask, self.cross_mask
        if batch != features.shape[0]:
            if batch % features.shape[0]:
                raise ValueError(f"hidden batch {batch} is not a multiple of {features.shape[0]}")
            k = batch // features.shape[0]
            features, visual, text, cross = (
                None if x is None else x.repeat_interleave(k, dim=0)
                for x in (features, visual, text, cross)
            )
        covered = next((m.shape[1] for m in (text, cross) if m is not None), length)
        if length > covered:
            raise ValueError(f"{length} text tokens but the masks cover {covered}: set full masks")
        if length < covered:  # KV-cache decoding
            text = None if text is None else text.any(1, keepdim=True).expand(batch, length)
            cross = None if cross is None else cross[:, -1:].expand(batch, length, -1)
        return features, (visual, text, cross)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, H * d) -> (B, H, L, d)."""
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


class GatedCrossAttentionBlock(nn.Module):
    """Tanh-gated cross-attention + tanh-gated feed-forward (Flamingo GATED XATTN-DENSE).

    ``y = x + tanh(a) * XAttn(LN(x), features)``, then ``y + tanh(f) * FF(y)`` with
    ``FF = LN-Linear-GELU-Linear``. The scalar gates a and f start at 0, so at initialisation the
    block is exactly the identity, while the gates still get gradients (tanh'(0) = 1). The other
    weights get zero gradient until a gate moves away from 0 (after the first optimiser step).

    Attributes:
        attn_gate: (1,) gate of the cross-attention residual, initialised to 0.
        ff_gate: (1,) gate of the feed-forward residual, initialised to 0.
        context: ``FusionContext`` read by the decoder-layer hook (None for a standalone block).

    """

    def __init__(self, dim: int, vision_dim: int, heads: int, ff_mult: int = 4) -> None:
        """Build the block.

        Args:
            dim: Hidden size of the LLM (queries and output).
            vision_dim: Width of the visual tokens (keys/values).
            heads: Attention heads; must divide ``dim``.
            ff_mult: Feed-forward hidden width as a multiple of ``dim``.

        Raises:
            ValueError: When ``heads`` does not divide ``dim`` or a size is not positive.

        """
        super().__init__()
        if min(dim, vision_dim, heads, ff_mult) < 1 or dim % heads:
            raise ValueError(f"need positive sizes and heads | dim, got dim={dim}, heads={heads}")
        self.dim, self.vision_dim, self.heads = dim, vision_dim, heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(vision_dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, ff_mult * dim, bias=False),
            nn.GELU(),
            nn.Linear(ff_mult * dim, dim, bias=False),
        )
        self.ff_gate = nn.Parameter(torch.zeros(1))
        self.context: FusionContext | None = None

    def forward(
        self,
        hidden: torch.Tensor,
        features: torch.Tensor,
        visual_mask: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        cross_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Let the text tokens attend to the visual tokens.

        Args:
            hidden: (B, T, dim) LLM hidden states (queries).
            features: (B, N, vision_dim) visual tokens (keys and values).
            visual_mask: (B, N) bool, True for real visual tokens; None: all real.
            text_mask: (B, T) bool, True for tokens that may see images; None: all may.
            cross_mask: (B, T, N) bool, True where token t may see visual token n; None: all.

        Returns:
            (B, T, dim) hidden states. Tokens allowed to see no visual token are unchanged.

        """
        if features.shape[0] != hidden.shape[0] or features.shape[-1] != self.vision_dim:
            raise ValueError(f"features {tuple(features.shape)} are not (B, N, {self.vision_dim})")
        parts = [] if cross_mask is None else [cross_mask.bool()]  # (B, T, N)
        parts += [] if visual_mask is None else [visual_mask.bool()[:, None, :]]  # (B, 1, N)
        parts += [] if text_mask is None else [text_mask.bool()[:, :, None]]  # (B, T, 1)
        allowed = functools.reduce(torch.logical_and, parts) if parts else None  # t may see n
        seen = attn_mask = None  # rows that may see nothing attend to all (no NaN), zeroed below
        if allowed is not None:
            seen = allowed.any(-1, keepdim=True)  # (B, T or 1, 1)
            attn_mask = (allowed | ~seen)[:, None]  # (B, 1, T or 1, N or 1)
        q = _split_heads(self.to_q(self.norm(hidden)), self.heads)
        k, v = self.to_kv(features.to(hidden.dtype)).chunk(2, dim=-1)
        k, v = _split_heads(k, self.heads), _split_heads(v, self.heads)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, T, d)
        attn = self.to_out(attn.transpose(1, 2).flatten(2))
        if seen is not None:
            attn = torch.where(seen, attn, 0.0)
        hidden = hidden + torch.tanh(self.attn_gate).to(hidden.dtype) * attn
        ff = self.ff(hidden)
        if seen is not None:
            ff = torch.where(seen, ff, 0.0)
        return hidden + torch.tanh(self.ff_gate).to(hidden.dtype) * ff


def _run_gated_block(
    layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Forward pre-hook of a decoder layer: pass its input hidden states through its block."""
    block: GatedCrossAttentionBlock = getattr(layer, BLOCK_ATTR)
    context = block.context
    if context is None or context.features is None:
        return None  # no images set: the layer runs unchanged
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"{type(layer).__name__} got no hidden states (positional or keyword)")
    features, masks = context.inputs_for(hidden.shape[0], hidden.shape[1])
    hidden = block(hidden, features, *masks)
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


class FusionBlocks(nn.ModuleList):
    """The blocks added by ``insert_gated_cross_attention`` and their shared ``context``.

    Use it to mark the blocks trainable or build optimiser groups. Registering it on another
    module too is harmless (parameters are de-duplicated; state_dict lists both names).
    """

    def __init__(self, context: FusionContext) -> None:
        super().__init__()
        self.context = context


def insert_gated_cross_attention(
    llm: PreTrainedModel,
    vision_dim: int,
    every: int = 4,
    heads: int | None = None,
    ff_mult: int = 4,
) -> FusionBlocks:
    """Add a gated cross-attention block before every ``every``-th decoder layer of ``llm``.

    Layers ``every - 1, 2 * every - 1, ...`` (0-based) get one, on their device and dtype. At
    initialisation (gates 0) the LLM's outputs are exactly unchanged.

    Args:
        llm: HF causal LM with ``llm.model.layers`` (Qwen2, Llama, Mistral ...).
        vision_dim: Width of the visual tokens given to ``context.set``.
        every: Insert into every k-th layer; 1 = all layers.
        heads: Cross-attention heads; default the LLM's ``num_attention_heads``.
        ff_mult: Feed-forward width multiple of the blocks.

    Returns:
        The new blocks (an ``nn.ModuleList``) with their shared ``context``.

    Raises:
        ValueError: When ``every`` is not in [1, layer count], or blocks were already inserted.
        TypeError: When the decoder layers cannot be found.

    """
    decoder = llm.get_decoder() if hasattr(llm, "get_decoder") else getattr(llm, "model", llm)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"no decoder layers in {type(llm).__name__}: expected `llm.model.layers`")
    if not 1 <= every <= len(layers):
        raise ValueError(f"every must be in [1, {len(layers)}] (the layer count), got {every}")
    config = llm.config.get_text_config() if hasattr(llm.config, "get_text_config") else llm.config
    heads = heads or int(config.num_attention_heads)
    blocks = FusionBlocks(FusionContext())
    for i, layer in enumerate(layers):
        if (i + 1) % every:
            continue
        if hasattr(layer, BLOCK_ATTR):
            raise ValueError(f"decoder layer {i} already has a {BLOCK_ATTR!r} block")
        block = GatedCrossAttentionBlock(int(config.hidden_size), vision_dim, heads, ff_mult)
        if (ref := next(layer.parameters(), None)) is not None:
            block.to(device=ref.device, dtype=ref.dtype)
        block.context = blocks.context
        layer.add_module(BLOCK_ATTR, block)
        layer.register_forward_pre_hook(_run_gated_block, with_kwargs=True)
        blocks.append(block)
    return blocks


def fusion_context(
    fusion: FusionBlocks,
    batch: VLMBatch,
    tokens: list[torch.Tensor],
    marks: torch.Tensor,
    ref: torch.Tensor,
) -> None:
    """Set the blocks' visual tokens per row and masks: a token sees its sample's earlier images.

    Args:
        fusion: The gated cross-attention blocks.
        batch: Packed rows (``input_ids`` (R, L), ``cu_seqlens``).
        tokens: One (K_i, D) tensor per image, in marker order.
        marks: Bool (R, L), True at each image's marker token.
        ref: Any LLM-width embedding tensor: gives the dtype and device of the features.

    Raises:
        ValueError: Marker and image counts differ.
    """
    rows, length = batch.input_ids.shape
    pos = marks.reshape(-1).nonzero().squeeze(1)
    if pos.numel() != len(tokens):
        raise ValueError(f"{pos.numel()} image markers for {len(tokens)} images")
    flat = torch.arange(rows * length, device=marks.device)
    segment = torch.searchsorted(batch.cu_seqlens[1:].to(flat), flat, right=True)
    segment = segment.view(rows, length)
    per_row = [0] * rows
    for p, t in zip(pos.tolist(), tokens, strict=True):
        per_row[p // length] += t.shape[0]
    width = max([*per_row, 1])
    feats = ref.new_zeros(rows, width, ref.shape[-1])
    visual = torch.zeros(rows, width, dtype=torch.bool, device=marks.device)
    cross = torch.zeros(rows, length, width, dtype=torch.bool, device=marks.device)
    fill = [0] * rows
    cols = torch.arange(length, device=marks.device)
    for p, t in zip(pos.tolist(), tokens, strict=True):
        r, c = divmod(p, length)
        a, b = fill[r], fill[r] + t.shape[0]
        feats[r, a:b] = t.to(feats.dtype)
        visual[r, a:b] = True
        sees = (segment[r] == segment[r, c]) & (cols >= c)
        cross[r, :, a:b] = sees.unsqueeze(1)
        fill[r] = b
    fusion.context.set(feats, visual, cross.any(-1), cross)

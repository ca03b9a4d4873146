"""Vision towers seen as a stack of blocks, for fusion in the backbone (video ViT, ViT, Swin).

:class:`~mmpt.models.backbone_fusion.BackboneFusion` runs a vision tower block by block so it
can insert cross-attention before its top blocks. Each stack here replays exactly the tower's own
forward (same modules, same order), so a run without fusion equals the tower's output bit for
bit. Stacks hold a reference to the tower only for the duration of a call; the tower's
parameters stay owned (and named) by the LightningModule.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmpt.models.encoders.video_vit import VideoViTTower


class VisionStack:
    """A vision tower as ``embed -> block 0 .. block depth-1 -> final``.

    States ``x`` are batch-first tensors in the tower's own layout; :meth:`flat` views them as
    (B, N, D) tokens for cross-attention and :meth:`unflat` puts updated tokens back.

    Args:
        tower: The vision tower (``tower.model`` is the timm model).

    """

    def __init__(self, tower: nn.Module) -> None:
        self.tower, self.model = tower, tower.model

    @property
    def depth(self) -> int:
        """Number of blocks."""
        return len(self.model.blocks)

    def width(self, index: int) -> int:
        """Token width D entering block ``index``."""
        return int(self.model.embed_dim)

    def heads(self, index: int) -> int:
        """Attention heads of block ``index``."""
        return int(self.model.blocks[index].attn.num_heads)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch and position embeddings: (B, C, H, W) -> (B, L, D) as timm's forward."""
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(pixels))))

    def block(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Block ``index`` on a state (with the model's gradient checkpointing)."""
        blk = self.model.blocks[index]
        if getattr(self.model, "grad_checkpointing", False) and torch.is_grad_enabled():
            return checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        """State -> (B, N, D) tokens."""
        return x

    def unflat(self, tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """(B, N, D) tokens -> a state shaped as ``like``."""
        return tokens.view(like.shape)

    def final(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm after the last block."""
        return self.model.norm(x)

    def pooled(self, final: torch.Tensor) -> torch.Tensor:
        """(B, D) summary for matching heads, pooled as the tower pools before its projection.

        timm's ``forward_head(pre_logits=True)``: the class token for ``global_pool="token"``,
        the (``fc_norm``-ed) patch-token mean for ``"avg"``, the attention pool for ``"map"``.
        """
        return self.model.forward_head(final, pre_logits=True)

    def grid(self, final: torch.Tensor) -> torch.Tensor:
        """Patch tokens on their grid (B, h, w, D), prefix tokens dropped (for box heads).

        Raises:
            ValueError: When the patch tokens do not form a square grid.

        """
        tokens = final[:, getattr(self.model, "num_prefix_tokens", 0) :]
        side = round(tokens.shape[1] ** 0.5)
        if side * side != tokens.shape[1]:
            raise ValueError(f"{tokens.shape[1]} patch tokens are not a square grid")
        return tokens.view(tokens.shape[0], side, side, tokens.shape[-1])

    def embedding(self, final: torch.Tensor) -> torch.Tensor:
        """The tower's output (B, E) from :meth:`final` states, as ``tower(pixels)``."""
        return self.model.forward_head(final)


class VideoStack(VisionStack):
    """:class:`~mmpt.models.encoders.VideoViTTower`: states (B, T, L, D), temporal attention."""

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, T, C, H, W) -> (B, T, L, D), as ``VideoViTTower.frame_tokens``."""
        tower = self.tower
        if pixels.ndim != 5 or pixels.shape[1] > tower.max_frames:
            raise ValueError(f"expected (B, T<={tower.max_frames}, C, H, W), got {pixels.shape}")
        b, t = pixels.shape[:2]
        x = super().embed(pixels.flatten(0, 1))
        return x.view(b, t, *x.shape[1:]) + tower.temporal_pos_embed[:t, None]

    def block(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Temporal attention then timm block ``index``."""
        b, t, length, dim = x.shape
        tower = self.tower

        def layer(y: torch.Tensor) -> torch.Tensor:
            y = y + tower.temporal[index](y, t)
            return self.model.blocks[index](y)

        y = x.reshape(b * t, length, dim)
        if tower.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(layer, y, use_reentrant=False).view(b, t, length, dim)
        return layer(y).view(b, t, length, dim)

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, L, D) -> (B, T * L, D): cross-attention sees all tokens of all frames."""
        return x.flatten(1, 2)

    def pooled(self, final: torch.Tensor) -> torch.Tensor:
        """Frame mean (B, D) of each frame pooled as the tower pools (the class token ...)."""
        b, t = final.shape[:2]
        return super().pooled(final.flatten(0, 1)).view(b, t, -1).mean(dim=1)

    def embedding(self, final: torch.Tensor) -> torch.Tensor:
        """Frame mean of the projected head output, as ``VideoViTTower.forward``."""
        b, t = final.shape[:2]
        return self.model.forward_head(final.flatten(0, 1)).view(b, t, -1).mean(dim=1)


class SwinStack(VisionStack):
    """timm ``SwinTransformer``: states (B, H, W, C); the stages' blocks in one list.

    A stage's patch merging runs at the end of the block before it, so the state entering block
    ``i`` always has the width of block ``i``'s stage.
    """

    def __init__(self, tower: nn.Module) -> None:
        super().__init__(tower)
        stages = enumerate(self.model.layers)
        self.blocks = [(s, blk) for s, stage in stages for blk in stage.blocks]

    @property
    def depth(self) -> int:
        """Number of blocks over all stages."""
        return len(self.blocks)

    def width(self, index: int) -> int:
        """Channels C of the stage of block ``index``."""
        return int(self.blocks[index][1].norm1.normalized_shape[0])

    def heads(self, index: int) -> int:
        """Attention heads of block ``index``."""
        return int(self.blocks[index][1].attn.num_heads)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H', W', C') after the first stage's (identity) downsample."""
        return self.model.layers[0].downsample(self.model.patch_embed(pixels))

    def block(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Block ``index``, then the next stage's patch merging when a stage ends here."""
        stage, blk = self.blocks[index]
        x = blk(x)
        if index + 1 < self.depth and self.blocks[index + 1][0] != stage:
            x = self.model.layers[stage + 1].downsample(x)
        return x

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H * W, C)."""
        return x.flatten(1, 2)

    def grid(self, final: torch.Tensor) -> torch.Tensor:
        """The final (B, h, w, C) state itself."""
        return final


def vision_stack(tower: nn.Module) -> VisionStack:
    """The stack view of a vision tower.

    Args:
        tower: :class:`~mmpt.models.encoders.VideoViTTower`, or a
            :class:`~mmpt.models.encoders.TimmVisionTower` holding a timm ViT-style model
            (``patch_embed`` + ``blocks``) or a timm Swin (``layers`` of stages with ``blocks``).

    Raises:
        TypeError: For any other tower.

    """
    if isinstance(tower, VideoViTTower):
        return VideoStack(tower)
    model = getattr(tower, "model", None)
    if hasattr(model, "patch_embed") and isinstance(getattr(model, "blocks", None), nn.Sequential):
        return VisionStack(tower)
    layers = getattr(model, "layers", None)
    if hasattr(model, "patch_embed") and layers is not None and hasattr(layers[0], "blocks"):
        return SwinStack(tower)
    raise TypeError(
        f"{type(model).__name__} is neither a timm ViT (patch_embed + blocks) nor a timm Swin "
        "(layers of stages with blocks): backbone fusion cannot run it block by block"
    )

"""Video tower: a timm image ViT inflated to divided space-time attention (TimeSformer-style)."""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import class_path
from .timm_vit import TimmVisionTower


class TemporalAttention(nn.Module):
    """Pre-norm multi-head self-attention over the frames at each token position.

    The output projection starts at zero, so the residual ``x + temporal(x)`` is the identity
    until training moves it.

    Args:
        dim: Token width D.
        num_heads: Attention heads.

    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True)
        nn.init.zeros_(self.attn.proj.weight)
        nn.init.zeros_(self.attn.proj.bias)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Attend across frames, independently for every token position.

        Args:
            x: (B * T, L, D) tokens, frame-major within each video (``T = num_frames``).
            num_frames: Frames per video T.

        Returns:
            (B * T, L, D) update to add to ``x`` (zero at initialisation).

        """
        bt, length, dim = x.shape
        b, t = bt // num_frames, num_frames
        # (B*T, L, D) -> (B*L, T, D): one length-T sequence per video and token position.
        seq = x.view(b, t, length, dim).transpose(1, 2).reshape(b * length, t, dim)
        out = self.attn(self.norm(seq))
        return out.view(b, length, t, dim).transpose(1, 2).reshape(bt, length, dim)


class VideoViTTower(nn.Module):
    """A timm ``VisionTransformer`` with a temporal attention sub-layer before every block.

    Divided space-time attention (TimeSformer, EgoVLP's FrozenInTime): every block ``i`` runs
    ``x = x + temporal[i](x)`` (attention over the T frames at each token position), then the
    unchanged timm block (spatial attention within each frame, then the MLP). Learned temporal
    position embeddings (``max_frames``, D) are added to every token after timm's spatial ones.
    The temporal output projections and the temporal position embeddings start at zero, so at
    initialisation the tower is exactly the image model applied to each frame, with the
    per-frame outputs averaged.

    Class token: every frame keeps its own copy of the prefix tokens (class and register
    tokens, any ``num_prefix_tokens``), which takes part in that frame's spatial attention in
    every block; the head (timm pooling, ``fc_norm``, projection) runs per frame and the
    per-frame outputs are averaged. FrozenInTime instead averages the per-frame class-token
    outputs inside every block (one shared class token); that would make block 2 onwards differ
    from the image model at initialisation, so here the average is taken once, at the output.
    Prefix-token copies also attend to each other in the temporal sub-layer (the same as patch
    tokens), which lets the class tokens of different frames exchange information directly.

    Frames: ``forward`` takes any T in ``1..max_frames`` with the same weights (e.g. 4 in
    training, 16 at evaluation); longer clips raise a ValueError rather than interpolating the
    temporal position embeddings.

    Parameter names: all temporal parts contain ``temporal`` (``temporal.{i}.norm``,
    ``temporal.{i}.attn.qkv``, ``temporal.{i}.attn.proj``, ``temporal_pos_embed``), the image
    model lives under ``model.`` exactly as in :class:`TimmVisionTower`, so a stage can train
    only ``vision.*temporal*`` first.

    Attributes:
        model: The timm image model (weights loaded like :class:`TimmVisionTower`).
        temporal: One :class:`TemporalAttention` per block.
        temporal_pos_embed: (max_frames, D) temporal position embeddings.
        output_dim: ``embed_dim``, or the pooled feature width when ``embed_dim`` is 0.
        image_preprocess: Size, mean, std and channel count each frame needs.
        num_frames: Frames per clip the data pipeline should sample for training.
        max_frames: Most frames ``forward`` accepts.

    """

    #: Arguments holding local weights paths (checked by :mod:`mmpt.preflight` before building).
    weight_paths: ClassVar[tuple[str, ...]] = ("pretrained",)

    def __init__(
        self,
        model_name: str = "vit_base_patch16_224",
        embed_dim: int = 256,
        image_size: int = 224,
        num_frames: int = 4,
        pretrained: str | None = None,
        model_kwargs: dict | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        max_frames: int = 16,
        init_from: str | None = None,
    ) -> None:
        """Build the image model (optionally from local image weights) and the temporal parts.

        Args:
            model_name: timm ViT architecture name (``VisionTransformer`` family), optionally
                with a tag that selects the default mean/std.
            embed_dim: Output width of the projection head; 0 for no head (pooled features).
            image_size: Square frame size in pixels.
            num_frames: Frames per training clip (``num_frames`` attribute for the data side).
            pretrained: Local image checkpoint file or folder, loaded as by
                :class:`TimmVisionTower`; None for random init. Temporal parts always start
                from their (zero-output) initialisation.
            model_kwargs: Extra ``timm.create_model`` arguments (``depth``, ``reg_tokens``,
                ``drop_path_rate`` ...); ``patch_drop_rate`` is not supported.
            mean: Per-channel normalisation mean; defaults to the model's pretrained_cfg.
            std: Per-channel normalisation std; defaults to the model's pretrained_cfg.
            max_frames: Rows of the temporal position embedding: the most frames ``forward``
                accepts.
            init_from: Checkpoint whose image ViT weights initialise the spatial model (e.g. an
                MAE checkpoint), as :class:`TimmVisionTower` ``init_from``.

        Raises:
            FileNotFoundError: When ``pretrained`` does not exist.
            ValueError: For a model that is not a timm ``VisionTransformer``, token dropout,
                ``num_frames`` outside ``1..max_frames`` or a checkpoint that does not fit.

        """
        super().__init__()
        if not 1 <= num_frames <= max_frames:
            raise ValueError(f"num_frames={num_frames} must be in 1..max_frames={max_frames}.")
        image = TimmVisionTower(
            model_name=model_name,
            embed_dim=embed_dim,
            image_size=image_size,
            pretrained=pretrained,
            model_kwargs=model_kwargs,
            mean=mean,
            std=std,
            feature_layer=-1,
            init_from=init_from,
        )
        self.init_report = image.init_report
        model = image.model
        if not isinstance(model, VisionTransformer):
            raise ValueError(
                f"VideoViTTower needs a timm VisionTransformer; {model_name!r} builds "
                f"{type(model).__name__}."
            )
        if not isinstance(model.patch_drop, nn.Identity):
            raise ValueError(
                "patch_drop_rate > 0 drops different tokens in each frame; set it to 0 for "
                "VideoViTTower."
            )
        self.model = model
        self.output_dim = image.output_dim
        self.image_preprocess = image.image_preprocess
        self.num_frames = num_frames
        self.max_frames = max_frames
        dim = int(model.embed_dim)
        self.temporal = nn.ModuleList(
            TemporalAttention(dim, _num_heads(block, model_name)) for block in model.blocks
        )
        self.temporal_pos_embed = nn.Parameter(torch.zeros(max_frames, dim))
        self.grad_checkpointing = False
        own = ("model_name", "embed_dim", "image_size", "pretrained", "model_kwargs", "mean", "std")
        init_args = {k: image._init_args[k] for k in own}
        init_args.update(num_frames=num_frames, max_frames=max_frames, init_from=None)
        self._init_args: dict[str, Any] = init_args

    def frame_tokens(self, videos: torch.Tensor) -> torch.Tensor:
        """All tokens of every frame after the last block and the final norm.

        Args:
            videos: (B, T, C, H, W) normalised frames, T <= ``max_frames``; (B, C, H, W)
                images count as T = 1.

        Returns:
            (B, T, P + h * w, D) tokens; the first P = ``model.num_prefix_tokens`` of each
            frame are its class/register tokens.

        Raises:
            ValueError: For a wrong number of dimensions or more than ``max_frames`` frames.

        """
        if videos.ndim == 4:
            videos = videos.unsqueeze(1)
        if videos.ndim != 5:
            raise ValueError(f"Expected (B, T, C, H, W) videos, got shape {tuple(videos.shape)}.")
        b, t = videos.shape[:2]
        if t > self.max_frames:
            raise ValueError(
                f"Got {t} frames but the temporal position embedding has max_frames="
                f"{self.max_frames} rows; build the tower with a larger max_frames."
            )
        m = self.model
        x = m.patch_embed(videos.flatten(0, 1))
        x = m.norm_pre(m.patch_drop(m._pos_embed(x)))  # (B*T, L, D), spatial positions added
        length, dim = x.shape[1:]
        x = (x.view(b, t, length, dim) + self.temporal_pos_embed[:t, None]).view(b * t, length, dim)
        for i in range(len(m.blocks)):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(self._layer, x, i, t, use_reentrant=False)
            else:
                x = self._layer(x, i, t)
        return m.norm(x).view(b, t, length, dim)

    def _layer(self, x: torch.Tensor, index: int, num_frames: int) -> torch.Tensor:
        x = x + self.temporal[index](x, num_frames)
        return self.model.blocks[index](x)

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        """Encode clips.

        Args:
            videos: (B, T, C, H, W) normalised frames, T <= ``max_frames``; (B, C, H, W)
                images count as T = 1.

        Returns:
            (B, output_dim) mean over frames of the per-frame pooled and projected features,
            not normalised.

        """
        tokens = self.frame_tokens(videos)
        b, t = tokens.shape[:2]
        per_frame = self.model.forward_head(tokens.flatten(0, 1))  # (B*T, output_dim)
        return per_frame.view(b, t, -1).mean(dim=1)

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable ``class_path``/``init_args`` that rebuild this architecture.

        ``pretrained`` is None (weights travel separately); mean/std are the resolved values.
        """
        return {
            "class_path": class_path(self),
            "init_args": copy.deepcopy(self._init_args),
        }

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn activation checkpointing of each (temporal, block) pair on or off."""
        self.grad_checkpointing = enable
        self.model.set_grad_checkpointing(enable)


def _num_heads(block: nn.Module, model_name: str) -> int:
    heads = getattr(getattr(block, "attn", None), "num_heads", getattr(block, "num_heads", None))
    if heads is None:
        raise ValueError(f"{model_name}: cannot read the attention head count of its blocks.")
    return int(heads)

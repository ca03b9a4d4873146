"""open_clip image tower (ViT, ModifiedResNet or timm trunk) built from an open_clip config."""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace
from typing import Any

import torch
from open_clip.model import _build_vision_tower, resize_pos_embed
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from torch import nn

from mmpt.preprocess import ImagePreprocess

from . import class_path, resolve_feature_layer
from .open_clip_load import _mean_std
from .open_clip_load import load_open_clip_state_dict as load_open_clip_state_dict
from .open_clip_load import open_clip_model_cfg as open_clip_model_cfg
from .open_clip_load import resolve_open_clip_checkpoint as resolve_open_clip_checkpoint
from .timm_vit import timm_block_count, timm_patch_features, timm_patch_grid
from .timm_weights import resolve_checkpoint_file as resolve_checkpoint_file
from .vit_init import InitReport, Rename, init_converted_from, init_vit_from, renames, token_rename

log = logging.getLogger(__name__)

VISION_FLAG = "--model.init_args.vision.init_args.pretrained"
INIT_FLAG = "--model.init_args.vision.init_args.init_from"

#: timm ViT module -> open_clip ``VisionTransformer`` module (weight and bias each).
_OPEN_CLIP_LAYERS = {
    "norm_pre": "ln_pre",
    "blocks.{i}.norm1": "transformer.resblocks.{i}.ln_1",
    "blocks.{i}.attn.proj": "transformer.resblocks.{i}.attn.out_proj",
    "blocks.{i}.norm2": "transformer.resblocks.{i}.ln_2",
    "blocks.{i}.mlp.fc1": "transformer.resblocks.{i}.mlp.c_fc",
    "blocks.{i}.mlp.fc2": "transformer.resblocks.{i}.mlp.c_proj",
    "norm": "ln_post",
}


def open_clip_vit_table() -> list[Rename]:
    """Names of a timm ViT in an open_clip ``VisionTransformer`` (its patch conv has no bias).

    ``in_proj_weight``/``in_proj_bias`` stack q, k, v along dim 0 exactly like timm's ``qkv``.
    """
    qkv = "transformer.resblocks.{i}.attn.in_proj_"
    return [
        token_rename("cls_token", "class_embedding"),
        token_rename("pos_embed", "positional_embedding"),
        Rename("patch_embed.proj.weight", ("conv1.weight",)),
        Rename("blocks.{i}.attn.qkv.weight", (qkv + "weight",)),
        Rename("blocks.{i}.attn.qkv.bias", (qkv + "bias",)),
        *renames(_OPEN_CLIP_LAYERS),
    ]


def load_tower_state(
    tower: nn.Module,
    state: dict[str, torch.Tensor],
    head_keys: tuple[str, ...],
    source: str,
    flag: str,
) -> None:
    """Load ``state`` into ``tower`` strictly, except for a projection head that changed shape.

    Args:
        tower: The open_clip tower module.
        state: Its state dict, with tower-relative key names.
        head_keys: Key names or prefixes of the projection head (re-initialised on mismatch).
        source: Checkpoint path, for messages.
        flag: The command-line flag that sets the checkpoint, for messages.

    Raises:
        ValueError: Missing, unexpected or mis-shaped keys outside the projection head.

    """
    own = tower.state_dict()
    mismatched = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    new_head = [k for k in mismatched if any(k == h or k.startswith(h + ".") for h in head_keys)]
    if new_head:
        log.warning("%s: new projection head, not loaded: %s", source, new_head)
    state = {k: v for k, v in state.items() if k not in new_head}
    missing = [k for k in own if k not in state and k not in new_head]
    unexpected = [k for k in state if k not in own]
    bad_shape = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in mismatched
        if k not in new_head
    ]
    if missing or unexpected or bad_shape:
        raise ValueError(
            f"Checkpoint {source!r} does not fit the {type(tower).__name__} built from the config: "
            f"missing {missing[:10]}, unexpected {unexpected[:10]}, shape mismatch {bad_shape[:5]}."
            f" Check model_name and the cfg overrides against the checkpoint, or fix {flag}."
        )
    state.update({k: own[k] for k in new_head})  # keep the freshly initialised head
    tower.load_state_dict(state, strict=True)


class OpenCLIPVisionTower(nn.Module):
    """An open_clip image encoder, loadable from a full CLIP checkpoint or a vision-only one.

    The module is built by ``open_clip.model._build_vision_tower`` (private but stable since
    open_clip 2.x): the exact function open_clip's ``CLIP`` uses for ``.visual``, so parameter
    names match open_clip checkpoints with the ``visual.`` prefix stripped.

    ``patch_features`` (for VLMs) works for open_clip ViTs at the configured ``image_size``
    only (fixed position embedding), and for timm trunks that are ViT-style (the SigLIP
    configs), at other sizes too when the timm model has ``dynamic_img_size``. ModifiedResNet
    and non-ViT timm trunks have no patch tokens.

    Attributes:
        visual: The open_clip image encoder; ``visual(images)`` returns (B, embed_dim).
        output_dim: Projection width.
        image_preprocess: Input size from the config, mean/std of its pretrained tags.
        feature_layer: Block whose output ``patch_features`` returns (python-style index).
        init_report: What ``init_from`` loaded (:class:`~.vit_init.InitReport`), else None.

    """

    def __init__(
        self,
        model_name: str = "ViT-B-16",
        embed_dim: int | None = None,
        pretrained: str | None = None,
        vision_cfg: dict | None = None,
        feature_layer: int = -2,
        init_from: str | None = None,
    ) -> None:
        """Build the tower and optionally load local weights.

        Args:
            model_name: open_clip config name (``open_clip.list_models()``) or
                ``local-dir:/folder`` with an ``open_clip_config.json``.
            embed_dim: Projection width; None keeps the config's ``embed_dim``. A different value
                gives a new (randomly initialised) projection when loading weights.
            pretrained: Local open_clip checkpoint file/folder: a full CLIP state dict
                (``visual.*`` keys are used) or a vision-only state dict. None: random init.
            vision_cfg: Overrides merged into the config's ``vision_cfg`` (``CLIPVisionCfg``
                fields: ``layers``, ``width``, ``image_size``, ``patch_dropout`` ...).
            feature_layer: Block whose output ``patch_features`` returns: -1 the last block,
                -2 the second-to-last (LLaVA/VILA), 0 the first. Checked for towers with patch
                tokens.
            init_from: Checkpoint whose ViT weights initialise the tower (MAE -> contrastive,
                MAWS), applied after ``pretrained``: an mmpt checkpoint of a timm-based tower,
                a timm state dict or a folder holding one. A timm trunk loads it directly, an
                open_clip ViT through a name converter (``ln_pre`` and ``proj`` stay at init
                unless the source has them); position and patch embeddings are resized
                (``mmpt.models.encoders.vit_init``). The report is ``init_report``.

        Raises:
            FileNotFoundError: When ``pretrained`` or ``init_from`` does not exist.
            ValueError: For an open_clip tag as ``pretrained``, a checkpoint that does not fit or
                an out-of-range ``feature_layer``.

        """
        super().__init__()
        cfg = open_clip_model_cfg(model_name)
        file = (
            resolve_open_clip_checkpoint(model_name, pretrained, VISION_FLAG)
            if pretrained is not None
            else None
        )
        vcfg = {**cfg["vision_cfg"], **(vision_cfg or {})}
        if vcfg.get("timm_model_pretrained"):
            raise ValueError(
                "vision_cfg.timm_model_pretrained=True would download timm weights; set it to "
                f"false and load the whole tower with {VISION_FLAG}."
            )
        self.output_dim = int(embed_dim if embed_dim is not None else cfg["embed_dim"])
        self.visual = _build_vision_tower(
            self.output_dim, vcfg, quick_gelu=bool(cfg.get("quick_gelu", False))
        )
        size = vcfg.get("image_size", 224)
        if isinstance(size, (list, tuple)):
            if len(set(size)) != 1:
                raise ValueError(f"vision_cfg.image_size must be square, got {size}")
            size = size[0]
        mean, std = _mean_std(model_name)
        self.image_preprocess = ImagePreprocess(size=int(size), mean=mean, std=std, channels=3)
        if file is not None:
            self._load(file)
        self.init_report = None if init_from is None else self._init_from(init_from)
        self.feature_layer = feature_layer
        blocks = self._block_count()
        self._layer_index = (
            None if blocks is None else resolve_feature_layer(feature_layer, blocks, model_name)
        )
        self._init_args: dict[str, Any] = {
            "model_name": model_name,
            "embed_dim": self.output_dim,
            "pretrained": None,
            "vision_cfg": copy.deepcopy(vcfg),
            "feature_layer": feature_layer,
            "init_from": None,  # weights travel separately
        }

    def _init_from(self, path: str) -> InitReport:
        if isinstance(self.visual, TimmModel):
            return init_vit_from(self.visual.trunk, path, flag=INIT_FLAG)
        if not isinstance(self.visual, VisionTransformer):
            raise ValueError(
                f"init_from needs an open_clip ViT or timm trunk, not {type(self.visual).__name__}"
            )
        grid = tuple(int(g) for g in self.visual.grid_size)
        return init_converted_from(self.visual, path, open_clip_vit_table(), grid, flag=INIT_FLAG)

    def _block_count(self) -> int | None:
        """Transformer blocks of a tower with patch tokens, None for the others."""
        if isinstance(self.visual, VisionTransformer):
            return len(self.visual.transformer.resblocks)
        if isinstance(self.visual, TimmModel):
            return timm_block_count(self.visual.trunk)
        return None

    def _load(self, file: str) -> None:
        state = load_open_clip_state_dict(file)
        if any(k.startswith("visual.") for k in state):
            state = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
        # open_clip's own grid resize of the position embedding (checkpoint at another size).
        prefixed = {f"visual.{k}": v for k, v in state.items()}
        resize_pos_embed(prefixed, SimpleNamespace(visual=self.visual))
        state = {k[len("visual.") :]: v for k, v in prefixed.items()}
        head = ("proj", "head", "attnpool.c_proj")  # ViT, timm trunk, ModifiedResNet
        load_tower_state(self.visual, state, head, file, VISION_FLAG)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Encode images.

        Args:
            images: (B, 3, H, W) normalised pixels.

        Returns:
            (B, embed_dim) pooled and projected features, not normalised.

        """
        out = self.visual(images)
        return out[0] if isinstance(out, tuple) else out

    def _require_patches(self) -> int:
        if self._layer_index is None:
            raise ValueError(
                f"patch_features needs an open_clip ViT or a ViT-style timm trunk; "
                f"{self._init_args['model_name']} has a {type(self.visual).__name__} tower."
            )
        return self._layer_index

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens of block ``feature_layer``, before ``ln_post``, pooling and projection.

        Only the blocks up to ``feature_layer`` run.

        Args:
            images: (B, 3, H, W) normalised pixels; open_clip ViTs need H = W = ``image_size``.

        Returns:
            (B, h * w, feature_dim) tokens, row-major over the ``patch_grid(H, W)`` grid; no
            class token.

        Raises:
            ValueError: For a tower without patch tokens, an input size it cannot take, or
                active patch dropout (training mode with ``patch_dropout`` > 0).

        """
        index = self._require_patches()
        if isinstance(self.visual, TimmModel):
            return timm_patch_features(self.visual.trunk, images, index)
        grid = self.patch_grid(images.shape[-2], images.shape[-1])
        (tokens,) = self.visual.forward_intermediates(
            images, indices=[index], stop_early=True, intermediates_only=True, output_fmt="NLC"
        )["image_intermediates"]
        if tokens.shape[1] != grid[0] * grid[1]:
            raise ValueError(
                f"Got {tokens.shape[1]} tokens for a {grid} grid: patch dropout is active in "
                "training mode; set vision_cfg.patch_dropout to 0 for patch features."
            )
        return tokens

    @property
    def feature_dim(self) -> int:
        """Width D of the ``patch_features`` tokens."""
        self._require_patches()
        if isinstance(self.visual, TimmModel):
            return int(self.visual.trunk.embed_dim)
        return int(self.visual.transformer.width)

    @property
    def patch_size(self) -> int:
        """Side of a square patch in pixels."""
        self._require_patches()
        if isinstance(self.visual, TimmModel):
            return int(self.visual.trunk.patch_embed.patch_size[0])
        return int(self.visual.patch_size[0])

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (h, w) ``patch_features`` gives for a (height, width) input.

        Raises:
            ValueError: For an open_clip ViT and a size other than its ``image_size``.

        """
        self._require_patches()
        if isinstance(self.visual, TimmModel):
            return timm_patch_grid(self.visual.trunk, height, width)
        if (height, width) != tuple(self.visual.image_size):
            raise ValueError(
                f"open_clip ViTs have a fixed position embedding: input must be "
                f"{tuple(self.visual.image_size)}, got {(height, width)}. Set "
                "vision_cfg.image_size (weights are resized on load) or use a timm-trunk config."
            )
        return tuple(self.visual.grid_size)

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable ``class_path``/``init_args`` that rebuild this architecture.

        ``pretrained`` is None (weights travel separately); ``vision_cfg`` is the full merged
        config, ``embed_dim`` the resolved width. A ``local-dir:`` model_name still needs its
        folder (for quick_gelu and mean/std).
        """
        return {"class_path": class_path(self), "init_args": copy.deepcopy(self._init_args)}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn activation checkpointing of the transformer blocks on or off."""
        self.visual.set_grad_checkpointing(enable)

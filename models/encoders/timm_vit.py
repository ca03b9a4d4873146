"""Vision tower from any timm model: pooled features (contrastive) or patch tokens (VLMs)."""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import timm
import torch
from torch import nn

from mmpt.bands import band_stats, resolve_bands, resolve_groups
from mmpt.preprocess import ImagePreprocess

from . import class_path, resolve_feature_layer
from .timm_weights import _EXTENSIONS as _EXTENSIONS
from .timm_weights import _PREFERRED_FILES as _PREFERRED_FILES
from .timm_weights import FLAG as FLAG
from .timm_weights import _capture_timm_key_report as _capture_timm_key_report
from .timm_weights import _checkpoint_shapes as _checkpoint_shapes
from .timm_weights import _KeyReport as _KeyReport
from .timm_weights import create_pretrained_model
from .timm_weights import resolve_checkpoint_file as resolve_checkpoint_file


def timm_block_count(model: nn.Module) -> int | None:
    """Number of blocks of a timm ViT-style model, None when it has no patch tokens to return.

    ViT-style means ``patch_embed``, a ``blocks`` list and ``forward_intermediates`` (timm
    ``VisionTransformer``, ``Eva``, ``Beit``, relpos ViTs ...); CNNs and hierarchical models
    (ResNet, ConvNeXt, Swin, Hiera) are not.
    """
    if all(hasattr(model, a) for a in ("patch_embed", "blocks", "forward_intermediates")):
        return len(model.blocks)
    return None


def timm_patch_grid(model: nn.Module, height: int, width: int) -> tuple[int, int]:
    """Token grid (h, w) a timm ViT-style model gives for a (height, width) input.

    Raises:
        ValueError: When the model has a fixed input size (no ``dynamic_img_size``) and the
            size differs.

    """
    embed = model.patch_embed
    if getattr(model, "dynamic_img_size", False):
        return tuple(embed.dynamic_feat_size((height, width)))
    if (height, width) != tuple(embed.img_size):
        raise ValueError(
            f"{type(model).__name__} was built for {tuple(embed.img_size)} inputs, got "
            f"{(height, width)}. Other and non-square sizes need a model built with "
            "dynamic_img_size=True (TimmVisionTower: model_kwargs={'dynamic_img_size': True}; "
            "timm ViT and EVA support it, BEiT does not)."
        )
    return tuple(embed.grid_size)


def timm_patch_features(model: nn.Module, images: torch.Tensor, index: int) -> torch.Tensor:
    """Output of block ``index`` of a timm ViT-style model, without prefix tokens.

    Only blocks ``0..index`` run (``stop_early``); no final norm is applied.

    Args:
        model: timm ViT-style model (see :func:`timm_block_count`).
        images: (B, C, H, W) normalised pixels.
        index: Absolute block index.

    Returns:
        (B, h * w, D) patch tokens, row-major over the (h, w) grid of :func:`timm_patch_grid`.

    Raises:
        ValueError: For an input size the model cannot take, or when token dropout changed the
            token count (``patch_drop_rate`` > 0 in training mode).

    """
    grid = timm_patch_grid(model, images.shape[-2], images.shape[-1])
    (tokens,) = model.forward_intermediates(
        images,
        indices=[index],
        norm=False,
        stop_early=True,
        output_fmt="NLC",
        intermediates_only=True,
    )
    if tokens.shape[1] != grid[0] * grid[1]:
        raise ValueError(
            f"Got {tokens.shape[1]} tokens for a {grid} grid: token dropout (patch_drop_rate) "
            "is active in training mode; set it to 0 for patch features."
        )
    return tokens


def _groups_by_name(
    groups: tuple[tuple[int, ...], ...] | None, bands: tuple[str, ...] | None
) -> list[list[str]] | None:
    """Band groups as names (for ``describe``), from channel indices."""
    if groups is None or bands is None:
        return None
    return [[bands[i] for i in g] for g in groups]


class TimmVisionTower(nn.Module):
    """Any ``timm.create_model`` image model, with ``num_classes=embed_dim`` as projection head.

    Local weights load through timm's own pretrained path (``pretrained_cfg_overlay=dict(
    file=...)``) so the model's checkpoint filter applies (position-embedding resize to
    ``image_size``, patch-embed resize, input-conv channel adaption). The checkpoint's head is
    kept when its shape matches ``embed_dim`` and re-initialised otherwise.

    ``patch_features`` (for VLMs) needs a ViT-style model (``patch_embed`` + ``blocks``: timm
    ViT, DeiT, EVA, BEiT ...); other sizes than ``image_size``, non-square ones included, need
    ``model_kwargs={"dynamic_img_size": True}`` (ViT, EVA; not BEiT).

    Attributes:
        model: The timm model; ``model(images)`` returns (B, output_dim).
        output_dim: ``embed_dim``, or the pooled feature width when ``embed_dim`` is 0.
        image_preprocess: Size, mean, std and channel count the model expects.
        feature_layer: Block whose output ``patch_features`` returns (python-style index).

    """

    #: Arguments holding local weights paths (checked by :mod:`mmpt.preflight` before building).
    weight_paths: ClassVar[tuple[str, ...]] = ("pretrained",)

    def __init__(
        self,
        model_name: str = "vit_base_patch16_224",
        embed_dim: int = 512,
        image_size: int = 224,
        pretrained: str | None = None,
        model_kwargs: dict | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        feature_layer: int = -2,
        bands: str | list[str] | None = None,
        band_groups: str | list[list[str]] | None = None,
        scale: float = 1.0,
        stats_from: str | None = None,
        init_from: str | None = None,
    ) -> None:
        """Build the model and optionally load local weights.

        Args:
            model_name: timm architecture name, optionally with a tag (``vit_base_patch16_224.
                augreg_in21k``); the tag only selects the default mean/std, never a download.
            embed_dim: Output width (the classifier head becomes a projection of this size);
                0 for no head: ``forward`` then returns the pooled features (a VLM uses only
                ``patch_features`` and needs no head).
            image_size: Square input size in pixels (``img_size`` for timm).
            pretrained: Local checkpoint file (``.safetensors``/``.pth``/``.bin``) or a folder
                holding one; None for random init.
            model_kwargs: Extra ``timm.create_model`` arguments (``depth``, ``drop_path_rate``,
                ``in_chans``, ``dynamic_img_size`` ...).
            mean: Per-channel normalisation mean; defaults to the model's pretrained_cfg.
            std: Per-channel normalisation std; defaults to the model's pretrained_cfg.
            feature_layer: Block whose output ``patch_features`` returns: -1 the last block,
                -2 the second-to-last (LLaVA/VILA), 0 the first. Checked when the model is
                ViT-style.
            bands: Multispectral input: a sensor (``s2_l1c`` 13 bands, ``s2_l2a`` 12, ``s1``
                2) or a list of band names (``mmpt.bands``); sets ``in_chans``. None: RGB.
            band_groups: One patch embedding per band group (SatMAE): ``satmae`` or lists of
                band names; each group gives its own token per patch (G x more tokens). None:
                one patch embedding over all bands.
            scale: Raw tile values are multiplied by this before mean/std (1e-4 for
                Sentinel-2 digital numbers).
            stats_from: Shard folder (or its ``index.json``) whose per-band statistics give
                ``mean``/``std`` when those are not set (raw units, multiplied by ``scale``).
            init_from: Checkpoint whose ViT weights initialise this tower (MAE -> contrastive,
                MAWS): an mmpt checkpoint (its recorded image tower), a timm state dict or a
                folder holding one; position and patch embeddings are resized and channels
                matched by band name (``mmpt.models.encoders.vit_init``).

        Raises:
            FileNotFoundError: When ``pretrained`` does not exist.
            ValueError: On conflicting arguments, a checkpoint that does not fit the model or
                an out-of-range ``feature_layer``.

        """
        super().__init__()
        kwargs = dict(model_kwargs or {})
        for key, arg in (("num_classes", "embed_dim"), ("img_size", "image_size")):
            if key in kwargs:
                raise ValueError(f"Set `{arg}` instead of model_kwargs[{key!r}].")
        kwargs.update(num_classes=embed_dim, img_size=image_size)
        band_names = None if bands is None else resolve_bands(bands)
        if band_names is not None:
            if kwargs.get("in_chans", len(band_names)) != len(band_names):
                raise ValueError(
                    f"model_kwargs.in_chans={kwargs['in_chans']} but {len(band_names)} bands "
                    f"{list(band_names)}: drop in_chans, the bands set it"
                )
            kwargs["in_chans"] = len(band_names)
        self.band_groups = None
        if band_groups is not None:
            if band_names is None:
                raise ValueError("band_groups needs `bands` (the band names the groups refer to)")
            from .group_embed import group_embed_layer

            if pretrained is not None:
                raise ValueError(
                    "band_groups builds one patch embedding per group, which timm checkpoints "
                    "do not have: start from an (MAE) checkpoint with `init_from` instead of "
                    "`pretrained`"
                )
            self.band_groups = resolve_groups(band_groups, band_names)
            kwargs["embed_layer"] = group_embed_layer(self.band_groups)
        try:
            self.model = self._create(model_name, pretrained, kwargs)
        except TypeError as err:  # CNNs (ResNet ...) take any size and have no img_size
            if "img_size" not in str(err):
                raise
            kwargs.pop("img_size")
            self.model = self._create(model_name, pretrained, kwargs)
        pooled = getattr(self.model, "head_hidden_size", self.model.num_features)
        self.output_dim = int(embed_dim or pooled)

        cfg = self.model.pretrained_cfg
        channels = int(kwargs.get("in_chans", 3))
        if stats_from is not None and (mean is None or std is None):
            if band_names is None:
                raise ValueError("stats_from needs `bands` (statistics are looked up by band)")
            raw_mean, raw_std = band_stats(stats_from, band_names)
            mean = mean if mean is not None else [m * scale for m in raw_mean]
            std = std if std is not None else [v * scale for v in raw_std]
        if band_names is not None and (mean is None or std is None):
            raise ValueError(
                f"{len(band_names)} bands {list(band_names)}: set `mean` and `std` per band "
                "(in scaled units) or `stats_from: <shard folder>` to read them from index.json"
            )
        mean = list(mean if mean is not None else cfg.get("mean", ()))
        std = list(std if std is not None else cfg.get("std", ()))
        if len(mean) != channels or len(std) != channels:
            raise ValueError(
                f"{model_name}: mean/std have {len(mean)}/{len(std)} values for {channels} input "
                "channels; pass `mean` and `std` with one value per channel."
            )
        self.image_preprocess = ImagePreprocess(
            size=image_size,
            mean=tuple(mean),
            std=tuple(std),
            channels=channels,
            bands=band_names,
            scale=float(scale) if band_names is not None else 1.0,
        )
        self.feature_layer = feature_layer
        blocks = timm_block_count(self.model)
        self._layer_index = (
            None if blocks is None else resolve_feature_layer(feature_layer, blocks, model_name)
        )
        self._init_args: dict[str, Any] = {
            "model_name": model_name,
            "embed_dim": embed_dim,
            "image_size": image_size,
            "pretrained": None,
            "model_kwargs": copy.deepcopy(model_kwargs or {}),
            "mean": [float(m) for m in mean],
            "std": [float(s) for s in std],
            "feature_layer": feature_layer,
            "bands": None if band_names is None else list(band_names),
            "band_groups": _groups_by_name(self.band_groups, band_names),
            "scale": float(scale),
            "stats_from": None,  # resolved into mean/std above
            "init_from": None,  # weights travel separately
        }
        self.init_report = None
        if init_from is not None:
            from .vit_init import init_vit_from

            self.init_report = init_vit_from(self.model, init_from, bands=band_names)

    @classmethod
    def _create(cls, model_name: str, pretrained: str | None, kwargs: dict) -> nn.Module:
        if pretrained is None:
            return timm.create_model(model_name, pretrained=False, **kwargs)
        return cls._create_pretrained(model_name, pretrained, kwargs)

    @staticmethod
    def _create_pretrained(model_name: str, pretrained: str, kwargs: dict) -> nn.Module:
        return create_pretrained_model(model_name, pretrained, kwargs)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Encode images.

        Args:
            images: (B, C, H, W) normalised pixels.

        Returns:
            (B, output_dim) pooled and projected features, not normalised.

        Raises:
            ValueError: The input has another channel count than the model was built for.

        """
        return self.model(self.check_channels(images))

    def check_channels(self, images: torch.Tensor) -> torch.Tensor:
        """Return ``images`` (B, C, H, W) after checking C against the model's input bands.

        Raises:
            ValueError: Wrong channel count, naming the bands the model was pretrained on.
        """
        pre = self.image_preprocess
        if images.ndim != 4 or images.shape[1] != pre.channels:
            what = f"bands {list(pre.bands)}" if pre.bands else "RGB channels"
            raise ValueError(
                f"this model takes {pre.channels} input channels ({what}), got input of shape "
                f"{tuple(images.shape)}: feed tiles with the model's bands (the datamodule "
                "selects them by name from the tile metadata)"
            )
        return images

    def pooled_features(self, images: torch.Tensor, pool: str | None = None) -> torch.Tensor:
        """Frozen-feature embedding for probes: the pooled features before the head.

        Args:
            images: (B, C, H, W) normalised pixels.
            pool: None: the model's own pooling (class token for timm ViTs) after the final
                norm; ``avg``: mean of the final-normed patch tokens (prefix tokens left out).

        Returns:
            (B, D) features, not normalised.
        """
        feats = self.model.forward_features(self.check_channels(images))
        if pool is None:
            return self.model.forward_head(feats, pre_logits=True)
        if pool != "avg":
            raise ValueError(f"pool must be None or 'avg', got {pool!r}")
        if feats.ndim == 4:  # (B, C, H, W) feature maps of CNNs
            return feats.mean(dim=(2, 3))
        return feats[:, getattr(self.model, "num_prefix_tokens", 0) :].mean(dim=1)

    def _require_patches(self) -> int:
        if self._layer_index is None:
            raise ValueError(
                f"{self._init_args['model_name']} ({type(self.model).__name__}) is not a ViT-style "
                "timm model (patch_embed + blocks): it has no patch tokens for patch_features."
            )
        return self._layer_index

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens of block ``feature_layer``, before the final norm, pooling and head.

        Only the blocks up to ``feature_layer`` run.

        Args:
            images: (B, C, H, W) normalised pixels; H, W other than ``image_size`` need
                ``model_kwargs={"dynamic_img_size": True}``.

        Returns:
            (B, h * w, feature_dim) tokens, row-major over the ``patch_grid(H, W)`` grid; no
            class or register tokens.

        Raises:
            ValueError: For a non-ViT model or an input size the model cannot take.

        """
        index = self._require_patches()
        return timm_patch_features(self.model, self.check_channels(images), index)

    @property
    def feature_dim(self) -> int:
        """Width D of the ``patch_features`` tokens."""
        return int(getattr(self.model, "embed_dim", self.model.num_features))

    @property
    def patch_size(self) -> int:
        """Side of a square patch in pixels."""
        self._require_patches()
        return int(self.model.patch_embed.patch_size[0])

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (h, w) ``patch_features`` gives for a (height, width) input."""
        self._require_patches()
        return timm_patch_grid(self.model, height, width)

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable ``class_path``/``init_args`` that rebuild this architecture.

        ``pretrained`` is None (weights travel separately); mean/std are the resolved values.
        """
        return {
            "class_path": class_path(self),
            "init_args": copy.deepcopy(self._init_args),
        }

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn activation checkpointing of the timm blocks on or off."""
        self.model.set_grad_checkpointing(enable)

"""Vision tower from a local Hugging Face SigLIP, SigLIP2 (NaFlex) or CLIP image encoder."""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from mmpt.preflight import missing_weights_error
from mmpt.preprocess import CLIP_MEAN, CLIP_STD, ImagePreprocess

from . import class_path, resolve_feature_layer
from .tokenizers import resolve_hf_path
from .vit_init import InitReport, Rename, init_converted_from, renames, token_rename

FLAG = "--model.init_args.vision.init_args"
# vision model_type -> family; a full (text + image) model_type maps to its vision_config.
VISION_TYPES = {
    "siglip_vision_model": "siglip",
    "siglip2_vision_model": "siglip2",
    "clip_vision_model": "clip",
}
_NOT_ARCHITECTURE = ("transformers_version", "architectures", "_name_or_path", "dtype")

#: timm ViT module -> Hugging Face SigLIP/CLIP vision module (weight and bias each).
_HF_LAYERS = {
    "patch_embed.proj": "embeddings.patch_embedding",
    "norm_pre": "pre_layrnorm",  # CLIP only (sic)
    "blocks.{i}.norm1": "encoder.layers.{i}.layer_norm1",
    "blocks.{i}.attn.proj": "encoder.layers.{i}.self_attn.out_proj",
    "blocks.{i}.norm2": "encoder.layers.{i}.layer_norm2",
    "blocks.{i}.mlp.fc1": "encoder.layers.{i}.mlp.fc1",
    "blocks.{i}.mlp.fc2": "encoder.layers.{i}.mlp.fc2",
    "norm": "post_layernorm",
}


def hf_vit_table(linear_patch: tuple[int, int] | None = None) -> list[Rename]:
    """Names of a timm ViT in SigLIP/SigLIP2/CLIP vision models (entries a model lacks: skipped).

    timm's ``qkv`` is split into ``q_proj``, ``k_proj``, ``v_proj``; SigLIP has no class
    token (the source's prefix rows of the position embedding are dropped).

    Args:
        linear_patch: (patch, channels) for SigLIP2, whose patch embedding is a linear layer
            over (p, p, C)-ordered pixels; None for a conv patch embedding.
    """
    table = [
        token_rename("cls_token", "embeddings.class_embedding"),
        token_rename("pos_embed", "embeddings.position_embedding.weight"),
        *(
            Rename(
                f"blocks.{{i}}.attn.qkv.{p}",
                tuple(f"encoder.layers.{{i}}.self_attn.{x}_proj.{p}" for x in "qkv"),
            )
            for p in ("weight", "bias")
        ),
        *renames(_HF_LAYERS),
    ]
    if linear_patch is not None:
        p, c = linear_patch
        table.append(  # replaces the conv entry of _HF_LAYERS
            Rename(
                "patch_embed.proj.weight",
                ("embeddings.patch_embedding.weight",),
                to_timm=lambda w: w.reshape(w.shape[0], p, p, c).permute(0, 3, 1, 2),
                from_timm=lambda w, shape: w.permute(0, 2, 3, 1).reshape(shape),
            ),
        )
    return table


def _vision_config(cfg: PretrainedConfig) -> PretrainedConfig:
    """The image-encoder part of ``cfg`` (a full SigLIP/CLIP config or a vision config)."""
    if cfg.model_type not in VISION_TYPES and hasattr(cfg, "vision_config"):
        cfg = cfg.vision_config
    if cfg.model_type not in VISION_TYPES:
        raise ValueError(
            f"HFVisionTower supports model types {sorted(VISION_TYPES)} (or full siglip, "
            f"siglip2, clip models), got {cfg.model_type!r}."
        )
    return cfg


def _preprocessor_config(path: str) -> dict[str, Any]:
    """``preprocessor_config.json`` of a folder or cached repo id; empty when it has none."""
    file: str | None = os.path.join(path, "preprocessor_config.json")
    if not os.path.isdir(path):
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(path, "preprocessor_config.json")
        file = found if isinstance(found, str) else None
    if file is None or not os.path.isfile(file):
        return {}
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def _load_pretrained(pretrained: str, repo_id: str | None) -> PreTrainedModel:
    """Load the vision model of a folder/cached repo holding a vision or full SigLIP/CLIP."""
    try:
        path = resolve_hf_path(pretrained, "config.json", f"{FLAG}.pretrained")
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path} has no config.json")
        cfg = _vision_config(AutoConfig.from_pretrained(path, local_files_only=True))
        # float32 like the other towers (transformers 5 would keep the file's dtype); mixed
        # precision is the Trainer's job.
        model, info = MODEL_MAPPING[type(cfg)].from_pretrained(
            path, local_files_only=True, output_loading_info=True, dtype=torch.float32
        )
    except OSError as err:  # no folder / config.json / weights file
        raise missing_weights_error(
            "Vision weights", pretrained, repo_id, f"{FLAG}.pretrained"
        ) from err
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ValueError(
            f"{pretrained}: the checkpoint lacks {len(missing)} weights of "
            f"{type(model).__name__} ({missing[:5]} ...); check {FLAG}.pretrained."
        )
    return model.train()  # train mode as when built from a config (from_pretrained: eval)


class HFVisionTower(nn.Module):
    """A Hugging Face ``SiglipVisionModel``, ``Siglip2VisionModel`` or ``CLIPVisionModel``.

    Weights come from a local folder (or a repo id already in the HF cache) holding either the
    vision model or a full SigLIP/CLIP model, whose vision part is loaded (in float32); or the
    model is randomly initialised from a config dict. Input sizes: SigLIP and CLIP take any size
    (position embeddings interpolated when it differs from ``config.image_size``; a size not
    divisible by the patch is floored); SigLIP2 NaFlex takes any size divisible by the patch
    (images are patchified here, position embeddings resized by the model).

    Attributes:
        model: The Hugging Face vision model.
        output_dim: ``hidden_size`` (width of ``forward`` and of ``patch_features``).
        image_preprocess: Size, mean, std and channel count the model expects.
        feature_layer: Block whose output ``patch_features`` returns (python-style index).
        init_report: What ``init_from`` loaded (:class:`~.vit_init.InitReport`), else None.

    """

    #: Arguments holding local weights paths (checked by :mod:`mmpt.preflight` before building).
    weight_paths: ClassVar[tuple[str, ...]] = ("pretrained",)

    def __init__(
        self,
        pretrained: str | None = None,
        config: dict | None = None,
        feature_layer: int = -2,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        image_size: int | None = None,
        init_from: str | None = None,
        repo_id: str | None = None,
    ) -> None:
        """Load or build the vision model.

        Args:
            pretrained: Folder written by ``save_pretrained``/``hf download`` or a cached repo
                id; loaded with ``local_files_only=True``.
            config: Architecture for random init: a dict with ``model_type``
                (``siglip_vision_model``, ``siglip2_vision_model``, ``clip_vision_model``) and
                config fields (``hidden_size``, ``num_hidden_layers``, ``patch_size`` ...).
            feature_layer: Block whose output ``patch_features`` returns: -1 the last block,
                -2 the second-to-last (LLaVA/VILA), 0 the first.
            mean: Per-channel normalisation mean; default from the folder's
                ``preprocessor_config.json``, else 0.5 (SigLIP) or OpenAI's (CLIP).
            std: Per-channel normalisation std, defaulting like ``mean``.
            image_size: Square input size for preprocessing; default ``config.image_size``
                (SigLIP2: ``sqrt(num_patches) * patch_size``).
            init_from: Checkpoint whose ViT weights initialise the model after it is built
                (MAE -> contrastive, MAWS): an mmpt checkpoint of a timm-based tower, a timm
                state dict or a folder holding one, converted from timm names; position and
                patch embeddings are resized (``mmpt.models.encoders.vit_init``). The SigLIP
                pooling head stays at init. The report is ``init_report``.
            repo_id: The hub repo ``pretrained`` is a local copy of
                (``google/siglip-so400m-patch14-384``), named in the missing-weights error.

        Raises:
            FileNotFoundError: When the weights or ``init_from`` are not available.
            ValueError: For both or neither of ``pretrained``/``config``, an unsupported model
                type, a checkpoint missing weights or an out-of-range ``feature_layer``.

        """
        super().__init__()
        if (pretrained is None) == (config is None):
            raise ValueError(
                f"Set exactly one of {FLAG}.pretrained (weights folder or cached repo id) and "
                f"{FLAG}.config (architecture dict for random init); got "
                f"{'both' if config is not None else 'neither'}."
            )
        if pretrained is not None:
            self.model = _load_pretrained(pretrained, repo_id)
            preprocessor = _preprocessor_config(pretrained)
        else:
            fields = dict(config)
            if "model_type" not in fields:
                raise ValueError(f"{FLAG}.config needs a model_type, e.g. siglip_vision_model")
            cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
            self.model = AutoModel.from_config(_vision_config(cfg))
            preprocessor = {}
        cfg = self.model.config
        self._family = VISION_TYPES[cfg.model_type]
        self.feature_layer = feature_layer
        index = resolve_feature_layer(feature_layer, cfg.num_hidden_layers, cfg.model_type)
        self._hidden_index = index + 1  # hidden_states[0] holds the embeddings
        self.output_dim = int(cfg.hidden_size)

        default = (CLIP_MEAN, CLIP_STD) if self._family == "clip" else ((0.5,) * 3, (0.5,) * 3)
        mean = list(mean if mean is not None else preprocessor.get("image_mean", default[0]))
        std = list(std if std is not None else preprocessor.get("image_std", default[1]))
        channels = int(cfg.num_channels)
        if len(mean) != channels or len(std) != channels:
            raise ValueError(
                f"mean/std have {len(mean)}/{len(std)} values for {channels} input channels."
            )
        if image_size is None:
            if self._family == "siglip2":
                image_size = math.isqrt(cfg.num_patches) * cfg.patch_size
            else:
                image_size = cfg.image_size
        self.image_preprocess = ImagePreprocess(
            size=int(image_size), mean=tuple(mean), std=tuple(std), channels=channels
        )
        arch = {k: v for k, v in cfg.to_diff_dict().items() if k not in _NOT_ARCHITECTURE}
        self._init_args: dict[str, Any] = {
            "pretrained": None,
            "config": {**arch, "model_type": cfg.model_type},
            "feature_layer": feature_layer,
            "mean": [float(m) for m in mean],
            "std": [float(s) for s in std],
            "image_size": int(image_size),
            "init_from": None,  # weights travel separately
        }
        self.init_report = None if init_from is None else self._init_from(init_from)

    def _init_from(self, path: str) -> InitReport:
        cfg = self.model.config
        if self._family == "siglip2":
            side = math.isqrt(cfg.num_patches)
            table = hf_vit_table(linear_patch=(cfg.patch_size, cfg.num_channels))
        else:
            side = cfg.image_size // cfg.patch_size
            table = hf_vit_table()
        inner = getattr(self.model, "vision_model", self.model)  # transformers < 5 nests it
        return init_converted_from(inner, path, table, (side, side), flag=f"{FLAG}.init_from")

    def _encode(self, images: torch.Tensor, hidden_states: bool) -> BaseModelOutputWithPooling:
        """Run the HF model on (B, C, H, W) pixels, patchifying them for SigLIP2."""
        height, width = images.shape[-2:]
        h, w = self.patch_grid(height, width)
        if self._family == "siglip2":
            b, c, p = images.shape[0], images.shape[1], self.patch_size
            # (B, C, h, p, w, p) -> (B, h, w, p, p, C): the order Siglip2ImageProcessor uses.
            patches = images.reshape(b, c, h, p, w, p).permute(0, 2, 4, 3, 5, 1)
            return self.model(
                pixel_values=patches.reshape(b, h * w, p * p * c),
                pixel_attention_mask=torch.ones(b, h * w, dtype=torch.long, device=images.device),
                spatial_shapes=torch.tensor([[h, w]] * b, device=images.device),
                output_hidden_states=hidden_states,
            )
        size = self.model.config.image_size
        return self.model(
            pixel_values=images,
            interpolate_pos_encoding=(height, width) != (size, size),
            output_hidden_states=hidden_states,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Encode images to one vector each.

        Args:
            images: (B, C, H, W) normalised pixels.

        Returns:
            (B, output_dim) pooled features: SigLIP's attention-pooling head, CLIP's normed
            class token (no projection); the mean of the final tokens for a SigLIP without head.

        """
        out = self._encode(images, hidden_states=False)
        if out.pooler_output is not None:
            return out.pooler_output
        return out.last_hidden_state.mean(1)

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens of block ``feature_layer``, before the post-layernorm and pooling head.

        All blocks run (``output_hidden_states``); the selected one's output is returned.

        Args:
            images: (B, C, H, W) normalised pixels.

        Returns:
            (B, h * w, feature_dim) tokens, row-major over the ``patch_grid(H, W)`` grid; CLIP's
            class token is removed.

        Raises:
            ValueError: For a SigLIP2 input size not divisible by the patch size.

        """
        tokens = self._encode(images, hidden_states=True).hidden_states[self._hidden_index]
        return tokens[:, 1:] if self._family == "clip" else tokens

    @property
    def feature_dim(self) -> int:
        """Width D of the ``patch_features`` tokens."""
        return self.output_dim

    @property
    def patch_size(self) -> int:
        """Side of a square patch in pixels."""
        return int(self.model.config.patch_size)

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (h, w) ``patch_features`` gives for a (height, width) input.

        Raises:
            ValueError: For SigLIP2 when a side is not a multiple of the patch size.

        """
        p = self.patch_size
        if self._family == "siglip2" and (height % p or width % p):
            raise ValueError(
                f"SigLIP2 (NaFlex) needs sides divisible by the patch size {p}, got "
                f"{(height, width)}; resize or pad the image first."
            )
        return height // p, width // p

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable ``class_path``/``init_args`` that rebuild this architecture.

        ``pretrained`` is None and ``config`` the vision config (weights travel separately);
        mean, std and image_size are the resolved values.
        """
        return {"class_path": class_path(self), "init_args": copy.deepcopy(self._init_args)}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn the Hugging Face model's gradient checkpointing on or off."""
        # transformers 5 renamed gradient_checkpointing_* (now deprecated) to activation_*.
        new_api = hasattr(self.model, "activation_checkpointing_enable")
        prefix = "activation" if new_api else "gradient"
        getattr(self.model, f"{prefix}_checkpointing_{'enable' if enable else 'disable'}")()

"""Vision and text towers, their tokenizers (imported lazily: workers unpickle them), helpers."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from .hf_text import HFTextTower as HFTextTower
    from .hf_vision import HFVisionTower as HFVisionTower
    from .log_mel import LogMelTower as LogMelTower
    from .open_clip_text import OpenCLIPTextTower as OpenCLIPTextTower
    from .open_clip_vision import OpenCLIPVisionTower as OpenCLIPVisionTower
    from .timm_vit import TimmVisionTower as TimmVisionTower
    from .tokenizers import HFTokenizer as HFTokenizer
    from .tokenizers import OpenCLIPTokenizer as OpenCLIPTokenizer
    from .video_vit import VideoViTTower as VideoViTTower
    from .wav2vec2 import Wav2Vec2Tower as Wav2Vec2Tower

# name -> submodule; importing a tokenizer must not pull in timm/open_clip/transformers.
_EXPORTS = {
    "HFTextTower": "hf_text",
    "HFTokenizer": "tokenizers",
    "HFVisionTower": "hf_vision",
    "LogMelTower": "log_mel",
    "OpenCLIPTextTower": "open_clip_text",
    "OpenCLIPTokenizer": "tokenizers",
    "OpenCLIPVisionTower": "open_clip_vision",
    "TimmVisionTower": "timm_vit",
    "VideoViTTower": "video_vit",
    "Wav2Vec2Tower": "wav2vec2",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def resolve_feature_layer(feature_layer: int, num_blocks: int, owner: str) -> int:
    """Turn a vision tower's python-style block index into an absolute one, checking its range.

    Args:
        feature_layer: Block index; -1 is the last block, -2 the second-to-last.
        num_blocks: Number of transformer blocks of the model.
        owner: Model description quoted in the error.

    Returns:
        The index in ``[0, num_blocks)``.

    Raises:
        ValueError: When ``feature_layer`` is outside ``[-num_blocks, num_blocks)``.

    """
    if not -num_blocks <= feature_layer < num_blocks:
        raise ValueError(
            f"feature_layer={feature_layer} is out of range for {owner} with {num_blocks} blocks "
            f"(valid: {-num_blocks} .. {num_blocks - 1})."
        )
    return feature_layer % num_blocks


def class_path(module: nn.Module) -> str:
    """Import path of ``module``'s class: ``mmpt.models.encoders.X`` for the towers exported here.

    Args:
        module: A tower instance.

    Returns:
        The dotted path a ``class_path:`` config entry names.

    """
    cls = type(module)
    if cls.__module__.rpartition(".")[0] == __name__ and cls.__name__ in _EXPORTS:
        return f"{__name__}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"

"""Vision and text towers and their tokenizers (imported lazily: workers unpickle tokenizers)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .hf_text import HFTextTower as HFTextTower
    from .open_clip_text import OpenCLIPTextTower as OpenCLIPTextTower
    from .open_clip_vision import OpenCLIPVisionTower as OpenCLIPVisionTower
    from .timm_vit import TimmVisionTower as TimmVisionTower
    from .tokenizers import HFTokenizer as HFTokenizer
    from .tokenizers import OpenCLIPTokenizer as OpenCLIPTokenizer

# name -> submodule; importing a tokenizer must not pull in timm/open_clip/transformers.
_EXPORTS = {
    "HFTextTower": "hf_text",
    "HFTokenizer": "tokenizers",
    "OpenCLIPTextTower": "open_clip_text",
    "OpenCLIPTokenizer": "tokenizers",
    "OpenCLIPVisionTower": "open_clip_vision",
    "TimmVisionTower": "timm_vit",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

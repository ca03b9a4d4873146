"""``mmpt.load(path)``: a trained model from an export folder, whatever wrote it."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mmpt.models.vlm import VLMModule

#: ``config.json`` model types that :mod:`mmpt.export.hf_llava_load` reads.
LLAVA_TYPES = ("llava",)  # LLaVA-NeXT folders are not read (hf_llava_load says why)


def load(path: str | Path, attn_implementation: str | None = None) -> VLMModule:
    """Load a VLM from an ``mmpt-vlm/3`` export or a transformers LLaVA folder.

    Args:
        path: The folder (``mmpt export`` output, or a LLaVA ``save_pretrained`` folder).
        attn_implementation: The LLM's attention for an mmpt export; default the trained one.

    Returns:
        The model in eval mode on the CPU.

    Raises:
        FileNotFoundError: No such folder, or a file the export needs is missing (named).
        ValueError: A folder of another kind or format version (says what it found and what
            loads).
    """
    folder = Path(path)
    hf_config = folder / "config.json"
    if not (folder / "mmpt_vlm.json").is_file() and hf_config.is_file():
        try:
            model_type = json.loads(hf_config.read_text()).get("model_type")
        except json.JSONDecodeError:
            model_type = None
        if model_type in LLAVA_TYPES:
            from mmpt.export.hf_llava_load import vlm_from_llava

            return vlm_from_llava(folder, attn_implementation or "packed")
    from mmpt.models.vlm import VLMModule

    return VLMModule.from_export(folder, attn_implementation)


class _CallableModule(types.ModuleType):
    """``import mmpt.load`` binds ``mmpt.load`` to this module: calling it loads, as ``load``."""

    def __call__(self, path: str | Path, attn_implementation: str | None = None) -> VLMModule:
        return load(path, attn_implementation)


sys.modules[__name__].__class__ = _CallableModule

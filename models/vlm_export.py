"""mmpt's own VLM export format (``mmpt-vlm/3``): a folder that rebuilds the exact module.

Layout of an export folder::

    mmpt_vlm.json            format, components (class_path + init_args), tokens, template
    llm/                     the LLM (save_pretrained: config, weights, tokenizer with the
                             media tokens); a subfolder, so the root never poses as a plain
                             causal LM that silently drops the vision part
    tokenizer/               the tokenizer alone, which the loader reads: next to an LLM
                             config.json, transformers may pick the model type's tokenizer
                             class instead of the saved one (a word-level tokenizer then
                             decodes with a byte-level decoder)
    vision.safetensors       vision tower        connector.safetensors  (+ image_newline)
    fusion.safetensors       gated cross-attention blocks (fusion models)
    audio.safetensors        speech encoder      audio_adapter.safetensors

Every tensor is safetensors; nothing is pickled. :mod:`mmpt.models.vlm_load` reads it back.
"""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import save_file
from torch import nn

from mmpt.io import atomic_write_text
from mmpt.models.fusion import BLOCK_ATTR

if TYPE_CHECKING:
    from mmpt.models.vlm import VLMModule

log = logging.getLogger("mmpt.vlm")

FORMAT = "mmpt-vlm/3"
CONFIG_NAME = "mmpt_vlm.json"
LLM_DIR = "llm"
TOKENIZER_DIR = "tokenizer"
#: Module attribute -> weights file, for the parts outside the LLM folder.
PARTS = ("vision", "connector", "fusion", "audio", "audio_adapter")


def class_path(obj: Any) -> str:
    """Dotted import path of ``obj``'s class."""
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def init_args(obj: Any) -> dict[str, Any]:
    """Constructor arguments of ``obj`` that it keeps as attributes, JSON-safe.

    ``vision_dim``/``llm_dim``-style widths are included; the loader drops the first two
    positional arguments of a connector (the module passes them).
    """
    names = inspect.signature(type(obj).__init__).parameters
    out = {n: getattr(obj, n) for n in names if n != "self" and hasattr(obj, n)}
    return json.loads(json.dumps(out, default=list))


def component(obj: Any) -> dict[str, Any]:
    """``{"class_path", "init_args"}`` of a connector, adapter or resolution policy."""
    return {"class_path": class_path(obj), "init_args": init_args(obj)}


def export_mmpt_vlm(model: VLMModule, path: str | Path, template: str | None = None) -> Path:
    """Write ``model`` as an ``mmpt-vlm/3`` folder that :func:`mmpt.load` rebuilds exactly.

    Args:
        model: The trained model (any variant: towers, connectors, fusion, speech, text-only).
        path: Output folder (created; existing files of the same names are replaced).
        template: The data template the model trained with (``data.init_args.template``);
            None when unknown. ``mmpt generate`` uses it as the default chat format.

    Returns:
        The folder.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    llm_state = {
        k: v for k, v in model.llm.model.state_dict().items() if f".{BLOCK_ATTR}." not in k
    }
    model.llm.model.save_pretrained(str(out / LLM_DIR), state_dict=llm_state)
    for folder in (LLM_DIR, TOKENIZER_DIR):
        model.llm.tokenizer.save_pretrained(str(out / folder))
    hf_config = model.llm.model.config
    towers = (("image", "vision"), ("audio", "audio"))
    config: dict[str, Any] = {
        "format": FORMAT,
        "modalities": [m for m, a in towers if getattr(model, a) is not None],
        "template": template,
        "llm": {
            "folder": LLM_DIR,
            "tokenizer": TOKENIZER_DIR,
            "architecture": (hf_config.architectures or [type(model.llm.model).__name__])[0],
            "model_type": hf_config.model_type,
            "attn_implementation": getattr(hf_config, "_attn_implementation", None),
            "image_token": model.llm.image_token,
            "image_token_id": model.llm.image_token_id,
        },
        "val_shuffled_images": model.val_shuffled_images,
        "val_no_audio": model.val_no_audio,
        "vision": None,
        "connector": None,
        "resolution": None,
        "fusion": None,
        "audio": None,
        "audio_adapter": None,
    }
    if model.vision is not None:
        config["vision"] = model.vision.describe()
        config["connector"] = component(model.connector)
        config["resolution"] = component(model.resolution)
        config["fusion"] = asdict(model.fusion_config) if model.fusion_config else None
    if model.audio is not None:
        config["audio"] = model.audio.describe()
        config["audio_adapter"] = component(model.audio_adapter)
        config["audio_token"] = model.audio_token
        config["audio_token_id"] = model.audio_token_id
    for name in PARTS:
        part = getattr(model, name, None)
        if part is not None:
            save_weights(part, out / f"{name}.safetensors")
    atomic_write_text(out / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    log.info("exported VLM (%s) to %s", FORMAT, out)
    return out


def save_weights(module: nn.Module, path: Path) -> None:
    """Write ``module``'s state dict as safetensors (contiguous CPU copies)."""
    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, path)

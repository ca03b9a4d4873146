"""Export of a trained VLM (images and/or speech) as an HF-style folder."""

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

if TYPE_CHECKING:
    from mmpt.models.vlm import VLMModule

log = logging.getLogger("mmpt.vlm")

#: Model attribute of each modality's encoder.
_TOWERS = {"image": "vision", "audio": "audio"}


def _init_args(obj: Any) -> dict[str, Any]:
    """Constructor arguments of ``obj`` that it keeps as attributes (for export configs)."""
    names = inspect.signature(type(obj).__init__).parameters
    out = {n: getattr(obj, n) for n in names if n != "self" and hasattr(obj, n)}
    return json.loads(json.dumps(out, default=list))


def export_vlm(model: VLMModule, path: str | Path) -> Path:
    """Write an HF-style folder of the model.

    The LLM and tokenizer (``save_pretrained``) at the root; for images
    ``connector.safetensors`` (with ``image_newline`` when used) and
    ``vision.safetensors``; for speech ``audio.safetensors`` and
    ``audio_adapter.safetensors``; and ``mmpt_vlm.json`` (the towers, connectors,
    resolution policy and fusion configs).

    Args:
        model: The trained model.
        path: Output folder.

    Returns:
        The folder.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.llm.save_pretrained(out)
    cls = lambda o: f"{type(o).__module__}.{type(o).__qualname__}"  # noqa: E731
    modalities = [m for m in ("image", "audio") if getattr(model, _TOWERS[m]) is not None]
    config: dict[str, Any] = {"format": "mmpt-vlm/2", "modalities": modalities}
    if model.vision is not None:
        config |= {
            "image_token": model.llm.image_token,
            "image_token_id": model.llm.image_token_id,
            "connector": {
                "class_path": cls(model.connector),
                "init_args": _init_args(model.connector),
            },
            "vision": model.vision.describe(),
            "feature_layer": getattr(model.vision, "feature_layer", None),
            "resolution": {
                "class_path": cls(model.resolution),
                "init_args": _init_args(model.resolution),
            },
            "fusion": asdict(model.fusion_config) if model.fusion_config else None,
        }
        _save_weights(model.connector, out / "connector.safetensors")
        _save_weights(model.vision, out / "vision.safetensors")
    if model.audio is not None:
        config |= {
            "audio_token": model.audio_token,
            "audio_token_id": model.audio_token_id,
            "audio": model.audio.describe(),
            "audio_adapter": {
                "class_path": cls(model.audio_adapter),
                "init_args": _init_args(model.audio_adapter),
            },
        }
        _save_weights(model.audio, out / "audio.safetensors")
        _save_weights(model.audio_adapter, out / "audio_adapter.safetensors")
    atomic_write_text(out / "mmpt_vlm.json", json.dumps(config, indent=2) + "\n")
    log.info("exported VLM to %s", out)
    return out


def _save_weights(module: nn.Module, path: Path) -> None:
    """Write ``module``'s state dict as safetensors (contiguous CPU copies)."""
    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, path)

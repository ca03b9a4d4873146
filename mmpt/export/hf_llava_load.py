"""A transformers LLaVA folder -> an mmpt VLMModule, or its weights under mmpt's names.

Reads ``config.json``, ``preprocessor_config.json``, the tokenizer and the safetensors weights
(never pickle) of a ``LlavaForConditionalGeneration`` folder, in both the layout transformers 5
writes and the older one of the hub's ``llava-hf`` checkpoints.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers.initialization import no_init_weights

from mmpt.datamodules.templates import TEMPLATES
from mmpt.export.hf_llava import LLAVA_NAMES, SELECT_STRATEGY
from mmpt.models.encoders.hf_vision import HFVisionTower
from mmpt.models.llm import CausalLM
from mmpt.models.vlm import VLMModule

log = logging.getLogger("mmpt.export")

#: File prefix -> VLMModule prefix; the first match wins. The layout save_pretrained writes
#: (and the hub's, with the vision model nested), then transformers 5's in-memory names.
_FILE_PREFIXES = (
    ("language_model.lm_head.", "llm.model.lm_head."),
    ("language_model.model.", "llm.model.model."),
    ("vision_tower.vision_model.", "vision.model."),
    ("model.vision_tower.vision_model.", "vision.model."),
    ("vision_tower.", "vision.model."),
    ("multi_modal_projector.linear_1.", "connector.proj.0."),
    ("multi_modal_projector.linear_2.", "connector.proj.2."),
    *((llava, mmpt) for mmpt, llava in LLAVA_NAMES.items()),
)
_DROP = ("transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype")


def _read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_llava_config(folder: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a transformers LLaVA folder.

    Raises:
        FileNotFoundError: No such folder, or no ``config.json`` in it.
        ValueError: It is not a ``llava`` model.
    """
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: no config.json; give the folder of a transformers LLaVA model "
            "(e.g. `hf download llava-hf/llava-1.5-7b-hf --local-dir /models/llava-1.5-7b-hf`)"
        )
    config = _read_json(path / "config.json")
    if config.get("model_type") != "llava":
        raise ValueError(
            f"{path}: config.json has model_type {config.get('model_type')!r}, not 'llava': "
            "give a LlavaForConditionalGeneration folder (LLaVA-NeXT/OneVision are not read)"
        )
    return config


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return [path / f for f in sorted(set(_read_json(index)["weight_map"].values()))]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    raise FileNotFoundError(
        f"{path}: no model.safetensors (or its index): only safetensors weights are read, "
        "never pickle; save the model with `save_pretrained(..., safe_serialization=True)`"
    )


def _rename(name: str, targets: dict[str, torch.Tensor]) -> str | None:
    for src, dst in _FILE_PREFIXES:
        if name.startswith(src):
            out = dst + name[len(src) :]
            nested = "vision.model.vision_model." + name[len(src) :]
            return nested if dst == "vision.model." and nested in targets else out
    return None


def llava_state_dict(folder: str | Path, model: VLMModule) -> dict[str, torch.Tensor]:
    """A transformers LLaVA folder's weights under ``model``'s state-dict names.

    Vision tower -> ``vision.model.*``, projector ``linear_1``/``linear_2`` ->
    ``connector.proj.0``/``.2``, language model -> ``llm.model.*``. A tied ``lm_head`` (absent
    from the file) is the embedding matrix; a bias-free projector gets zero biases. Weights are
    renamed, not filtered: names ``model`` lacks and shapes that differ from its own are left
    for the caller to report (``init_from`` loads what matches by name and shape;
    :func:`vlm_from_llava` requires everything to match).

    Args:
        folder: The LLaVA folder (``config.json`` + safetensors).
        model: The VLMModule the weights are for (its names and tied/bias layout).

    Returns:
        Name -> tensor (the file's dtype), for ``model.load_state_dict``.

    Raises:
        FileNotFoundError: No config or no safetensors weights.
        ValueError: Not a LLaVA folder.
    """
    path = Path(folder)
    read_llava_config(path)
    targets = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(path):
        for name, tensor in load_file(str(file)).items():
            out[_rename(name, targets) or name] = tensor
    head, embed = "llm.model.lm_head.weight", "llm.model.model.embed_tokens.weight"
    if head in targets and head not in out and embed in out:
        out[head] = out[embed]  # tied embeddings: save_pretrained writes one copy
    for bias in ("connector.proj.0.bias", "connector.proj.2.bias"):
        if bias in targets and bias not in out:
            out[bias] = torch.zeros_like(targets[bias])  # multimodal_projector_bias: false
    return out


def _check_matches(path: Path, state: dict[str, torch.Tensor], model: VLMModule) -> None:
    """Raise unless ``state`` holds exactly ``model``'s weights, with its shapes."""
    own = model.state_dict()
    problems = [f"missing {k}" for k in own if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in own]
    problems += [
        f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if problems:
        raise ValueError(
            f"{path}: the weights do not match the model its config describes "
            f"({len(problems)} problems: {problems[:4]} ...)"
        )


def _arch(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in _DROP}


def vlm_from_llava(folder: str | Path, attn_implementation: str = "packed") -> VLMModule:
    """Rebuild a transformers LLaVA folder as an mmpt VLMModule with its weights (eval mode).

    ``HFVisionTower`` from ``vision_config`` (feature layer, mean/std and size from the
    folder), ``MLP2xGelu`` from the projector, ``CausalLM`` from ``text_config`` and the
    folder's tokenizer; the LLM keeps the folder's dtype, the tower and connector float32.

    Args:
        folder: A ``LlavaForConditionalGeneration`` folder with its tokenizer.
        attn_implementation: The LLM's attention (``CausalLM``'s argument).

    Returns:
        The VLMModule, its logits equal to transformers' on the same inputs.

    Raises:
        FileNotFoundError: No config, tokenizer or safetensors weights.
        ValueError: A LLaVA variant mmpt's VLM cannot express (the message says which).
    """
    path = Path(folder)
    config = read_llava_config(path)
    # LlavaConfig's defaults when a sub-config omits its type (older hub folders)
    vision_cfg = {"model_type": "clip_vision_model", **config.get("vision_config", {})}
    text_cfg = {"model_type": "llama", **config.get("text_config", {})}
    kind = vision_cfg.get("model_type")
    layer = config.get("vision_feature_layer", -2)
    strategy = config.get("vision_feature_select_strategy", "default")
    if kind not in SELECT_STRATEGY or strategy != SELECT_STRATEGY[kind]:
        raise ValueError(
            f"{path}: a {kind} tower with vision_feature_select_strategy={strategy!r}: mmpt's "
            "HFVisionTower drops CLIP's class token ('default') and keeps every SigLIP token "
            "('full'), nothing else"
        )
    if not isinstance(layer, int) or layer == 0:
        raise ValueError(
            f"{path}: vision_feature_layer={layer!r}: mmpt takes one block's output (not a "
            "list of layers, not the embeddings)"
        )
    if config.get("projector_hidden_act", "gelu") != "gelu":
        raise ValueError(f"{path}: projector_hidden_act must be 'gelu' (MLP2xGelu)")
    proc_file, pre_file = path / "processor_config.json", path / "preprocessor_config.json"
    proc = _read_json(proc_file) if proc_file.is_file() else {}
    # transformers 5 nests the image processor in processor_config.json; older folders do not
    pre = proc.get("image_processor") or (_read_json(pre_file) if pre_file.is_file() else {})
    image_token = proc.get("image_token")
    dtypes = [c.get(k) for c in (text_cfg, config) for k in ("dtype", "torch_dtype")]
    dtype = next((d for d in dtypes if isinstance(d, str)), None)
    with no_init_weights():
        vision = HFVisionTower(
            config=_arch(vision_cfg),
            feature_layer=layer if layer < 0 else layer - 1,
            mean=pre.get("image_mean"),
            std=pre.get("image_std"),
        )
        llm = CausalLM(
            config=_arch(text_cfg),
            tokenizer=str(path),
            image_token=image_token or "<image>",
            attn_implementation=attn_implementation,
            dtype=dtype,
        )
        if llm.image_token_id != config.get("image_token_index", config.get("image_token_id")):
            raise ValueError(
                f"{path}: the tokenizer's {llm.image_token!r} is id {llm.image_token_id} but "
                f"config.json's image_token_index is {config.get('image_token_index')}"
            )
        model = VLMModule(llm, vision)
    state = llava_state_dict(path, model)
    _check_matches(path, state, model)
    model.load_state_dict(state, strict=True)
    model.data_template = trained_template(path, llm.image_token)
    return model.eval()


def trained_template(folder: Path, image_token: str) -> str | None:
    """The mmpt data template whose chat template the folder carries (None: a foreign one).

    ``mmpt export`` writes the chat template of the template the model trained with
    (:func:`~mmpt.export.hf_processor.chat_template`), so an exact match names it, and
    ``mmpt generate`` formats prompts as in training.
    """
    from mmpt.export.hf_processor import chat_template

    file = folder / "chat_template.jinja"
    if file.is_file():
        source = file.read_text(encoding="utf-8")
    else:  # older folders keep it in the processor or tokenizer config
        configs = [folder / "processor_config.json", folder / "tokenizer_config.json"]
        found = [_read_json(f).get("chat_template") for f in configs if f.is_file()]
        source = next((c for c in found if isinstance(c, str)), None)
    if source is None:
        return None
    for name, template in TEMPLATES.items():
        if chat_template(template, image_token) == source:
            return name
    log.warning(
        "%s: its chat template is not one of mmpt's data templates (%s): `mmpt generate` "
        "formats prompts with --template (default plain)",
        folder,
        ", ".join(TEMPLATES),
    )
    return None

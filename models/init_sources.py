"""Readers of the formats ``model.init_from`` takes: each maps a source onto the model's keys.

One reader per source format; :mod:`mmpt.models.init_from` picks one by what the path is and
loads what it returns. Every torch file is read through :mod:`mmpt.safe_load`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from mmpt.safe_load import load_tensors

FLAG = "model.init_from"
#: ``config.json`` model types read as a Hugging Face CLIP/SigLIP model (full or one tower).
HF_TYPES = (
    "clip",
    "siglip",
    "siglip2",
    "clip_vision_model",
    "siglip_vision_model",
    "siglip2_vision_model",
)


@dataclass
class Mapped:
    """A source mapped onto a model's keys.

    Attributes:
        format: What the source is (``mmpt checkpoint``, ``open_clip``, ``timm``...).
        family: The model family the source holds (``VLM``, ``contrastive``, ``MAE``...).
        state: Model key -> tensor, in the source's shape (checked by the caller).
        unexpected: Source keys no model key took.
        adapted: Model key -> how its tensor was adapted (resized position embedding...).
        scope: Model keys this format can fill (the towers it targets); None: all of them.
    """

    format: str
    family: str
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    adapted: dict[str, str] = field(default_factory=dict)
    scope: list[str] | None = None


def family_of(keys: list[str] | set[str]) -> str:
    """The mmpt model family whose parameters are named ``keys`` (a module or a checkpoint)."""
    tops = {k.split(".", 1)[0] for k in keys}
    if "llm" in tops:
        if "audio_adapter" in tops:
            return "speech-LLM (BLSP)"
        return "VLM" if tops & {"vision", "connector", "fusion"} else "LLM"
    if "decoder" in tops and any(k.startswith("decoder.mask_token") for k in keys):
        return "MAE"
    if "text" in tops and "audio" in tops:
        return "audio-text contrastive"
    if "text" in tops and "vision" in tops:
        return "video-text fusion" if tops & {"fusion", "vtm_head"} else "contrastive"
    if "encoder" in tops and any("quantizer" in k for k in keys):
        return "speech (wav2vec 2.0 pretraining)"
    return f"unknown (keys such as {sorted(keys)[:3]})"


def clean_key(key: str) -> str:
    """A key without torch.compile (``_orig_mod.``) and DDP (``module.``) wrappers."""
    return key.replace("_orig_mod.", "").removeprefix("module.")


def towers(model: nn.Module, cls: type) -> Iterator[tuple[str, nn.Module]]:
    """(prefix with trailing dot, module) of every ``cls`` in ``model``, outermost only."""
    taken: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, cls) and not any(name.startswith(t) for t in taken):
            taken.append(f"{name}.")
            yield f"{name}." if name else "", module


def prefixed(prefix: str, module: nn.Module) -> list[str]:
    """The model keys of ``module`` found under ``prefix``."""
    return [prefix + k for k in module.state_dict()]


def tensors_of(path: str) -> tuple[dict[str, torch.Tensor], bool]:
    """The tensors of a checkpoint file and whether it is a Lightning checkpoint.

    A Lightning/mmpt checkpoint gives its ``state_dict``; a timm/DeiT release its ``model``
    (or EMA) entry; a plain state dict itself. Wrapper prefixes are removed.
    """
    obj = load_tensors(path)
    lightning = isinstance(obj.get("state_dict"), dict) and "pytorch-lightning_version" in obj
    for key in ("state_dict", "state_dict_ema", "model_ema", "model"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    return {clean_key(k): v for k, v in obj.items() if torch.is_tensor(v)}, lightning


def by_name(state: dict[str, torch.Tensor], fmt: str, lightning: bool) -> Mapped:
    """The source as it is: keys named like the model's (an mmpt checkpoint or state dict)."""
    family = family_of(set(state)) if state else "empty"
    return Mapped(fmt if lightning else "state dict", family, dict(state))


def from_open_clip(state: dict[str, torch.Tensor], model: nn.Module) -> Mapped:
    """An open_clip ``CLIP``/``CustomTextCLIP`` state dict onto mmpt's open_clip towers.

    ``visual.*`` goes to every ``OpenCLIPVisionTower`` (``<tower>.visual.*``), the text keys to
    every ``OpenCLIPTextTower`` (``<tower>.text.*``), ``logit_scale`` (and ``logit_bias``) to
    the model's loss when it has one.
    """
    from mmpt.models.encoders.open_clip_text import OpenCLIPTextTower, text_state_from_clip
    from mmpt.models.encoders.open_clip_vision import OpenCLIPVisionTower

    out = Mapped("open_clip", "open_clip CLIP", scope=[])
    used: set[str] = set()
    visual = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    for prefix, tower in towers(model, OpenCLIPVisionTower):
        out.scope += prefixed(f"{prefix}visual.", tower.visual)
        out.state.update({f"{prefix}visual.{k}": v for k, v in visual.items()})
        used.update(f"visual.{k}" for k in visual)
    text_towers = list(towers(model, OpenCLIPTextTower))
    has_text = "token_embedding.weight" in state or "text.token_embedding.weight" in state
    text = text_state_from_clip(state) if text_towers and has_text else {}
    for prefix, tower in text_towers:
        out.scope += prefixed(f"{prefix}text.", tower.text)
        out.state.update({f"{prefix}text.{k}": v for k, v in text.items()})
        nested = "text.token_embedding.weight" in state  # CustomTextCLIP keeps text.*
        used.update(f"text.{k}" if nested else k for k in text)
    own = model.state_dict()
    for name in ("logit_scale", "logit_bias"):
        target = own.get(f"loss.{name}")
        if name in state and target is not None and target.numel() == state[name].numel():
            out.scope.append(f"loss.{name}")
            out.state[f"loss.{name}"] = state[name].reshape(target.shape)
            used.add(name)
    out.unexpected = [k for k in state if k not in used and k != "text.attn_mask"]
    return out


def from_timm(path: str, model: nn.Module) -> Mapped:
    """A timm model's state dict onto every ``TimmVisionTower`` (``<tower>.model.*``).

    Position and patch embeddings are adapted as a tower's own ``init_from`` does
    (:mod:`mmpt.models.encoders.vit_init`).
    """
    from mmpt.models.encoders.timm_vit import TimmVisionTower
    from mmpt.models.encoders.vit_init import InitReport, _grid, adapt_vit_state, read_vit_source

    out = Mapped("timm", "timm image model", scope=[])
    unexpected: set[str] | None = None
    for prefix, tower in towers(model, TimmVisionTower):
        own = tower.model.state_dict()
        source = read_vit_source(path, own.keys(), FLAG)
        report = InitReport(source.file, source.prefix)
        bands = tower.image_preprocess.bands
        tensors = adapt_vit_state(source, own, _grid(tower.model, own), bands, report)
        out.scope += [f"{prefix}model.{k}" for k in own]
        out.state.update({f"{prefix}model.{k}": v for k, v in tensors.items()})
        out.adapted.update({f"{prefix}model.{k}": how for k, how in report.resized.items()})
        left = {source.prefix + k for k in report.unexpected}
        unexpected = left if unexpected is None else unexpected & left
    out.unexpected = sorted(unexpected or [])
    return out


def _unwrap(module: nn.Module, attr: str) -> nn.Module:
    """``module.<attr>`` while it exists (a full model's tower; transformers < 5 nesting)."""
    while hasattr(module, attr) and isinstance(getattr(module, attr), nn.Module):
        module = getattr(module, attr)
    return module


def from_hf_clip(folder: str, model: nn.Module) -> Mapped:
    """A Hugging Face CLIP/SigLIP folder (full model or vision model) onto mmpt's HF towers.

    Loaded by ``transformers`` itself (``from_pretrained``, local files only, float32). Its
    vision model goes to every ``HFVisionTower``, its text model (full models) to every
    ``HFTextTower`` holding a text model of the same type; projections stay at init.
    """
    from transformers import AutoModel

    from mmpt.models.encoders.hf_text import HFTextTower
    from mmpt.models.encoders.hf_vision import HFVisionTower

    source = AutoModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    kind = source.config.model_type
    out = Mapped(f"Hugging Face {kind}", f"Hugging Face {kind}", scope=[])
    used: set[str] = set()
    named = {id(m): n for n, m in source.named_modules()}
    for attr, cls in (("vision_model", HFVisionTower), ("text_model", HFTextTower)):
        src = _unwrap(source, attr)
        if attr == "text_model" and not hasattr(source, "text_model"):
            continue  # a vision model: no text tower to give
        src_prefix = f"{named[id(src)]}." if named[id(src)] else ""
        for prefix, tower in towers(model, cls):
            dst = _unwrap(tower.model, attr)
            if type(dst) is not type(src):
                continue  # e.g. a BERT text tower: not this model's text part
            inner = {id(m): n for n, m in tower.model.named_modules()}[id(dst)]
            dst_prefix = f"{prefix}model.{inner}." if inner else f"{prefix}model."
            out.scope += prefixed(dst_prefix, dst)
            for k, v in src.state_dict().items():
                out.state[dst_prefix + k] = v
                used.add(src_prefix + k)
    out.unexpected = [k for k in source.state_dict() if k not in used]
    return out


def from_folder_hooks(folder: str, model: nn.Module) -> Mapped | None:
    """An mmpt export folder (``mmpt_vlm.json``) or a transformers LLaVA folder; else None.

    Read by the modules that write those formats: ``mmpt.models.vlm_load.export_state_dict`` and
    ``mmpt.export.hf_llava_load.llava_state_dict`` (mmpt keys -> tensors).
    """
    if os.path.isfile(os.path.join(folder, "mmpt_vlm.json")):
        from mmpt.models.vlm_load import export_state_dict

        state = dict(export_state_dict(folder))
        return Mapped("mmpt export folder", family_of(set(state)), state)
    if hf_model_type(folder) == "llava":
        from mmpt.export.hf_llava_load import llava_state_dict

        state = dict(llava_state_dict(folder, model))
        return Mapped("transformers LLaVA folder", "VLM", state)
    return None


def hf_model_type(folder: str) -> str | None:
    """``model_type`` of a folder's ``config.json``; None without one."""
    file = os.path.join(folder, "config.json")
    if not os.path.isfile(file):
        return None
    with open(file, encoding="utf-8") as f:
        return json.load(f).get("model_type")

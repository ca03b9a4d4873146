"""mmpt VLM -> a transformers ``LlavaForConditionalGeneration`` folder with its processor.

A VLMModule maps exactly onto transformers' LLaVA when it is a SigLIP/CLIP ``HFVisionTower``
-> ``MLP2xGelu`` -> a Hugging Face causal LM, injecting one fixed-size crop per image. The
state-dict names of the two (:data:`LLAVA_NAMES`) are shared with the import side
(:mod:`mmpt.export.hf_llava_load`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoConfig, LlavaConfig, LlavaForConditionalGeneration

from mmpt.datamodules.templates import get_template, stop_token_ids
from mmpt.export.hf_processor import save_llava_processor
from mmpt.models.connectors import MLP2xGelu
from mmpt.models.encoders.hf_vision import HFVisionTower

if TYPE_CHECKING:
    from mmpt.models.vlm import VLMModule

log = logging.getLogger("mmpt.export")

#: VLMModule state-dict prefix -> LlavaForConditionalGeneration's (transformers 5, in memory).
LLAVA_NAMES = {
    "vision.model.": "model.vision_tower.",
    "connector.proj.0.": "model.multi_modal_projector.linear_1.",
    "connector.proj.2.": "model.multi_modal_projector.linear_2.",
    "llm.model.model.": "model.language_model.",
    "llm.model.lm_head.": "lm_head.",
}
#: Vision model types LLaVA takes -> the select strategy that keeps exactly the patch tokens
#: HFVisionTower gives: CLIP's class token dropped (``default``), every SigLIP token (``full``).
SELECT_STRATEGY = {"clip_vision_model": "default", "siglip_vision_model": "full"}
_OTHER_FORMAT = "`mmpt export --format mmpt` exports it"


def llava_unsupported(model: VLMModule) -> str | None:
    """Why ``model`` has no exact transformers LLaVA equivalent, or None when it has one.

    Args:
        model: The VLM to export.

    Returns:
        None, or a sentence naming the part that does not map (and the mmpt format, which
        exports every VLM).
    """
    reason = _unsupported_part(model)
    return None if reason is None else f"{reason}; {_OTHER_FORMAT}"


def _unsupported_part(model: VLMModule) -> str | None:
    from mmpt.datamodules.resolution import AnyResTiles, FixedResolution

    vision = model.vision
    if vision is None:
        return "the model has no vision tower (a LLaVA model is image + text)"
    if model.audio is not None:
        return "the model has a speech encoder (model.audio), which LLaVA has no place for"
    if model.fusion is not None:
        return "gated cross-attention fusion (model.fusion): LLaVA injects image tokens"
    if not isinstance(vision, HFVisionTower):
        return (
            f"the vision tower is {type(vision).__name__} (timm/open_clip): a transformers "
            "LLaVA needs a SigLIP or CLIP tower (HFVisionTower) as its vision_config"
        )
    kind = vision.model.config.model_type
    if kind not in SELECT_STRATEGY:
        return (
            f"the {kind} (NaFlex) vision tower takes patchified inputs with spatial shapes, "
            "which LLaVA's vision tower call does not pass"
        )
    if type(model.connector) is not MLP2xGelu:
        return (
            f"the connector is {type(model.connector).__name__}: LLaVA's projector is "
            "Linear-GELU-Linear on every patch token (MLP2xGelu)"
        )
    resolution = model.resolution
    if isinstance(resolution, AnyResTiles):
        return (
            "AnyResTiles differs from LLaVA-NeXT's AnyRes: LLaVA-NeXT removes the padding from "
            "the tiled feature canvas before adding a newline token after each row (mmpt keeps "
            "the padded canvas), always adds the newline and the base view, and picks the grid "
            "among fixed image_grid_pinpoints"
        )
    if not isinstance(resolution, FixedResolution):
        return (
            f"the resolution policy is {type(resolution).__name__}: LLaVA takes one fixed-size "
            "crop per image"
        )
    size = int(vision.model.config.image_size)
    if resolution.image_size != size or vision.image_preprocess.size != size:
        return (
            f"images are {resolution.image_size} px but the tower's position embeddings are "
            f"for {size} px: mmpt interpolates them, LLaVA's vision tower does not"
        )
    lm = model.llm.model
    if not (hasattr(lm, "lm_head") and hasattr(lm, "model")):
        return f"the LLM {type(lm).__name__} has no `model` + `lm_head` split as LLaVA's has"
    return None


def llava_config(model: VLMModule) -> LlavaConfig:
    """The ``LlavaConfig`` of a supported VLMModule (see :func:`llava_unsupported`).

    ``vision_feature_layer`` indexes ``hidden_states`` (embeddings first), so mmpt's
    block index ``f`` is ``f`` when negative and ``f + 1`` otherwise; CLIP drops its class
    token (``default``), SigLIP has none (``full``).
    """
    vision, llm = model.vision, model.llm
    text = _fresh_config(llm.model.config)
    text.vocab_size = llm.vocab_size
    layer = int(vision.feature_layer)
    grid = model.resolution.grid
    return LlavaConfig(
        vision_config=_fresh_config(vision.model.config),
        text_config=text,
        image_token_index=int(llm.image_token_id),
        image_seq_length=grid[0] * grid[1],
        projector_hidden_act="gelu",
        vision_feature_select_strategy=SELECT_STRATEGY[vision.model.config.model_type],
        vision_feature_layer=layer if layer < 0 else layer + 1,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(text.tie_word_embeddings),
        dtype=str(llm.model.dtype).removeprefix("torch."),
    )


def _fresh_config(cfg: Any) -> Any:
    """A copy of an HF config through its dict (drops mmpt's runtime attention choice)."""
    fields = cfg.to_dict()
    for key in ("_attn_implementation", "_attn_implementation_autoset", "architectures"):
        fields.pop(key, None)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def llava_weights(model: VLMModule, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The VLMModule's weights under LLaVA's names, cast to ``dtype``.

    Raises:
        ValueError: A weight outside the vision tower, connector and LLM.
    """
    out = {}
    for name, tensor in model.state_dict().items():
        prefix = next((p for p in LLAVA_NAMES if name.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"weight {name!r} has no place in a LLaVA model")
        out[LLAVA_NAMES[prefix] + name[len(prefix) :]] = tensor.detach().to(dtype)
    return out


def export_llava(model: VLMModule, out: str | Path, template: str | None = None) -> Path:
    """Write a folder that ``LlavaForConditionalGeneration`` and ``AutoProcessor`` load.

    The weights (in the LLM's dtype) and config come from transformers' own
    ``save_pretrained``; the processor (:func:`~mmpt.export.hf_processor.save_llava_processor`)
    resizes and normalises as the tower was trained, expands ``<image>`` to the model's
    image token count and carries the chat template the model was trained with.

    Args:
        model: A supported VLMModule (see :func:`llava_unsupported`).
        out: Output folder (created if missing).
        template: Name of the data template the model trained with (``data.template``:
            ``plain``, ``chatml``, ``llama3``, ``vicuna``); None keeps the tokenizer's chat
            template, or uses ``plain`` (the data default) when it has none.

    Returns:
        The folder.

    Raises:
        ValueError: The model has no exact LLaVA equivalent (the reason says which part), or
            ``template`` is unknown.
    """
    reason = llava_unsupported(model)
    if reason is not None:
        raise ValueError(f"--format llava: {reason}")
    if template is not None:
        get_template(template, "--template")  # an unknown name fails before anything is written
    config = llava_config(model)
    dtype = model.llm.model.dtype
    weights = llava_weights(model, dtype)
    with torch.device("meta"):
        hf = LlavaForConditionalGeneration(config)
    hf.load_state_dict(weights, strict=True, assign=True)
    if config.tie_word_embeddings:
        hf.tie_weights()
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    hf.generation_config.eos_token_id = stop_token_ids(model.llm.tokenizer, template)
    hf.generation_config.pad_token_id = model.preprocess.pad_id
    hf.save_pretrained(str(path))
    save_llava_processor(model, path, template, config.vision_feature_select_strategy)
    log.info("exported LLaVA (%s) to %s", type(hf).__name__, path)
    return path

"""Export an open_clip-tower contrastive model as a ``transformers.CLIPModel`` folder.

OpenAI-CLIP-shaped open_clip towers (a ViT image tower with class-token pooling and a causal
text transformer pooled at the end-of-text token) are exactly ``CLIPModel``: the weights are
renamed with the timm <-> open_clip and timm <-> Hugging Face ViT tables of
``mmpt.models.encoders`` (the text blocks share the image blocks' layout), and the folder gets a
``CLIPProcessor``: a ``CLIPTokenizer`` built from open_clip's own BPE vocabulary and merges (it
pads with ``<|endoftext|>`` where open_clip pads with 0; the text pooling reads the first
end-of-text token, so the embeddings are the same) and a ``CLIPImageProcessor`` with the trained
size, mean and std. Loading: ``CLIPModel.from_pretrained(out)``,
``CLIPProcessor.from_pretrained(out)``.

Not expressible: timm image trunks, SigLIP's logit bias, and open_clip options ``CLIPModel``
lacks (attentional pooling, layer scale, no ``ln_pre``, custom blocks ...): a ``ValueError``
names the option.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from open_clip.model import CLIPTextCfg
from torch import nn
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from mmpt.models.encoders.hf_vision import hf_vit_table
from mmpt.models.encoders.open_clip_load import open_clip_model_cfg
from mmpt.models.encoders.open_clip_text import OpenCLIPTextTower
from mmpt.models.encoders.open_clip_vision import OpenCLIPVisionTower, open_clip_vit_table
from mmpt.models.encoders.vit_convert import Rename, from_timm_view, table_entries, timm_view

from .clip_vit import clip_vit_shape, non_default

SUPPORTED = "an OpenCLIPVisionTower ViT and an OpenCLIPTextTower trained with ClipLoss"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
#: text_cfg fields that only size the tower or do not apply to it; any other must be default
_TEXT_FREE = {
    "context_length",
    "vocab_size",
    "width",
    "heads",
    "layers",
    "mlp_ratio",
    "output_tokens",
    "pad_id",
    "eos_id",
    "tokenizer_mode",
    "tokenizer_kwargs",
} | {f.name for f in dataclasses.fields(CLIPTextCfg) if f.name.startswith("hf_")}


def _unsupported(what: str) -> ValueError:
    return ValueError(f"transformers CLIPModel cannot express {what}; it supports {SUPPORTED}")


def clip_config(vision: OpenCLIPVisionTower, text: OpenCLIPTextTower) -> CLIPConfig:
    """The ``CLIPConfig`` of two open_clip towers (ValueError when one is not CLIP-shaped)."""
    try:
        v, quick = clip_vit_shape(vision)
    except ValueError as err:
        raise _unsupported(str(err)) from err
    t_args = text.describe()["init_args"]
    odd = non_default(t_args["text_cfg"], CLIPTextCfg, _TEXT_FREE)
    if odd:
        raise _unsupported(f"open_clip options {odd} of the text tower")
    if quick != bool(open_clip_model_cfg(t_args["model_name"]).get("quick_gelu", False)):
        raise _unsupported("towers with different activations (quick_gelu)")
    act = "quick_gelu" if quick else "gelu"
    t = {**dataclasses.asdict(CLIPTextCfg()), **t_args["text_cfg"]}
    return CLIPConfig(
        projection_dim=int(text.output_dim),
        vision_config={
            "hidden_size": v["width"],
            "intermediate_size": int(v["width"] * v["mlp_ratio"]),
            "num_hidden_layers": v["layers"],
            "num_attention_heads": v["width"] // v["head_width"],
            "image_size": vision.image_preprocess.size,
            "patch_size": v["patch_size"],
            "hidden_act": act,
            "layer_norm_eps": 1e-5,
        },
        text_config={
            "hidden_size": t["width"],
            "intermediate_size": int(t["width"] * t["mlp_ratio"]),
            "num_hidden_layers": t["layers"],
            "num_attention_heads": t["heads"],
            "max_position_embeddings": t["context_length"],
            "vocab_size": t["vocab_size"],
            "hidden_act": act,
            "layer_norm_eps": 1e-5,
            "bos_token_id": text.tokenizer.vocab_size - 2,
            "eos_token_id": text.tokenizer.vocab_size - 1,  # pooled at its first occurrence
            "pad_token_id": text.tokenizer.vocab_size - 1,
        },
    )


def _convert(
    state: dict[str, torch.Tensor],
    own: list[Rename],
    hf: list[Rename],
    target: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """open_clip tensors -> HF names through timm names, with the two tables."""
    view = timm_view(state, table_entries(state.keys(), own))
    entries = table_entries(target.keys(), hf)
    missing = sorted(set(entries) - set(view))
    if missing:
        raise RuntimeError(f"open_clip -> CLIP conversion lacks {missing[:5]} (an mmpt bug)")
    return from_timm_view(view, entries, target)


def _sub(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def clip_state_dict(model: nn.Module, target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``CLIPModel`` state dict of ``model`` (``target``: the CLIPModel's, for shapes)."""
    visual, text = model.vision.visual, model.text.text
    out = {
        f"vision_model.{k}": v
        for k, v in _convert(
            visual.state_dict(),
            open_clip_vit_table(),
            hf_vit_table(),
            _sub(target, "vision_model."),
        ).items()
    }
    blocks = [r for r in open_clip_vit_table() if "{i}" in r.timm]
    hf_blocks = [r for r in hf_vit_table() if "{i}" in r.timm]
    text_target = _sub(target, "text_model.")
    out.update(
        {
            f"text_model.{k}": v
            for k, v in _convert(text.state_dict(), blocks, hf_blocks, text_target).items()
        }
    )
    out.update(
        {
            "text_model.embeddings.token_embedding.weight": text.token_embedding.weight,
            "text_model.embeddings.position_embedding.weight": text.positional_embedding,
            "text_model.final_layer_norm.weight": text.ln_final.weight,
            "text_model.final_layer_norm.bias": text.ln_final.bias,
            "text_projection.weight": text.text_projection.T,
            "visual_projection.weight": visual.proj.T,
            "logit_scale": model.loss.logit_scale.reshape(()),
        }
    )
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def clip_tokenizer(context_length: int) -> CLIPTokenizer:
    """open_clip's BPE tokenizer as a ``CLIPTokenizer`` (same ids up to the end-of-text token)."""
    from open_clip.tokenizer import SimpleTokenizer

    bpe = SimpleTokenizer()
    vocab = dict(bpe.encoder)
    vocab[BOS] = vocab.pop("<start_of_text>")
    vocab[EOS] = vocab.pop("<end_of_text>")
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context_length)


def export_hf_clip(model: nn.Module, out: str | Path) -> Path:
    """Write ``model`` as a ``transformers`` ``CLIPModel`` + ``CLIPProcessor`` folder.

    Args:
        model: A ``ContrastiveModule`` with open_clip ViT and text towers and ``ClipLoss``.
        out: Output folder (created).

    Returns:
        The folder.

    Raises:
        ValueError: A tower, option or loss ``CLIPModel`` cannot express.
    """
    vision, text = getattr(model, "vision", None), getattr(model, "text", None)
    if not isinstance(vision, OpenCLIPVisionTower) or not isinstance(text, OpenCLIPTextTower):
        names = f"{type(vision).__name__} + {type(text).__name__}"
        raise _unsupported(f"the towers {names}")
    if hasattr(model.loss, "logit_bias"):
        raise _unsupported("SigLIP's logit bias (SigLipLoss)")
    config = clip_config(vision, text)
    clip = CLIPModel(config)
    clip.load_state_dict(clip_state_dict(model, clip.state_dict()), strict=True)
    out = Path(out)
    clip.save_pretrained(out)
    pre = vision.image_preprocess
    images = CLIPImageProcessor(
        size={"shortest_edge": pre.size},
        crop_size={"height": pre.size, "width": pre.size},
        image_mean=list(pre.mean),
        image_std=list(pre.std),
        resample=3,  # bicubic, as mmpt's evaluation transform
    )
    CLIPProcessor(
        image_processor=images, tokenizer=clip_tokenizer(config.text_config.max_position_embeddings)
    ).save_pretrained(out)
    return out

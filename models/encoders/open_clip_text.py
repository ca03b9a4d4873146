"""open_clip text transformer tower with its BPE tokenizer, loadable from CLIP checkpoints."""

from __future__ import annotations

import copy
from typing import Any

import torch
from open_clip.model import _build_text_tower, resize_text_pos_embed
from torch import nn

from . import class_path
from .open_clip_vision import (
    load_open_clip_state_dict,
    load_tower_state,
    open_clip_model_cfg,
    resolve_open_clip_checkpoint,
)
from .tokenizers import OPENCLIP_VOCAB_SIZE, OpenCLIPTokenizer

TEXT_FLAG = "--model.init_args.text.init_args.pretrained"
# Text-tower entries of open_clip's CLIP state dict, which keeps them at the top level under the
# same names TextTransformer uses (CustomTextCLIP nests them under "text." instead).
_CLIP_TEXT_KEYS = (
    "token_embedding",
    "positional_embedding",
    "transformer",
    "ln_final",
    "text_projection",
    "cls_emb",
    "attn_mask",
)


def text_state_from_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pick the text tower's entries out of an open_clip checkpoint, as TextTransformer names.

    Accepts a ``CLIP`` state dict (text keys at the top level, next to ``visual.*`` and
    ``logit_scale``), a ``CustomTextCLIP`` one (``text.*``), or a text-only state dict.
    ``attn_mask`` is dropped: it is a non-persistent buffer the tower rebuilds.

    Args:
        state: Checkpoint state dict.

    Returns:
        State dict keyed like ``open_clip.transformer.TextTransformer.state_dict()``.

    Raises:
        ValueError: When no text-tower entries are found.

    """
    if any(k.startswith("text.") for k in state):
        out = {k[len("text.") :]: v for k, v in state.items() if k.startswith("text.")}
    else:
        out = {
            k: v
            for k, v in state.items()
            if any(k == p or k.startswith(p + ".") for p in _CLIP_TEXT_KEYS)
        }
    out.pop("attn_mask", None)
    if "token_embedding.weight" not in out:
        raise ValueError(
            "No open_clip text tower in the checkpoint (no token_embedding.weight or "
            f"text.token_embedding.weight); its first keys are {list(state)[:5]}."
        )
    return out


class OpenCLIPTextTower(nn.Module):
    """open_clip's causal text transformer (argmax/EOT pooling) plus its BPE tokenizer.

    Built by ``open_clip.model._build_text_tower``, the function open_clip's ``CLIP`` uses,
    so ``forward`` equals ``CLIP.encode_text`` for the same weights.

    Attributes:
        text: ``open_clip.transformer.TextTransformer``.
        output_dim: Projection width.
        tokenizer: ``OpenCLIPTokenizer`` with the config's context length.

    """

    def __init__(
        self,
        model_name: str = "ViT-B-16",
        embed_dim: int | None = None,
        pretrained: str | None = None,
        text_cfg: dict | None = None,
    ) -> None:
        """Build the tower and optionally load local weights.

        Args:
            model_name: open_clip config name (``open_clip.list_models()``) or
                ``local-dir:/folder`` with an ``open_clip_config.json``.
            embed_dim: Projection width; None keeps the config's ``embed_dim``. A different value
                gives a new (randomly initialised) ``text_projection`` when loading weights.
            pretrained: Local open_clip checkpoint file/folder (full CLIP, CustomTextCLIP or
                text-only state dict). None: random init.
            text_cfg: Overrides merged into the config's ``text_cfg`` (``CLIPTextCfg`` fields:
                ``layers``, ``width``, ``heads``, ``context_length`` ...).

        Raises:
            FileNotFoundError: When ``pretrained`` does not exist.
            ValueError: For configs this tower cannot serve, an open_clip tag as
                ``pretrained``, or a checkpoint that does not fit.

        """
        super().__init__()
        cfg = open_clip_model_cfg(model_name)
        file = (
            resolve_open_clip_checkpoint(model_name, pretrained, TEXT_FLAG)
            if pretrained is not None
            else None
        )
        tcfg = {**cfg["text_cfg"], **(text_cfg or {})}
        if tcfg.get("hf_model_name"):
            raise ValueError(
                f"{model_name} uses a Hugging Face text model ({tcfg['hf_model_name']}); use "
                "mmpt.models.encoders.HFTextTower with a local copy of it instead."
            )
        if tcfg.get("hf_tokenizer_name"):
            raise ValueError(
                f"{model_name} uses the {tcfg['hf_tokenizer_name']} tokenizer, not open_clip's BPE "
                "one; OpenCLIPTextTower supports BPE-tokenized configs only."
            )
        if tcfg.get("vocab_size", OPENCLIP_VOCAB_SIZE) < OPENCLIP_VOCAB_SIZE:
            raise ValueError(
                f"text_cfg.vocab_size={tcfg['vocab_size']} is smaller than the BPE tokenizer's "
                f"{OPENCLIP_VOCAB_SIZE} ids."
            )
        self.output_dim = int(embed_dim if embed_dim is not None else cfg["embed_dim"])
        self.text = _build_text_tower(
            self.output_dim, tcfg, quick_gelu=bool(cfg.get("quick_gelu", False))
        )
        self.tokenizer = OpenCLIPTokenizer(context_length=int(self.text.context_length))
        if file is not None:
            self._load(file)
        self._init_args: dict[str, Any] = {
            "model_name": model_name,
            "embed_dim": self.output_dim,
            "pretrained": None,  # weights travel separately
            "text_cfg": copy.deepcopy(tcfg),
        }

    def _load(self, file: str) -> None:
        state = text_state_from_clip(load_open_clip_state_dict(file))
        pos = state.get("positional_embedding")
        if pos is not None and pos.shape[-1] == self.text.positional_embedding.shape[-1]:
            resize_text_pos_embed(state, self.text)  # open_clip's resize to context_length
        load_tower_state(self.text, state, ("text_projection",), file, TEXT_FLAG)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Encode token ids.

        Args:
            tokens: (B, L) long ids from ``self.tokenizer`` (L = context_length).

        Returns:
            (B, embed_dim) pooled and projected features, not normalised.

        """
        out = self.text(tokens)
        return out[0] if isinstance(out, tuple) else out

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable ``class_path``/``init_args`` that rebuild this architecture.

        ``pretrained`` is None (weights travel separately); ``text_cfg`` is the full merged
        config, ``embed_dim`` the resolved width.
        """
        return {"class_path": class_path(self), "init_args": copy.deepcopy(self._init_args)}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn activation checkpointing of the transformer blocks on or off."""
        self.text.set_grad_checkpointing(enable)

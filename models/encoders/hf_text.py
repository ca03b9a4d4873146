"""Text tower from a local Hugging Face encoder (BERT, RoBERTa ...) with CLS or mean pooling."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers import AutoModel

from mmpt.preflight import missing_weights_error

from .tokenizers import HFTokenizer, resolve_hf_path

PATH_FLAG = "--model.init_args.text.init_args.path"
POOLINGS = ("cls", "mean")


class HFTextTower(nn.Module):
    """``AutoModel.from_pretrained(path, local_files_only=True)`` + pooling + linear projection.

    Positions holding the tokenizer's pad id are masked in attention and in mean pooling.
    An unused HF ``pooler`` sub-module is removed so DDP sees no unused parameters.

    Attributes:
        model: The Hugging Face encoder.
        proj: Linear (hidden_size -> embed_dim), newly initialised.
        output_dim: ``embed_dim``.
        tokenizer: ``HFTokenizer(path, context_length)``.
        pad_id: Token id treated as padding.

    """

    #: Arguments holding local weights paths (checked by :mod:`mmpt.preflight` before building).
    weight_paths: ClassVar[tuple[str, ...]] = ("path",)

    def __init__(
        self,
        path: str,
        embed_dim: int = 512,
        pooling: str = "cls",
        context_length: int = 77,
        repo_id: str | None = None,
    ) -> None:
        """Load the encoder and its tokenizer from ``path``.

        Args:
            path: Folder written by ``save_pretrained`` (model and tokenizer), or a repo id
                already in the Hugging Face cache.
            embed_dim: Projection width.
            pooling: "cls" (first token's hidden state) or "mean" (mean over non-pad tokens).
            context_length: Tokenizer row length L; must fit the model's position embeddings.
            repo_id: The hub repo ``path`` is a local copy of (``distilbert-base-uncased``),
                named in the missing-weights error.

        Raises:
            FileNotFoundError: When ``path`` is neither a folder nor a cached repo id.
            ValueError: For an unknown pooling or a context length the model cannot take.

        """
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        try:
            path = resolve_hf_path(path, "config.json", PATH_FLAG)
        except FileNotFoundError as err:
            raise missing_weights_error("Text encoder weights", path, repo_id, PATH_FLAG) from err
        # transformers returns eval mode and Lightning keeps submodule modes: train mode as a
        # tower built from a config, or its dropout is silently off during training
        self.model = AutoModel.from_pretrained(path, local_files_only=True).train()
        max_pos = getattr(self.model.config, "max_position_embeddings", None)
        if max_pos is not None and context_length > max_pos:
            raise ValueError(
                f"context_length={context_length} exceeds the model's max_position_embeddings "
                f"({max_pos}) in {path}."
            )
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None  # not used by either pooling; would be an unused param
        self.tokenizer = HFTokenizer(path, context_length=context_length)
        self.pad_id = self.tokenizer.pad_token_id
        self.pooling = pooling
        hidden = int(self.model.config.hidden_size)
        self.proj = nn.Linear(hidden, embed_dim)
        self.output_dim = embed_dim

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Encode token ids.

        Args:
            tokens: (B, L) long ids from ``self.tokenizer``, right-padded with ``pad_id``.

        Returns:
            (B, embed_dim) pooled and projected features, not normalised.

        """
        return self.pool(*self.hidden_states(tokens))

    def hidden_states(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's last hidden states (B, L, hidden) and the non-pad mask (B, L) bool."""
        mask = tokens != self.pad_id  # (B, L)
        hidden = self.model(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        return hidden, mask

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pool (B, L, hidden) states over the (B, L) non-pad mask and project: (B, embed_dim)."""
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.proj(pooled)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn the Hugging Face model's gradient checkpointing on or off."""
        if not getattr(self.model, "supports_gradient_checkpointing", False):
            if enable:
                raise ValueError(f"{type(self.model).__name__} does not support grad checkpointing")
            return
        # transformers 5 renamed gradient_checkpointing_* (now deprecated) to activation_*.
        new_api = hasattr(self.model, "activation_checkpointing_enable")
        prefix = "activation" if new_api else "gradient"
        getattr(self.model, f"{prefix}_checkpointing_{'enable' if enable else 'disable'}")()

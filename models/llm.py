"""LLM backbone: any Hugging Face causal LM + its tokenizer, offline, with an image token."""

from __future__ import annotations

import logging
import os
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_outputs import CausalLMOutputWithPast

from mmpt.preflight import missing_weights_error

from .attention import BACKENDS, register_packed_attention
from .encoders.tokenizers import resolve_hf_path

log = logging.getLogger("mmpt.llm")

FLAG = "--model.init_args.llm.init_args"


class CausalLM(nn.Module):
    """A Hugging Face causal LM (Qwen2/2.5, Llama, Mistral ...) and its tokenizer, loaded offline.

    Built either from ``pretrained`` (a ``save_pretrained`` folder or a repo id already in the
    HF cache; ``local_files_only=True``) or from a ``config`` dict (random weights, for tests).
    When the tokenizer lacks ``image_token`` it is added as a special token, the input (and
    tied output) embeddings grow to fit it, and the change is logged.

    Attributes:
        model: The ``AutoModelForCausalLM`` instance.
        tokenizer: The matching ``AutoTokenizer`` (image token included).
        image_token: The image placeholder string, e.g. ``"<image>"``.
        image_token_id: Its id in ``tokenizer`` and in the embedding matrix.

    """

    #: Arguments holding local weights paths (checked by :mod:`mmpt.preflight` before building).
    weight_paths: ClassVar[tuple[str, ...]] = ("pretrained", "tokenizer")

    def __init__(
        self,
        pretrained: str | None = None,
        config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        repo_id: str | None = None,
        image_token: str = "<image>",
        attn_implementation: str = "packed",
        attn_backend: str = "auto",
        dtype: str | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        """Load (or build) the model and tokenizer.

        Args:
            pretrained: Local model folder or cached repo id; exclusive with ``config``.
            config: Dict with ``model_type`` plus config fields (``AutoConfig.for_model``),
                e.g. ``{"model_type": "qwen2", "vocab_size": 128, "hidden_size": 32, ...}``.
            tokenizer: Tokenizer folder or cached repo id; defaults to ``pretrained``.
                Required with ``config``.
            repo_id: The hub repo ``pretrained`` is a local copy of (``Qwen/Qwen2.5-1.5B``):
                only named in the error, as ``hf download REPO --local-dir PRETRAINED``.
            image_token: Placeholder string for one image in the text.
            attn_implementation: "packed" (mmpt's block-diagonal attention, see
                ``register_packed_attention``), or an HF name: "sdpa", "eager",
                "flash_attention_2".
            attn_backend: The kernel of the "packed" attention: "auto" (the fastest that runs
                on the device, ``mmpt.models.attention.AUTO_ORDER``), "xformers"
                (``BlockDiagonalCausalMask``), "flex" (FlexAttention, document ``BlockMask``)
                or "sdpa" (dense block-diagonal mask).
            dtype: Parameter dtype name ("bfloat16", "float32" ...); None keeps float32 for
                ``config`` and the checkpoint's dtype for ``pretrained``.
            gradient_checkpointing: Recompute decoder layer activations in backward.

        Raises:
            ValueError: Neither or both of ``pretrained`` / ``config``; ``config`` without
                ``tokenizer`` or ``model_type``; an unknown ``dtype`` or ``attn_backend``;
                an ``attn_backend`` other than auto with a non-packed attention.
            FileNotFoundError: Weights or tokenizer not found locally or in the HF cache.

        """
        super().__init__()
        if (pretrained is None) == (config is None):
            raise ValueError(
                f"give exactly one of {FLAG}.pretrained (a local HF folder or cached repo id) "
                f"or {FLAG}.config (a dict with model_type, for tiny test models)"
            )
        if attn_backend not in BACKENDS:
            raise ValueError(
                f"{FLAG}.attn_backend must be one of {', '.join(BACKENDS)}, got {attn_backend!r}"
            )
        if attn_implementation != "packed" and attn_backend != "auto":
            raise ValueError(
                f"{FLAG}.attn_backend: {attn_backend} needs {FLAG}.attn_implementation: packed "
                f"(got {attn_implementation!r}, which picks its own kernel)"
            )
        packed = attn_implementation == "packed"
        impl = register_packed_attention(backend=attn_backend) if packed else attn_implementation
        kwargs: dict[str, Any] = {"attn_implementation": impl}
        if dtype is not None:
            if dtype != "auto" and not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise ValueError(f"{FLAG}.dtype: unknown dtype {dtype!r} (e.g. bfloat16)")
            kwargs["dtype"] = dtype if dtype == "auto" else getattr(torch, dtype)
        if pretrained is not None:
            try:  # no folder, or one without config.json / weights
                pretrained = resolve_hf_path(pretrained, "config.json", f"{FLAG}.pretrained")
                if os.path.isdir(pretrained) and not os.path.isfile(f"{pretrained}/config.json"):
                    raise FileNotFoundError(f"{pretrained} has no config.json")
                self.model = AutoModelForCausalLM.from_pretrained(
                    pretrained, local_files_only=True, **kwargs
                ).train()  # as built from a config: from_pretrained's eval mode drops dropout
            except OSError as err:
                raise missing_weights_error(
                    "LLM weights", pretrained, repo_id, f"{FLAG}.pretrained"
                ) from err
        else:
            fields = dict(config)
            if "model_type" not in fields:
                raise ValueError(f"{FLAG}.config needs a model_type (e.g. qwen2, llama)")
            if tokenizer is None:
                raise ValueError(f"{FLAG}.config needs {FLAG}.tokenizer (a tokenizer folder)")
            cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
            self.model = AutoModelForCausalLM.from_config(cfg, **kwargs)
        tok_path = resolve_hf_path(
            tokenizer or pretrained, "tokenizer_config.json", f"{FLAG}.tokenizer"
        )
        self.tokenizer = AutoTokenizer.from_pretrained(tok_path, local_files_only=True)
        self.image_token = image_token
        self.image_token_id = self.add_token(image_token)
        if len(self.tokenizer) > self.vocab_size:
            log.warning(
                "tokenizer has %d tokens but the embeddings %d rows: resized to fit",
                len(self.tokenizer),
                self.vocab_size,
            )
            self.model.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        if gradient_checkpointing:
            self.model.config.use_cache = False
            new_api = hasattr(self.model, "activation_checkpointing_enable")
            prefix = "activation" if new_api else "gradient"
            getattr(self.model, f"{prefix}_checkpointing_enable")()

    def add_token(self, token: str) -> int:
        """Add a placeholder token (``<image>``, ``<audio>``) if missing; its id.

        A missing token is added as a special token, the embeddings grow to fit it and the
        change is logged as a warning.
        """
        if token in self.tokenizer.get_vocab():
            return int(self.tokenizer.convert_tokens_to_ids(token))
        old_vocab = len(self.tokenizer)
        self.tokenizer.add_special_tokens(
            {"extra_special_tokens": [token]}, replace_extra_special_tokens=False
        )
        new_vocab = len(self.tokenizer)
        token_id = int(self.tokenizer.convert_tokens_to_ids(token))
        rows = self.vocab_size
        if new_vocab > rows:
            self.model.resize_token_embeddings(new_vocab, mean_resizing=True)
            resized = f"input/output embeddings resized {rows} -> {self.vocab_size} rows"
        else:
            resized = f"the {rows}-row embedding matrix already has room, not resized"
        log.warning(
            "tokenizer had no token %r: added it as a special token (id %d), "
            "tokenizer vocab %d -> %d; %s",
            token,
            token_id,
            old_vocab,
            new_vocab,
            resized,
        )
        return token_id

    @property
    def hidden_size(self) -> int:
        """Width of the token embeddings and decoder hidden states."""
        return int(self.model.get_input_embeddings().embedding_dim)

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding matrix (= the logits' last dim)."""
        return int(self.model.get_input_embeddings().num_embeddings)

    @property
    def decoder_layers(self) -> nn.ModuleList:
        """The decoder's transformer blocks, for fusion modules and freezing."""
        layers = getattr(self.model.get_decoder(), "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise TypeError(f"no decoder `layers` ModuleList in {type(self.model).__name__}")
        return layers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Look up token embeddings.

        Args:
            input_ids: (B, T) long token ids.

        Returns:
            (B, T, hidden_size) embeddings from the model's input embedding layer.

        """
        return self.model.get_input_embeddings()(input_ids)

    def forward(
        self,
        inputs_embeds: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Run the LM on embeddings (image tokens spliced in) or on token ids.

        Args:
            inputs_embeds: (B, T, hidden_size) embeddings; exclusive with ``input_ids``.
            input_ids: (B, T) long token ids.
            position_ids: (B, T) positions; restarts at 0 mark packed samples.
            labels: (B, T) long targets, -100 ignored; HF shifts them by one internally.
            **kwargs: Forwarded to the HF model, e.g. ``hf_packing_kwargs(...)`` or
                ``attention_mask``.

        Returns:
            HF output with ``logits`` (B, T, vocab_size) and ``loss`` (scalar) when labels
            are given.

        """
        return self.model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            labels=labels,
            **kwargs,
        )

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        """Write model and tokenizer into one folder that ``CausalLM(pretrained=path)`` loads.

        Args:
            path: Output folder (created if missing).

        """
        self.model.save_pretrained(str(path))
        self.tokenizer.save_pretrained(str(path))


def splice_tokens(
    embeds: torch.Tensor, marks: torch.Tensor, tokens: list[torch.Tensor], what: str
) -> torch.Tensor:
    """Put media tokens at their placeholder positions.

    Args:
        embeds: (R, L, D) token embeddings.
        marks: Bool (R, L), True at the media's placeholder ids.
        tokens: One (K_i, D) tensor per image or clip, in row-major placeholder order.
        what: ``image`` or ``audio``, for the error.

    Returns:
        (R, L, D) embeddings with the tokens in place.

    Raises:
        ValueError: The placeholder count differs from the token count.
    """
    n_marks, n_tokens = int(marks.sum()), sum(t.shape[0] for t in tokens)
    if n_marks != n_tokens:
        raise ValueError(
            f"{n_marks} {what} tokens in the text but {n_tokens} {what} tokens from "
            f"{len(tokens)} {what} inputs: the data and the model disagree on token counts"
        )
    if not tokens:
        return embeds
    return embeds.masked_scatter(marks.unsqueeze(-1), torch.cat(tokens).to(embeds.dtype))


def shuffle_same_count(tokens: list[torch.Tensor]) -> list[torch.Tensor]:
    """Give every image (clip) the tokens of another with the same token count.

    Images are rolled by one inside each group of equal count; an image alone in its group
    keeps its own tokens.
    """
    by_count: dict[int, list[int]] = {}
    for i, t in enumerate(tokens):
        by_count.setdefault(t.shape[0], []).append(i)
    out = list(tokens)
    for idx in by_count.values():
        for src, dst in zip(idx[1:] + idx[:1], idx, strict=True):
            out[dst] = tokens[src]
    return out

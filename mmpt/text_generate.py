"""Batched text-only generation with a local Hugging Face causal LM through its chat template.

``mmpt data continue`` (BLSP step 1) drives it; nothing here runs remote code: the folder
loads with transformers' own classes (``trust_remote_code`` stays off), and the weights come
from the folder only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

#: Files that make a folder an mmpt VLM export (``mmpt export``): its LLM and tokenizer live in
#: subfolders (see :mod:`mmpt.models.vlm_export`).
_MMPT_EXPORT = "mmpt_vlm.json"


def resolve_chat_template(given: str | None, tokenizer: Any, folder: str) -> tuple[str, str]:
    """The Jinja chat template to render prompts with, and where it came from.

    Args:
        given: ``--chat-template``: a Jinja file, an mmpt data template name (``plain``,
            ``chatml``, ``llama3``, ``vicuna``) or None (the tokenizer's own).
        tokenizer: The LLM's tokenizer.
        folder: The LLM folder, named in the error.

    Returns:
        (Jinja source, its origin: ``tokenizer``, ``file:PATH`` or ``template:NAME``).

    Raises:
        ValueError: No template given and the tokenizer has none, or an unknown name.
    """
    if given is None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"--llm {folder}: the tokenizer has no chat template; give one with "
                "--chat-template FILE.jinja or --chat-template NAME (plain, chatml, llama3, vicuna)"
            )
        return tokenizer.chat_template, "tokenizer"
    if Path(given).is_file():
        return Path(given).read_text(encoding="utf-8"), f"file:{given}"
    from mmpt.datamodules.templates import TEMPLATES, get_template
    from mmpt.export.hf_processor import chat_template

    if given not in TEMPLATES:
        raise ValueError(
            f"--chat-template {given!r}: neither a file nor a template name "
            f"({', '.join(TEMPLATES)})"
        )
    return chat_template(get_template(given, "--chat-template")), f"template:{given}"


def _load_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer as saved: a generic ``tokenizers`` one stays generic.

    Next to a ``config.json``, ``AutoTokenizer`` picks the model type's tokenizer class
    (a Qwen2 LLM gets a byte-level decoder), even when ``tokenizer_config.json`` saved a plain
    ``tokenizers`` backend (a word-level vocabulary: words would decode without spaces).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config = folder / "tokenizer_config.json"
    saved = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    if saved in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)


class TextLLM:
    """A local causal LM + tokenizer that answers batches of user messages.

    Args:
        folder: A ``save_pretrained`` folder (config, weights, tokenizer), or an ``mmpt
            export`` folder (its ``llm/`` and ``tokenizer/`` are used).
        chat_template: See :func:`resolve_chat_template`.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        FileNotFoundError: The folder or its ``config.json`` is missing.
        ValueError: No chat template; a model class transformers does not ship.
    """

    def __init__(self, folder: str, chat_template: str | None = None, device: str = "auto"):
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        root = Path(folder)
        if not root.is_dir():
            raise FileNotFoundError(f"--llm: no folder at {folder!r}")
        model_dir, tok_dir = root, root
        if (root / _MMPT_EXPORT).is_file():
            meta = json.loads((root / _MMPT_EXPORT).read_text()).get("llm", {})
            model_dir = root / meta.get("folder", "llm")
            tok_dir = root / meta.get("tokenizer", "tokenizer")
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"--llm {folder}: no config.json; give a save_pretrained causal LM folder"
            )
        try:
            self.tokenizer = _load_tokenizer(tok_dir)
            self.model = AutoModelForCausalLM.from_pretrained(
                str(model_dir), trust_remote_code=False, attn_implementation="sdpa"
            )
        except (ValueError, KeyError, OSError) as e:
            raise ValueError(f"--llm {folder}: not a transformers causal LM folder ({e})") from e
        self.template, self.template_source = resolve_chat_template(
            chat_template, self.tokenizer, folder
        )
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = self.model.to(device).eval()
        self.folder = folder

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.model.get_input_embeddings().weight.device

    def render(self, message: str) -> str:
        """One user message -> the chat-formatted prompt text, assistant turn opened."""
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": message}],
            chat_template=self.template,
            add_generation_prompt=True,
            tokenize=False,
        )

    @torch.no_grad()
    def generate(
        self,
        messages: Sequence[str],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
    ) -> list[str]:
        """Answer B user messages in one left-padded ``generate`` call.

        Greedy when ``temperature`` is 0; sampling draws from torch's global RNG (seed it
        around the call for reproducible samples).

        Returns:
            B answers, special tokens dropped, surrounding whitespace stripped.
        """
        from transformers import GenerationConfig

        texts = [self.render(m) for m in messages]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(self.device)
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else 1.0,
            top_p=top_p,
            eos_token_id=eos,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        out = self.model.generate(**enc, generation_config=config)
        new = out[:, enc["input_ids"].shape[1] :]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


__all__ = ["TextLLM", "resolve_chat_template"]

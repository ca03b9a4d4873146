"""Picklable text tokenizers (open_clip BPE, Hugging Face) that build their internals lazily."""

from __future__ import annotations

import os
from typing import Any

import torch

OPENCLIP_VOCAB_SIZE = 49408


def resolve_hf_path(path: str, filename: str, flag: str) -> str:
    """Check that ``path`` is a local folder or a repo id already in the Hugging Face cache.

    Args:
        path: Local folder written by ``save_pretrained`` or a hub repo id (``org/name``).
        filename: A file a cached repo must hold (``config.json``, ``tokenizer_config.json``).
        flag: The command-line flag that sets ``path``, quoted in the error.

    Returns:
        ``path`` unchanged, once it is known to load with ``local_files_only=True``.

    Raises:
        FileNotFoundError: When neither a folder with ``filename`` nor a cached repo exists.

    """
    if os.path.isdir(path):
        return path
    if not os.path.exists(path) and path.count("/") <= 1 and not path.startswith((".", "~")):
        from huggingface_hub import try_to_load_from_cache

        try:
            if isinstance(try_to_load_from_cache(path, filename), str):
                return path
        except ValueError:  # not a valid repo id: fall through to the error below
            pass
    from huggingface_hub.constants import HF_HUB_CACHE

    from mmpt.preflight import download_command

    command = download_command(path, None)  # a local path is never a repo id
    how = (
        f"on a machine with internet run `{command}` (into the cache)"
        if command
        else f"put a copy of the model folder there (`hf download` with `--local-dir {path}`)"
    )
    raise FileNotFoundError(
        f"{path!r} is neither a local model folder nor a repo in the Hugging Face cache "
        f"({HF_HUB_CACHE}). Nothing is downloaded at run time: {how}, or set {flag} to a folder."
    )


class OpenCLIPTokenizer:
    """open_clip's byte-level BPE tokenizer (the vocabulary ships inside the open_clip package).

    The BPE tables are built on first call, so pickling (to every DataLoader worker) sends
    only ``context_length``.

    Attributes:
        context_length: Length L of every output row (open_clip pads with 0, ends with EOT).
        vocab_size: 49408 ids (byte BPE merges plus ``<start_of_text>``/``<end_of_text>``).

    """

    vocab_size: int = OPENCLIP_VOCAB_SIZE

    def __init__(self, context_length: int = 77) -> None:
        """Create the tokenizer.

        Args:
            context_length: Length L of every output row; longer texts are truncated (EOT kept).

        """
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (SOT + EOT), got {context_length}")
        self.context_length = context_length
        self._tok: Any = None

    def _build(self) -> Any:
        if self._tok is None:
            from open_clip.tokenizer import SimpleTokenizer

            self._tok = SimpleTokenizer(context_length=self.context_length)
        return self._tok

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """Tokenize a batch of strings.

        Args:
            texts: N strings.

        Returns:
            Long tensor (N, context_length): SOT, BPE ids, EOT, then 0 padding.

        """
        return self._build()(list(texts), context_length=self.context_length).long()

    def __getstate__(self) -> dict[str, Any]:
        return {"context_length": self.context_length}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.context_length = state["context_length"]
        self._tok = None

    def __repr__(self) -> str:
        return f"OpenCLIPTokenizer(context_length={self.context_length})"


class HFTokenizer:
    """A Hugging Face tokenizer loaded offline from a local folder (or the HF cache).

    Rows are padded to ``context_length`` (``padding="max_length"``) and truncated. The
    underlying ``AutoTokenizer`` is loaded on first use, so pickling sends only the path.

    Attributes:
        path: Folder written by ``save_pretrained`` or a repo id present in the HF cache.
        context_length: Length L of every output row.

    """

    def __init__(self, path: str, context_length: int = 77) -> None:
        """Create the tokenizer; the path is checked now, the files are read on first use.

        Args:
            path: Local tokenizer folder, or a repo id already in the Hugging Face cache.
            context_length: Length L of every output row.

        Raises:
            FileNotFoundError: When ``path`` is neither a folder nor a cached repo id.

        """
        self.path = resolve_hf_path(
            path, "tokenizer_config.json", "--model.init_args.text.init_args.path"
        )
        self.context_length = context_length
        self._tok: Any = None

    def _build(self) -> Any:
        if self._tok is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            if tok.pad_token_id is None:
                raise ValueError(
                    f"The tokenizer in {self.path!r} defines no pad token; set `pad_token` in its "
                    "tokenizer_config.json (padding to context_length needs one)."
                )
            self._tok = tok
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (``len(tokenizer)``)."""
        return len(self._build())

    @property
    def pad_token_id(self) -> int:
        """Id used for padding; a text tower masks positions holding it."""
        return int(self._build().pad_token_id)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """Tokenize a batch of strings.

        Args:
            texts: N strings.

        Returns:
            Long tensor (N, context_length), right-padded with ``pad_token_id``.

        """
        out = self._build()(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
        )
        return out["input_ids"].long()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "context_length": self.context_length}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self.context_length = state["context_length"]
        self._tok = None

    def __repr__(self) -> str:
        return f"HFTokenizer(path={self.path!r}, context_length={self.context_length})"

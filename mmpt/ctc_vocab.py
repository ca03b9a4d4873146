"""CTC output vocabularies: characters (``|`` between words) or a subword tokenizers file.

The character vocabulary is Hugging Face's ``Wav2Vec2CTCTokenizer`` layout: a ``vocab.json``
mapping token -> id with ``<pad>`` (id 0, also the CTC blank), ``<unk>`` (1), the word
delimiter ``|`` (2), then every character of the training transcripts in sorted order.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

PAD, UNK, DELIMITER = "<pad>", "<unk>", "|"
#: Label id of padding in a batch of targets (HF's ``labels`` convention).
IGNORE_ID = -100


class CTCVocab:
    """Token <-> id maps of a CTC head, with text encoding and CTC decoding. Picklable.

    Args:
        tokens: Token of each id; must hold ``<pad>`` (the blank) and ``<unk>``, and ``|``
            for a character vocabulary.
        lowercase: Lowercase transcripts before encoding (HF's ``do_lower_case``).
        tokenizer_file: A ``tokenizers`` JSON file (subword units): its ids are the labels and
            ``tokens`` must be its vocabulary in id order; None for characters.

    Raises:
        ValueError: Duplicate tokens, or ``<pad>``/``<unk>``/``|`` missing.
    """

    def __init__(
        self, tokens: Sequence[str], lowercase: bool = False, tokenizer_file: str | None = None
    ) -> None:
        self.tokens = list(tokens)
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("the CTC vocabulary holds a token twice")
        needed = (PAD, UNK) if tokenizer_file else (PAD, UNK, DELIMITER)
        missing = [t for t in needed if t not in self.tokens]
        if missing:
            raise ValueError(f"the CTC vocabulary lacks {missing} (build it with mmpt data vocab)")
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.lowercase, self.tokenizer_file = lowercase, tokenizer_file
        self.blank, self.unk = self.ids[PAD], self.ids[UNK]
        self._subword: Any = None

    def __len__(self) -> int:
        return len(self.tokens)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_subword": None}

    @property
    def subword(self) -> Any:
        """The ``tokenizers.Tokenizer`` of a subword vocabulary (loaded once), else None."""
        if self.tokenizer_file and self._subword is None:
            from tokenizers import Tokenizer

            self._subword = Tokenizer.from_file(self.tokenizer_file)
        return self._subword

    def normalize(self, text: str) -> str:
        """The transcript as the vocabulary sees it: stripped, single spaces, maybe lowercased."""
        text = " ".join(text.split())
        return text.lower() if self.lowercase else text

    def encode(self, text: str) -> tuple[list[int], int]:
        """Label ids of a transcript and how many of its units were out of vocabulary.

        Spaces become ``|``; a character (or subword) the vocabulary lacks becomes ``<unk>``
        and is counted, never an error.

        Returns:
            (ids, oov): the labels and the count mapped to ``<unk>``.
        """
        text = self.normalize(text)
        if self.subword is not None:
            ids = self.subword.encode(text, add_special_tokens=False).ids
            return ids, sum(i == self.unk for i in ids)
        ids = [self.ids.get(DELIMITER if c == " " else c, self.unk) for c in text]
        return ids, sum(i == self.unk for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of label ids (no CTC collapsing): ``|`` -> space, ``<pad>`` dropped."""
        ids = [int(i) for i in ids if int(i) != self.blank and int(i) >= 0]
        if self.subword is not None:
            return self.subword.decode(ids, skip_special_tokens=False).strip()
        text = "".join(" " if self.tokens[i] == DELIMITER else self.tokens[i] for i in ids)
        return " ".join(text.split())

    def greedy(self, logits: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        """Greedy CTC decoding: best id per frame, repeats merged, blanks dropped.

        Args:
            logits: (B, T, V) frame scores.
            lengths: Long tensor (B,), valid frames per row.

        Returns:
            B transcripts.
        """
        best = logits.argmax(dim=-1).cpu()
        out = []
        for row, n in zip(best, lengths.tolist(), strict=True):
            row = row[: int(n)]
            keep = torch.ones_like(row, dtype=torch.bool)
            keep[1:] = row[1:] != row[:-1]
            out.append(self.decode(row[keep].tolist()))
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description (stored in checkpoints' hyper-parameters)."""
        return {
            "tokens": self.tokens,
            "lowercase": self.lowercase,
            "tokenizer_file": self.tokenizer_file,
        }

    def save(self, path: str | Path) -> Path:
        """Write HF's ``vocab.json`` (token -> id) to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.ids, ensure_ascii=False, indent=1) + "\n", "utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path, lowercase: bool = False, flag: str = "model.vocab") -> CTCVocab:
        """Read a ``vocab.json`` (token -> id, ids 0..V-1) or a ``tokenizers`` file.

        Raises:
            FileNotFoundError: No file at ``path`` (names ``flag``).
            ValueError: Not a vocabulary, or ids with gaps.
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{flag}: no vocabulary at {str(path)!r}; build one with "
                "`mmpt data vocab --from SHARDS --out vocab.json`"
            )
        data = json.loads(Path(path).read_text("utf-8"))
        if isinstance(data, dict) and "model" in data and "vocab" in data.get("model", {}):
            from tokenizers import Tokenizer

            vocab = Tokenizer.from_file(str(path)).get_vocab()
            tokens = sorted(vocab, key=vocab.__getitem__)
            return cls(tokens, lowercase, tokenizer_file=str(Path(path).resolve()))
        if not isinstance(data, dict) or sorted(data.values()) != list(range(len(data))):
            raise ValueError(f"{flag}: {path} is not a vocab.json of token -> ids 0..V-1")
        return cls(sorted(data, key=data.__getitem__), lowercase)

    @classmethod
    def from_spec(cls, spec: str | dict[str, Any], lowercase: bool = False) -> CTCVocab:
        """A vocabulary from a file path or a :meth:`to_dict` description."""
        if isinstance(spec, dict):
            return cls(spec["tokens"], spec.get("lowercase", False), spec.get("tokenizer_file"))
        return cls.load(spec, lowercase)


class CTCTokenizer:
    """What a CTC datamodule needs from the model: the vocabulary and the frames of a clip.

    Passed as ``Preprocess.tokenizer``; calling it pads label rows with :data:`IGNORE_ID`.
    Picklable when ``frames`` is (e.g. a :class:`~mmpt.models.encoders.lengths.ConvLengths`).

    Args:
        vocab: The output vocabulary.
        frames: Clip length in samples -> encoder frames.
    """

    context_length = 0  # rows are as long as the longest target

    def __init__(self, vocab: CTCVocab, frames: Any) -> None:
        self.vocab, self.frames = vocab, frames

    @property
    def vocab_size(self) -> int:
        """Number of output ids V (blank included)."""
        return len(self.vocab)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """Label rows (N, L) of ``texts``, padded with :data:`IGNORE_ID`."""
        return pad_labels([self.vocab.encode(t)[0] for t in texts])


def pad_labels(rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """Long tensor (N, max length) of label rows, padded with :data:`IGNORE_ID`."""
    out = torch.full((len(rows), max((len(r) for r in rows), default=0)), IGNORE_ID)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
    return out


def build_char_vocab(
    transcripts: Iterable[str], lowercase: bool = False, min_count: int = 1
) -> tuple[CTCVocab, Counter]:
    """A character vocabulary of ``transcripts``.

    Args:
        transcripts: Training transcripts.
        lowercase: Lowercase first (the vocabulary then lowercases what it encodes).
        min_count: Characters seen fewer times are left out (they map to ``<unk>``).

    Returns:
        The vocabulary (``<pad>``, ``<unk>``, ``|``, sorted characters) and every character's
        count (space counted as ``|``).

    Raises:
        ValueError: No transcript holds a character.
    """
    probe = CTCVocab([PAD, UNK, DELIMITER], lowercase)
    counts: Counter = Counter()
    for text in transcripts:
        counts.update(DELIMITER if c == " " else c for c in probe.normalize(text))
    chars = sorted(c for c, n in counts.items() if n >= min_count and c != DELIMITER)
    if not chars:
        raise ValueError("no characters in the transcripts: check --text-key")
    return CTCVocab([PAD, UNK, DELIMITER, *chars], lowercase), counts


def frames_needed(ids: Sequence[int]) -> int:
    """Fewest CTC frames that can emit ``ids``: one per label plus a blank between repeats."""
    return len(ids) + sum(a == b for a, b in zip(ids, ids[1:], strict=False))


__all__ = [
    "DELIMITER",
    "IGNORE_ID",
    "PAD",
    "UNK",
    "CTCTokenizer",
    "CTCVocab",
    "pad_labels",
    "build_char_vocab",
    "frames_needed",
]

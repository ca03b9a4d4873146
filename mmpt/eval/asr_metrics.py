"""Word and character error rates with jiwer's definitions, text normalisation recorded.

WER = (S + D + I) / N over the whole set (N reference words), CER the same over characters
(spaces included), both computed by ``jiwer.process_words`` / ``jiwer.process_characters``
after a configurable :class:`TextNormalizer` (its settings go into every report).
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Columns of the per-utterance TSV.
TSV_COLUMNS = ("key", "reference", "hypothesis", "word_errors", "words", "wer", "char_errors",
               "chars", "cer")  # fmt: skip


@dataclass
class TextNormalizer:
    """Text normalisation applied to references and hypotheses before scoring.

    Attributes:
        lowercase: Lowercase everything.
        remove_punctuation: Drop punctuation (jiwer's ``RemovePunctuation``; with
            ``keep_apostrophes`` every character but letters, digits, spaces and ``'``).
        keep_apostrophes: Keep ``'`` (e.g. ``don't``) when removing punctuation.
        collapse_whitespace: Runs of whitespace -> one space, stripped at both ends.
    """

    lowercase: bool = True
    remove_punctuation: bool = True
    keep_apostrophes: bool = True
    collapse_whitespace: bool = True

    def __call__(self, text: str) -> str:
        """The normalised text."""
        import jiwer

        steps: list[Any] = []
        if self.lowercase:
            steps.append(jiwer.ToLowerCase())
        if self.remove_punctuation:
            if self.keep_apostrophes:  # like RemovePunctuation, sparing "'"
                steps.append(jiwer.SubstituteRegexes({r"[^\w\s']": ""}))
            else:
                steps.append(jiwer.RemovePunctuation())
        if self.collapse_whitespace:
            steps += [jiwer.RemoveMultipleSpaces(), jiwer.Strip()]
        return jiwer.Compose(steps)(text) if steps else text

    def describe(self) -> dict[str, bool]:
        """The settings, as recorded in reports."""
        return dataclasses.asdict(self)


def _utterance_errors(alignment: Sequence[Any]) -> int:
    """S + D + I of one jiwer alignment."""
    errors = 0
    for chunk in alignment:
        if chunk.type in ("substitute", "delete"):
            errors += chunk.ref_end_idx - chunk.ref_start_idx
        elif chunk.type == "insert":
            errors += chunk.hyp_end_idx - chunk.hyp_start_idx
    return errors


def _normalized(
    refs: Sequence[str], hyps: Sequence[str], normalizer: TextNormalizer, keys: Sequence[str] | None
) -> tuple[list[str], list[str]]:
    """Normalised pairs; an empty reference is refused with its utterance named."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if not refs:
        raise ValueError("no utterances to score")
    norm_refs = [normalizer(r) for r in refs]
    norm_hyps = [normalizer(h or "") for h in hyps]
    empty = [i for i, r in enumerate(norm_refs) if not r]
    if empty:
        names = [keys[i] if keys else f"#{i}" for i in empty[:5]]
        raise ValueError(
            f"{len(empty)} empty reference transcript(s) after normalisation ({names}): WER is "
            "undefined for them; drop those utterances from the evaluation set"
        )
    return norm_refs, norm_hyps


def wer_cer(
    refs: Sequence[str],
    hyps: Sequence[str],
    normalizer: TextNormalizer | None = None,
    keys: Sequence[str] | None = None,
) -> dict[str, Any]:
    """WER and CER of a set of utterances (jiwer), with per-utterance rows.

    Args:
        refs: Reference transcripts (none may be empty after normalisation).
        hyps: Hypotheses (empty ones count every reference word as deleted).
        normalizer: Applied to both sides first; default :class:`TextNormalizer`.
        keys: Utterance ids for the rows and errors; default ``#i``.

    Returns:
        ``wer``, ``cer``, the counts (``substitutions``, ``deletions``, ``insertions``,
        ``words``; ``char_*``, ``chars``), ``utterances``, ``normalizer`` (its settings) and
        ``rows`` (one dict per utterance, :data:`TSV_COLUMNS`).

    Raises:
        ValueError: Lengths differ, no utterances, or an empty reference.
    """
    import jiwer

    normalizer = normalizer or TextNormalizer()
    norm_refs, norm_hyps = _normalized(refs, hyps, normalizer, keys)
    words = jiwer.process_words(norm_refs, norm_hyps)
    chars = jiwer.process_characters(norm_refs, norm_hyps)
    rows = []
    for i, (ref, hyp) in enumerate(zip(norm_refs, norm_hyps, strict=True)):
        w_err = _utterance_errors(words.alignments[i])
        c_err = _utterance_errors(chars.alignments[i])
        n_words, n_chars = len(words.references[i]), len(chars.references[i])
        rows.append({
            "key": keys[i] if keys else f"#{i}", "reference": ref, "hypothesis": hyp,
            "word_errors": w_err, "words": n_words, "wer": w_err / n_words,
            "char_errors": c_err, "chars": n_chars, "cer": c_err / n_chars,
        })  # fmt: skip
    n_words = words.hits + words.substitutions + words.deletions
    n_chars = chars.hits + chars.substitutions + chars.deletions
    return {
        "wer": words.wer,
        "cer": chars.cer,
        "substitutions": words.substitutions,
        "deletions": words.deletions,
        "insertions": words.insertions,
        "words": n_words,
        "char_substitutions": chars.substitutions,
        "char_deletions": chars.deletions,
        "char_insertions": chars.insertions,
        "chars": n_chars,
        "utterances": len(rows),
        "normalizer": normalizer.describe(),
        "rows": rows,
    }


class ErrorTally:
    """Running word and character error counts (validation WER/CER summed over batches).

    Args:
        normalizer: Applied before scoring.
    """

    def __init__(self, normalizer: TextNormalizer) -> None:
        self.normalizer = normalizer
        self.word_errors = self.words = self.char_errors = self.chars = 0

    def add(self, refs: Sequence[str], hyps: Sequence[str]) -> None:
        """Score a batch; references empty after normalisation are left out."""
        pairs = [(r, h) for r, h in zip(refs, hyps, strict=True) if self.normalizer(r)]
        if not pairs:
            return
        out = wer_cer([r for r, _ in pairs], [h for _, h in pairs], self.normalizer)
        self.word_errors += out["substitutions"] + out["deletions"] + out["insertions"]
        self.char_errors += (
            out["char_substitutions"] + out["char_deletions"] + out["char_insertions"]
        )
        self.words += out["words"]
        self.chars += out["chars"]

    def counts(self) -> list[int]:
        """``[word_errors, words, char_errors, chars]``."""
        return [self.word_errors, self.words, self.char_errors, self.chars]


def write_tsv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write the per-utterance rows of :func:`wer_cer` as a TSV with a header line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, TSV_COLUMNS, delimiter="\t", extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in row.items()})
    return path


__all__ = ["TSV_COLUMNS", "ErrorTally", "TextNormalizer", "wer_cer", "write_tsv"]

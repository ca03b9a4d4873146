"""Multiple-choice metrics (MMBench/SEED/ScienceQA/MMMU style): answer extraction, circular eval.

A model answers a question with options ``{"A": text, "B": text, ...}`` either by
generating text, from which :func:`extract_choice` reads a letter, or by option likelihood,
from which :func:`choice_from_scores` picks the best-scored letter. MMBench's circular
evaluation asks each question once per rotation of its option texts (:func:`rotations`) and
counts it right only if every rotation is right (:func:`circular_accuracy`); VLMEvalKit
groups the rotated copies by ``index mod 1e6`` -- here they share a question id.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Iterable, Mapping, Sequence

_PUNCT_TABLE = str.maketrans({c: " " for c in string.punctuation})
_WHOLE = re.compile(r"^\s*[(\[]?\s*([A-Z])\s*[)\].:]?\s*$")
_CUE = re.compile(
    r"(?i:answer|option|choice)\s*(?i:is|would be|:|-)?\s*:?\s*[(\[]?([A-Z])(?![A-Za-z])"
)
_LEADING = re.compile(r"^\s*[(\[]?([A-Z])\s*[)\].:](?:\s|$)")


def check_choice(options: Mapping[str, str], answer: str | None = None) -> None:
    """Reject a malformed multiple-choice question, before any generation.

    Args:
        options: ``{letter: option text}``, letters ``A``, ``B``, ... .
        answer: the right letter, when known.

    Raises:
        ValueError: fewer than 2 options, a key that is not one capital letter, an empty
            option text, or an answer that is not one of the options.
    """
    if len(options) < 2:
        raise ValueError(f"a multiple-choice question needs >= 2 options, got {dict(options)}")
    bad = [k for k in options if not (len(k) == 1 and k in string.ascii_uppercase)]
    if bad:
        raise ValueError(f"option keys must be single capital letters A, B, ...; got {bad}")
    empty = [k for k, v in options.items() if not str(v).strip()]
    if empty:
        raise ValueError(f"options {empty} have no text; drop them or fill them in")
    if answer is not None and answer not in options:
        raise ValueError(f"answer {answer!r} is not one of the options {sorted(options)}")


def _words(text: str) -> str:
    return " ".join(text.lower().translate(_PUNCT_TABLE).split())


def extract_choice(text: str, options: Mapping[str, str]) -> str | None:
    """Read the chosen option letter from a generated answer.

    Tried in order: the whole answer is a letter (``"B"``, ``"(B)"``, ``"B."``); a cue
    (``"Answer: B"``, ``"The answer is (B)"``, ``"option B"``); a leading letter with a
    delimiter (``"B. a red circle"``, ``"(B) red"``; a bare ``"A red circle"`` is not read as
    A); the answer equals one option's text; exactly one option's text occurs in the answer
    (options contained in another matching option are ignored).

    Args:
        text: the generated answer.
        options: ``{letter: option text}``.

    Returns:
        The letter, or ``None`` when no rule gives one of the option letters.
    """
    for pattern in (_WHOLE, _LEADING):
        m = pattern.match(text)
        if m and m.group(1) in options:
            return m.group(1)
    for m in _CUE.finditer(text):
        letter = m.group(1)
        if letter in options:
            return letter
    said = _words(text)
    if not said:
        return None
    texts = {k: _words(str(v)) for k, v in options.items()}
    equal = [k for k, v in texts.items() if v and v == said]
    if len(equal) == 1:
        return equal[0]
    padded = f" {said} "
    found = [k for k, v in texts.items() if v and f" {v} " in padded]
    found = [k for k in found if not any(o != k and texts[k] in texts[o] for o in found)]
    return found[0] if len(found) == 1 else None


def choice_from_scores(scores: Mapping[str, float]) -> str | None:
    """The option with the strictly highest score (e.g. option log-likelihood).

    Args:
        scores: ``{letter: score}``.

    Returns:
        The best letter; ``None`` (a miss) on a tie for the best or a NaN score, as mmpt's
        other multiple-choice metrics count ties.
    """
    if not scores or any(math.isnan(s) for s in scores.values()):
        return None
    best = max(scores.values())
    top = [k for k, s in scores.items() if s == best]
    return top[0] if len(top) == 1 else None


def rotations(options: Mapping[str, str], answer: str) -> list[tuple[dict[str, str], str]]:
    """MMBench circular evaluation: the N rotations of the option texts.

    Rotation ``r`` keeps the letters in order and shifts the texts by ``r`` places, so the
    text of letter ``L_i`` is the original text of ``L_{(i + r) mod N}``; rotation 0 is the
    original question. The answer letter moves with its text.

    Args:
        options: ``{letter: text}`` in display order.
        answer: the right letter.

    Returns:
        N ``(options, answer)`` pairs.

    Raises:
        ValueError: a malformed question (see :func:`check_choice`).
    """
    check_choice(options, answer)
    letters = list(options)
    texts = [options[k] for k in letters]
    n = len(letters)
    right = letters.index(answer)
    return [
        ({letters[i]: texts[(i + r) % n] for i in range(n)}, letters[(right - r) % n])
        for r in range(n)
    ]


def mmbench_group(item_id: str) -> str:
    """The question an MMBench row belongs to: its ``index`` mod 1e6 (VLMEvalKit's ``g_index``).

    MMBench's circular TSVs hold each rotated copy as a row whose index is the original's
    plus a multiple of 1,000,000; other ids are their own group.

    Args:
        item_id: A row id (``index``).

    Returns:
        The group id, as a string.
    """
    text = str(item_id).strip()
    return str(int(text) % 1_000_000) if text.isdigit() else text


def circular_accuracy(results: Mapping[str, Sequence[bool]] | Iterable[tuple[str, bool]]) -> float:
    """The share of questions answered right under every rotation.

    Args:
        results: ``{question id: [correct under rotation 0, 1, ...]}``, or
            ``(question id, correct)`` pairs, one per rotated copy.

    Returns:
        The fraction of questions whose copies are all correct.

    Raises:
        ValueError: no results, or a question with no copies.
    """
    groups: dict[str, list[bool]] = {}
    items = results.items() if isinstance(results, Mapping) else None
    if items is not None:
        for qid, flags in items:
            groups[qid] = [bool(f) for f in flags]
    else:
        for qid, flag in results:
            groups.setdefault(qid, []).append(bool(flag))
    if not groups:
        raise ValueError("no multiple-choice results to score")
    empty = [k for k, v in groups.items() if not v]
    if empty:
        raise ValueError(f"questions {empty[:5]} have no answered rotation")
    return sum(all(v) for v in groups.values()) / len(groups)


def choice_scores(
    predictions: Mapping[str, str | None],
    answers: Mapping[str, str],
    groups: Mapping[str, str] | None = None,
    categories: Mapping[str, str | None] | None = None,
) -> dict[str, float | int | dict[str, float]]:
    """Score multiple-choice predictions (letters), with circular accuracy when grouped.

    Args:
        predictions: ``{item id: predicted letter or None}`` (``None``: nothing could be
            extracted, counted as wrong and in ``"unanswered"``).
        answers: ``{item id: right letter}``.
        groups: ``{item id: question id}`` for rotated copies (circular evaluation).
        categories: ``{item id: category}`` for a per-category breakdown.

    Returns:
        ``"accuracy"`` (over items), ``"count"``, ``"unanswered"``; with ``groups``,
        ``"circular_accuracy"`` (over questions) and ``"questions"``; with categories,
        ``"per_category": {category: accuracy}`` (circular when grouped).

    Raises:
        ValueError: no predictions or an item without an answer.
    """
    if not predictions:
        raise ValueError("no multiple-choice predictions to score")
    missing = [k for k in predictions if not answers.get(k)]
    if missing:
        raise ValueError(f"{len(missing)} items have no answer letter (first: {missing[:5]})")
    correct = {k: p is not None and p == answers[k] for k, p in predictions.items()}
    out: dict[str, float | int | dict[str, float]] = {
        "accuracy": sum(correct.values()) / len(correct),
        "count": len(correct),
        "unanswered": sum(p is None for p in predictions.values()),
    }
    keyed = {k: (groups or {}).get(k, k) for k in correct}
    if groups is not None:
        out["circular_accuracy"] = circular_accuracy((keyed[k], c) for k, c in correct.items())
        out["questions"] = len(set(keyed.values()))
    if categories:
        per: dict[str, list[tuple[str, bool]]] = {}
        for k, c in correct.items():
            cat = categories.get(k)
            if cat:
                per.setdefault(cat, []).append((keyed[k], c))
        out["per_category"] = {cat: circular_accuracy(v) for cat, v in sorted(per.items())}
    return out

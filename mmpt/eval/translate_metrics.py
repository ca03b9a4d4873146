"""Translation metrics from sacrebleu: corpus BLEU and chrF, per-sentence scores, signatures.

Scores are sacrebleu's own (its default tokenisation for the target language, ``13a`` for
most, ``zh`` for Chinese ...), so they compare with published numbers; the signature string
that names the settings goes into every report.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _check(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    if not references:
        raise ValueError("no sentence to score: the set is empty")


def corpus_scores(
    hypotheses: Sequence[str],
    references: Sequence[str],
    target_lang: str = "",
    tokenize: str | None = None,
) -> dict[str, Any]:
    """Corpus BLEU and chrF of one reference per sentence.

    Args:
        hypotheses: N system outputs.
        references: N references (one each).
        target_lang: Target language code; picks sacrebleu's tokeniser when ``tokenize`` is None.
        tokenize: sacrebleu tokeniser name (``13a``, ``intl``, ``zh``, ``char`` ...).

    Returns:
        ``bleu``, ``chrf`` (0-100), ``bleu_precisions`` (1-4-gram %), ``brevity_penalty``,
        ``sys_len``, ``ref_len``, ``bleu_signature``, ``chrf_signature``.

    Raises:
        ValueError: Lengths differ, or no sentence.
    """
    from sacrebleu.metrics import BLEU, CHRF

    _check(hypotheses, references)
    bleu = BLEU(trg_lang=target_lang, tokenize=tokenize)
    chrf = CHRF()
    b = bleu.corpus_score(list(hypotheses), [list(references)])
    c = chrf.corpus_score(list(hypotheses), [list(references)])
    return {
        "bleu": b.score,
        "chrf": c.score,
        "bleu_precisions": list(b.precisions),
        "brevity_penalty": b.bp,
        "sys_len": b.sys_len,
        "ref_len": b.ref_len,
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


def sentence_scores(
    hypotheses: Sequence[str],
    references: Sequence[str],
    target_lang: str = "",
    tokenize: str | None = None,
) -> list[dict[str, float]]:
    """Per-sentence BLEU (effective n-gram order, as sacrebleu's sentence BLEU) and chrF.

    Returns:
        N dicts with ``bleu`` and ``chrf`` (0-100).
    """
    from sacrebleu.metrics import BLEU, CHRF

    _check(hypotheses, references)
    bleu = BLEU(trg_lang=target_lang, tokenize=tokenize, effective_order=True)
    chrf = CHRF()
    return [
        {"bleu": bleu.sentence_score(h, [r]).score, "chrf": chrf.sentence_score(h, [r]).score}
        for h, r in zip(hypotheses, references, strict=True)
    ]


__all__ = ["corpus_scores", "sentence_scores"]

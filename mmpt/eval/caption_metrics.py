"""Captioning metrics with the COCO caption toolkit: CIDEr-D, BLEU-4, ROUGE-L (+ METEOR).

The scorers are pycocoevalcap's own (``Bleu(4)``, ``Cider`` -- which is CIDEr-D: clipped
n-gram counts, a Gaussian length penalty, sigma 6, x10 -- and ``Rouge``), run on captions
tokenised as the toolkit does (:func:`mmpt.eval.ptb_tokenize.ptb_tokenize`). CIDEr's
document frequencies come from the references of the images scored, so scores depend on
the whole set, as in the toolkit. METEOR needs Java (pycocoevalcap ships its jar and
paraphrase table); SPICE needs Java *and* the Stanford CoreNLP 3.6.0 models, which
pycocoevalcap downloads on first use, so offline it is reported in :func:`absent_metrics`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from mmpt.eval.ptb_tokenize import java_available, ptb_tokenize, require_pycocoevalcap

Bleu = require_pycocoevalcap("pycocoevalcap.bleu.bleu").Bleu
Cider = require_pycocoevalcap("pycocoevalcap.cider.cider").Cider
Rouge = require_pycocoevalcap("pycocoevalcap.rouge.rouge").Rouge

CAPTION_METRICS: tuple[str, ...] = ("CIDEr", "BLEU-4", "ROUGE-L", "METEOR", "SPICE")
"""Every caption metric :func:`caption_scores` may report, in report order."""


def _spice_models_present() -> bool:
    from pycocoevalcap import spice

    lib = Path(spice.__file__).with_name("lib")
    return any(lib.glob("stanford-corenlp-3.6.0*.jar"))


def absent_metrics(meteor: bool | None = None) -> dict[str, str]:
    """The caption metrics that :func:`caption_scores` cannot report here, with the reason.

    Args:
        meteor: as in :func:`caption_scores` (``None``: when Java is present).

    Returns:
        ``{metric: reason}`` for METEOR and SPICE when they are not computed.
    """
    out: dict[str, str] = {}
    java = java_available()
    if meteor is None:
        meteor = java
    if not meteor:
        out["METEOR"] = "java is not on the PATH" if not java else "not requested"
    if not java:
        out["SPICE"] = "java is not on the PATH"
    elif not _spice_models_present():
        out["SPICE"] = (
            "needs the Stanford CoreNLP 3.6.0 models in pycocoevalcap/spice/lib, which "
            "pycocoevalcap downloads on first use (no download here)"
        )
    return out


def check_caption_inputs(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> None:
    """Reject a caption set that cannot be scored, before any generation.

    Args:
        predictions: ``{id: caption}`` (may be empty strings), or any mapping with the ids
            to score (e.g. ``{id: ""}`` to check a set before generating).
        references: ``{id: [reference, ...]}``.

    Raises:
        ValueError: no ids, or an id without a non-empty reference caption.
    """
    if not predictions:
        raise ValueError("no captions to score: the prediction set is empty")
    missing = [k for k in predictions if not any(str(r).strip() for r in references.get(k, ()))]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(predictions)} images have no reference caption "
            f"(first: {missing[:5]}): every scored image needs at least one reference; "
            "rebuild the set with its captions or drop those images"
        )


def caption_scores(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    *,
    tokenizer: str = "auto",
    meteor: bool | None = None,
) -> dict[str, float]:
    """Score generated captions against all reference captions of each image.

    Args:
        predictions: ``{image id: generated caption}``; an empty caption is scored (zero
            for most metrics), the caller counts it.
        references: ``{image id: [reference caption, ...]}``; ids without a prediction are
            ignored.
        tokenizer: ``"auto"`` (pycocoevalcap's Java PTBTokenizer when ``java`` is on the
            PATH, else the Python port), ``"java"`` or ``"python"``.
        meteor: compute METEOR (pycocoevalcap's Java scorer, ~15 s to start); ``None``:
            when Java is present.

    Returns:
        ``{"CIDEr", "BLEU-4", "ROUGE-L"}`` (plus ``"METEOR"``, and ``"SPICE"`` when its
        models are installed), each the toolkit's corpus score as a float (CIDEr-D is on
        the toolkit's scale, often above 1). :func:`absent_metrics` names the rest.

    Raises:
        ValueError: an empty prediction set or an image without references.
    """
    check_caption_inputs(predictions, references)
    ids = list(predictions)
    refs = [[str(r) for r in references[k] if str(r).strip()] for k in ids]
    flat = [str(predictions[k]) for k in ids] + [r for rs in refs for r in rs]
    tokens = ptb_tokenize(flat, backend=tokenizer)
    res = {k: [tokens[i]] for i, k in enumerate(ids)}
    gts: dict[str, list[str]] = {}
    pos = len(ids)
    for k, rs in zip(ids, refs, strict=True):
        gts[k] = tokens[pos : pos + len(rs)]
        pos += len(rs)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    out = {"CIDEr": float(cider), "BLEU-4": float(bleu[3]), "ROUGE-L": float(rouge)}
    if meteor is None:
        meteor = java_available()
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            out["METEOR"] = float(scorer.compute_score(gts, res)[0])
        finally:
            del scorer  # its __del__ stops the Java process
    if java_available() and _spice_models_present():
        from pycocoevalcap.spice.spice import Spice

        out["SPICE"] = float(Spice().compute_score(gts, res)[0])
    return out

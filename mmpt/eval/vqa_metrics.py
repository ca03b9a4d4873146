"""VQA metrics: the VQAv2 accuracy with the official answer normalisation, exact match, relaxed.

:func:`vqa_accuracy` follows the official evaluation script (GT-Vision-Lab/VQA,
``PythonEvaluationTools/vqaEvaluation/vqaEval.py``) rule for rule, quirks included:

1. The prediction: newlines and tabs -> spaces, stripped, then punctuation
   (:func:`process_punctuation`), then digits/articles/contractions
   (:func:`process_digit_article`); together :func:`normalize_answer`.
2. The human answers get *only* the punctuation step, and only when they are not all
   identical (the official annotations are already lowercased and normalised; pass
   ``normalize_answers=True`` for other sets).
3. Accuracy = the mean over the humans of ``min(1, #other humans matching / 3)`` -- the
   average of ``min(#matches / 3, 1)`` over the 10 leave-one-out subsets of 9 answers.
   With a single answer this is 0 whatever the prediction: use :func:`exact_match` there.

:func:`relaxed_accuracy` is ChartQA's: numbers within 5% of the target (a trailing ``%``
divides by 100; a target of 0 needs an exact string match), other answers compared
case-insensitively.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

# The official script's contraction table (missing apostrophes -> the contraction), as
# "key=value" pairs.
# fmt: off
_CONTRACTION_PAIRS = (
    "aint=ain't", "arent=aren't", "cant=can't", "couldve=could've", "couldnt=couldn't",
    "couldn'tve=couldn't've", "couldnt've=couldn't've", "didnt=didn't", "doesnt=doesn't",
    "dont=don't", "hadnt=hadn't", "hadnt've=hadn't've", "hadn'tve=hadn't've", "hasnt=hasn't",
    "havent=haven't", "hed=he'd", "hed've=he'd've", "he'dve=he'd've", "hes=he's", "howd=how'd",
    "howll=how'll", "hows=how's", "Id've=I'd've", "I'dve=I'd've", "Im=I'm", "Ive=I've",
    "isnt=isn't", "itd=it'd", "itd've=it'd've", "it'dve=it'd've", "itll=it'll", "let's=let's",
    "maam=ma'am", "mightnt=mightn't", "mightnt've=mightn't've", "mightn'tve=mightn't've",
    "mightve=might've", "mustnt=mustn't", "mustve=must've", "neednt=needn't", "notve=not've",
    "oclock=o'clock", "oughtnt=oughtn't", "ow's'at='ow's'at", "'ows'at='ow's'at",
    "'ow'sat='ow's'at", "shant=shan't", "shed've=she'd've", "she'dve=she'd've", "she's=she's",
    "shouldve=should've", "shouldnt=shouldn't", "shouldnt've=shouldn't've",
    "shouldn'tve=shouldn't've", "somebody'd=somebodyd", "somebodyd've=somebody'd've",
    "somebody'dve=somebody'd've", "somebodyll=somebody'll", "somebodys=somebody's",
    "someoned=someone'd", "someoned've=someone'd've", "someone'dve=someone'd've",
    "someonell=someone'll", "someones=someone's", "somethingd=something'd",
    "somethingd've=something'd've", "something'dve=something'd've", "somethingll=something'll",
    "thats=that's", "thered=there'd", "thered've=there'd've", "there'dve=there'd've",
    "therere=there're", "theres=there's", "theyd=they'd", "theyd've=they'd've",
    "they'dve=they'd've", "theyll=they'll", "theyre=they're", "theyve=they've", "twas='twas",
    "wasnt=wasn't", "wed've=we'd've", "we'dve=we'd've", "weve=we've", "werent=weren't",
    "whatll=what'll", "whatre=what're", "whats=what's", "whatve=what've", "whens=when's",
    "whered=where'd", "wheres=where's", "whereve=where've", "whod=who'd", "whod've=who'd've",
    "who'dve=who'd've", "wholl=who'll", "whos=who's", "whove=who've", "whyll=why'll",
    "whyre=why're", "whys=why's", "wont=won't", "wouldve=would've", "wouldnt=wouldn't",
    "wouldnt've=wouldn't've", "wouldn'tve=wouldn't've", "yall=y'all", "yall'll=y'all'll",
    "y'allll=y'all'll", "yall'd've=y'all'd've", "y'alld've=y'all'd've", "y'all'dve=y'all'd've",
    "youd=you'd", "youd've=you'd've", "you'dve=you'd've", "youll=you'll", "youre=you're",
    "youve=you've",
)
# fmt: on
_CONTRACTIONS: dict[str, str] = dict(p.split("=") for p in _CONTRACTION_PAIRS)
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<")
_PUNCT += ("@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The official pattern starts with "(?!<=\d)", a mistyped look-behind that never blocks: any
# period not followed by a digit goes. Its sub() passes re.UNICODE (32) as the count.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_MAX = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    r"""The official punctuation step.

    Each mark in ``; / [ ] " { } ( ) = + \ _ - > < @ ` , ? !`` is deleted when the
    *original* text has it next to a space or contains a digit-comma-digit, else replaced by
    a space; then up to 32 periods not followed by a digit are deleted.

    Args:
        text: an answer.

    Returns:
        The answer with punctuation handled (case and spacing untouched).
    """
    out = text
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in _PUNCT:
        if p + " " in text or " " + p in text or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_MAX)


def process_digit_article(text: str) -> str:
    """The official word step: lowercase, number words -> digits, drop articles, contractions.

    Args:
        text: an answer after :func:`process_punctuation`.

    Returns:
        The words joined by single spaces.
    """
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """Normalise a predicted answer exactly as the official VQA evaluation does.

    Args:
        text: the model's answer.

    Returns:
        The normalised answer, e.g. ``"Two dogs."`` -> ``"2 dogs"``.
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def _check_answers(answers: Sequence[str]) -> None:
    if isinstance(answers, str) or not answers:
        raise ValueError(
            f"VQA answers must be a non-empty list of strings, got {answers!r}: every "
            "question needs its human answers"
        )


def vqa_accuracy(
    prediction: str, answers: Sequence[str], *, normalize_answers: bool = False
) -> float:
    """The VQAv2 accuracy of one prediction against the human answers (official rules).

    Args:
        prediction: the model's answer (raw; normalised here).
        answers: the human answers (10 in VQAv2).
        normalize_answers: also apply :func:`normalize_answer` to the human answers (for
            sets whose answers are not already normalised); ``False`` is the official rule.

    Returns:
        The mean over humans of ``min(1, #other humans matching / 3)``, in [0, 1].

    Raises:
        ValueError: no answers.
    """
    _check_answers(answers)
    pred = normalize_answer(prediction)
    if normalize_answers:
        gts = [normalize_answer(a) for a in answers]
    elif len(set(answers)) > 1:
        gts = [process_punctuation(a) for a in answers]
    else:
        gts = list(answers)
    hits = [g == pred for g in gts]
    total = sum(hits)
    return sum(min(1.0, (total - h) / 3) for h in hits) / len(gts)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised answer, else 0.0.

    Args:
        prediction: the model's answer.
        answers: the accepted answers (one or more).

    Returns:
        1.0 or 0.0 (both sides through :func:`normalize_answer`).
    """
    _check_answers(answers)
    pred = normalize_answer(prediction)
    return float(any(normalize_answer(a) == pred for a in answers))


def _to_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, answers: Sequence[str], *, tolerance: float = 0.05) -> float:
    """ChartQA's relaxed accuracy: the best over answers of a 5%-tolerant numeric match.

    Args:
        prediction: the model's answer.
        answers: the accepted answers.
        tolerance: the largest relative error accepted for numbers.

    Returns:
        1.0 when, for some answer, both parse as numbers and ``|pred - target| / |target|
        <= tolerance`` (target non-zero), or the stripped, lowercased strings are equal.
    """
    _check_answers(answers)
    pred = prediction.strip()
    pred_f = _to_float(pred)
    for answer in answers:
        target = answer.strip()
        target_f = _to_float(target)
        if pred_f is not None and target_f:
            if abs(pred_f - target_f) / abs(target_f) <= tolerance:
                return 1.0
        elif pred.lower() == target.lower():
            return 1.0
    return 0.0


def vqa_scores(
    predictions: Mapping[str, str],
    answers: Mapping[str, Sequence[str]],
    answer_types: Mapping[str, str | None] | None = None,
    *,
    normalize_answers: bool = False,
) -> dict[str, float | int | dict[str, float]]:
    """Score a VQA set: VQAv2 accuracy, exact match and relaxed accuracy, per answer type.

    Args:
        predictions: ``{question id: predicted answer}``.
        answers: ``{question id: [human answer, ...]}``; ids without a prediction are ignored.
        answer_types: optional ``{question id: "yes/no" | "number" | "other" | None}``.
        normalize_answers: passed to :func:`vqa_accuracy`.

    Returns:
        ``{"vqa_accuracy", "exact_match", "relaxed_accuracy"}`` as fractions in [0, 1] (the
        official script prints 100x, rounded to 2 places), ``"count"``, and
        ``"per_answer_type": {type: vqa_accuracy}`` when types are given.

    Raises:
        ValueError: no predictions, or a question without answers.
    """
    check_vqa_inputs(predictions, answers)
    acc, em, rel = [], [], []
    by_type: dict[str, list[float]] = {}
    for qid, pred in predictions.items():
        gts = answers[qid]
        a = vqa_accuracy(pred, gts, normalize_answers=normalize_answers)
        acc.append(a)
        em.append(exact_match(pred, gts))
        rel.append(relaxed_accuracy(pred, gts))
        kind = (answer_types or {}).get(qid)
        if kind:
            by_type.setdefault(kind, []).append(a)
    n = len(acc)
    out: dict[str, float | int | dict[str, float]] = {
        "vqa_accuracy": sum(acc) / n,
        "exact_match": sum(em) / n,
        "relaxed_accuracy": sum(rel) / n,
        "count": n,
    }
    if by_type:
        out["per_answer_type"] = {k: sum(v) / len(v) for k, v in sorted(by_type.items())}
    return out


def check_vqa_inputs(
    predictions: Mapping[str, object], answers: Mapping[str, Sequence[str]]
) -> None:
    """Reject a VQA set that cannot be scored, before any generation.

    Args:
        predictions: any mapping whose keys are the question ids to score.
        answers: ``{question id: [answer, ...]}``.

    Raises:
        ValueError: no ids, or an id without answers.
    """
    if not predictions:
        raise ValueError("no questions to score: the prediction set is empty")
    missing = [k for k in predictions if not answers.get(k)]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(predictions)} questions have no answers (first: "
            f"{missing[:5]}): every scored question needs its human answers"
        )

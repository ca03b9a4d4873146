"""VLM benchmark sets: a suite entry (:class:`SetSpec`) and its shards read and checked.

A set is WebDataset shards whose samples hold one image (``jpg``/``png``/``jpeg``/``webp``)
and a ``json`` record, by task:

- ``caption``: ``{"id", "captions": [...]}`` (COCO Karpathy test, NoCaps ...);
- ``vqa``: ``{"id", "question", "answers": [...], "answer_type"}`` (VQAv2, TextVQA ...);
- ``choice``: ``{"id", "question", "options": {"A": ..}, "answer": "A", "hint", "category"}``
  (MMBench, SEED, ScienceQA-IMG ...).

Every sample is read and checked before any generation: a set without references, answers
or options is one clear error, not a crash halfway through. Images stay encoded until their
batch is generated.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("mmpt.eval")

#: The tasks a set can be evaluated on.
TASKS = ("caption", "vqa", "choice")
#: How a multiple-choice answer is picked: the generated letter, or the likeliest option.
CHOICE_BY = ("generate", "likelihood")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
#: Multiple choice by likelihood: the question alone (the options are the scored answers).
LIKELIHOOD_PROMPT = "{hint}{question}"


@dataclass
class SetSpec:
    """One benchmark set of a suite (a ``sets:`` entry of a suite YAML).

    Attributes:
        name: Name in reports and logged keys (``eval/<name>/<metric>``).
        task: ``caption``, ``vqa`` or ``choice``.
        data: Shards: a folder, file, glob, brace pattern or URL.
        prompt: Prompt template (``{question}``, ``{options}``, ``{hint}``); None: the
            shards' ``index.json`` meta ``prompt``, else the task's default
            (:data:`mmpt.eval.prompts.DEFAULT_PROMPTS`). :func:`read_set` fills it in.
        max_samples: Evaluate the first N samples only (None: all).
        circular: Multiple choice: MMBench CircularEval (every rotation of the options must
            be answered right).
        by: Multiple choice: ``generate`` (the letter in the generated text) or
            ``likelihood`` (the option whose answer tokens are likeliest).
    """

    name: str
    task: str
    data: str
    prompt: str | None = None
    max_samples: int | None = None
    circular: bool = False
    by: str = "generate"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"set {self.name!r}: task must be one of {TASKS}, got {self.task!r}")
        if self.by not in CHOICE_BY:
            raise ValueError(f"set {self.name!r}: by must be one of {CHOICE_BY}, got {self.by!r}")
        if (self.circular or self.by != "generate") and self.task != "choice":
            raise ValueError(f"set {self.name!r}: circular and by apply to task: choice only")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"set {self.name!r}: max_samples must be >= 1")


@dataclass
class EvalSample:
    """One checked sample of a set.

    Attributes:
        id: The record's ``id`` (else the shard key).
        image: Encoded image bytes.
        question: The question (vqa, choice); empty for captions.
        references: Reference captions (caption) or annotator answers (vqa).
        options: Letter -> option text (choice), in letter order.
        answer: The right letter (choice).
        extra: Other record fields kept for per-category reports (``answer_type``,
            ``category``, ``hint``).
    """

    id: str
    image: bytes
    question: str = ""
    references: list[str] = field(default_factory=list)
    options: dict[str, str] = field(default_factory=dict)
    answer: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _strings(value: Any) -> list[str] | None:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        return None
    return [v for v in value if v.strip()]


def _bad(spec: SetSpec, key: str, what: str) -> ValueError:
    fix = {
        "caption": 'a "captions" list of reference captions',
        "vqa": 'a "question" and an "answers" list',
        "choice": 'a "question", an "options" object (letter -> text, at least 2) and an '
        '"answer" letter among them',
    }[spec.task]
    return ValueError(
        f"set {spec.name!r} ({spec.data}): sample {key!r} {what}; every {spec.task} sample's "
        f"json needs {fix} (see mmpt/eval/vlm_sets.py)"
    )


def prompt_of(spec: SetSpec, meta: dict | None = None) -> str:
    """The set's prompt: the suite's / ``--prompt``, else the shards' meta, else the default.

    Multiple choice by likelihood defaults to :data:`LIKELIHOOD_PROMPT` (no option list).

    Raises:
        ValueError: The template has a field other than ``{question}``, ``{options}`` and
            ``{hint}`` (double a literal brace: ``{{``).
    """
    from mmpt.eval.prompts import DEFAULT_PROMPTS

    prompt = spec.prompt
    if prompt is None and spec.by == "likelihood":
        prompt = LIKELIHOOD_PROMPT
    if prompt is None:
        prompt = (meta or {}).get("prompt") or DEFAULT_PROMPTS[spec.task]
    if spec.task != "caption":
        try:
            prompt.format(question="q", options="o", hint="h")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"set {spec.name!r}: prompt {prompt!r} has an unknown field ({err}); use "
                "{question}, {options} and {hint}, and {{ for a literal brace"
            ) from None
    return prompt


def parse_sample(spec: SetSpec, raw: dict[str, Any]) -> EvalSample:
    """A raw WebDataset sample (extension -> bytes) -> a checked :class:`EvalSample`.

    Raises:
        ValueError: No image or json, or the json lacks the task's fields (named).
    """
    key = str(raw.get("__key__", "?"))
    image = next((raw[k] for k in IMAGE_KEYS if k in raw), None)
    if image is None:
        raise _bad(spec, key, f"has no image ({'/'.join(IMAGE_KEYS)})")
    if "json" not in raw:
        raise _bad(spec, key, "has no json record")
    try:
        rec = json.loads(raw["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _bad(spec, key, f"has an unreadable json ({err})") from None
    if not isinstance(rec, dict):
        raise _bad(spec, key, "has a json that is not an object")
    sample = EvalSample(id=str(rec.get("id", key)), image=image)
    sample.extra = {k: rec[k] for k in ("answer_type", "category", "hint") if k in rec}
    question = rec.get("question")
    if spec.task != "caption":
        if not isinstance(question, str) or not question.strip():
            raise _bad(spec, key, "has no question")
        sample.question = question
    if spec.task == "caption":
        refs = _strings(rec.get("captions"))
        if not refs:
            raise _bad(spec, key, "has no reference captions")
        sample.references = refs
    elif spec.task == "vqa":
        answers = _strings(rec.get("answers"))
        if not answers:
            raise _bad(spec, key, "has no answers")
        sample.references = answers
    else:
        from mmpt.eval.choice_metrics import check_choice

        options = rec.get("options")
        if not isinstance(options, dict):
            raise _bad(spec, key, "has no options object")
        options = {str(k).strip().upper(): str(v) for k, v in sorted(options.items())}
        answer = str(rec.get("answer", "")).strip().upper()
        try:
            check_choice(options, answer)
        except ValueError as err:
            raise _bad(spec, key, f"is malformed ({err})") from None
        sample.options, sample.answer = options, answer
    return sample


def read_set(spec: SetSpec, flag: str = "--data") -> list[EvalSample]:
    """Every sample of a set (the first ``max_samples``), checked, in shard order.

    Args:
        spec: The set.
        flag: How the data path is named in errors (``--data``, or the suite field).

    Returns:
        The samples; ids are unique (a repeated id gets ``#n`` appended, with a warning).
        ``spec.prompt`` is set to the prompt the set is asked with
        (:func:`prompt_of`), so reports name it.

    Raises:
        FileNotFoundError: No shards at ``spec.data``.
        ValueError: A sample without the task's fields, or a set with no sample at all.
    """
    from mmpt.datamodules.stages import SkipCounter, read_shards
    from mmpt.datamodules.urls import resolve_source

    source = resolve_source(spec.data, flag)
    spec.prompt = prompt_of(spec, source.meta)
    skips = SkipCounter()
    samples: list[EvalSample] = []
    seen: dict[str, int] = {}
    for raw in read_shards(source.urls, skips):
        sample = parse_sample(spec, raw)
        if sample.id in seen:
            seen[sample.id] += 1
            log.warning("set %s: repeated id %r, renamed", spec.name, sample.id)
            sample.id = f"{sample.id}#{seen[sample.id]}"
        seen.setdefault(sample.id, 0)
        samples.append(sample)
        if spec.max_samples is not None and len(samples) >= spec.max_samples:
            break
    if skips.total:
        log.warning(
            "set %s: %d unreadable samples skipped: %s", spec.name, skips.total, skips.summary()
        )
    if not samples:
        raise ValueError(f"set {spec.name!r}: no readable sample in {flag} {spec.data!r}")
    return samples


def shard_of(samples: Sequence[EvalSample], rank: int, world: int) -> list[EvalSample]:
    """This rank's share of the samples (every ``world``-th, from ``rank``)."""
    return list(samples[rank::world])

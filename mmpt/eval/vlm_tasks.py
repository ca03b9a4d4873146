"""VLM benchmark runners: caption, VQA and multiple choice through ``mmpt generate``'s batched path.

:func:`predict` turns a set's samples into prediction records (one per sample; one per
sample and rotation for circular multiple choice) with :class:`~mmpt.generate.Generator`;
:func:`score` turns the records of the whole set (every rank's, gathered) into metrics with
the field's reference metrics (:mod:`mmpt.eval.caption_metrics`, :mod:`~mmpt.eval.vqa_metrics`,
:mod:`~mmpt.eval.choice_metrics`). Keeping the two apart is what lets the training callback
split a set over ranks and score it once.

A sample whose image cannot be decoded, or whose generation is empty, is scored as a wrong
answer (an empty prediction) and counted (``unreadable``, ``empty``), never a crash.
``shuffle_images`` is the control: each sample gets another sample's image (a derangement),
so a model that reads its images scores clearly lower.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from mmpt.eval.vlm_sets import EvalSample, SetSpec, prompt_of

if TYPE_CHECKING:
    from PIL import Image

    from mmpt.generate import Decoding, Generator

#: Most new tokens generated per task unless the caller says otherwise.
MAX_NEW_TOKENS = {"caption": 32, "vqa": 16, "choice": 8}

Record = dict[str, Any]


def fill_prompt(
    task: str, template: str, sample: EvalSample, options: dict[str, str] | None = None
) -> str:
    """The user turn of one sample (:mod:`mmpt.eval.prompts`); the image goes in front."""
    from mmpt.eval.prompts import choice_prompt, vqa_prompt

    if task == "vqa":
        return vqa_prompt(sample.question, template)
    if task == "choice":
        options = sample.options if options is None else options
        return choice_prompt(sample.question, options, sample.extra.get("hint"), template)
    return template


def derangement(n: int, seed: int = 0) -> list[int]:
    """A permutation of ``range(n)`` with no fixed point (n >= 2): the shuffled-image source."""
    if n < 2:
        return list(range(n))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    source = [0] * n
    for i, target in enumerate(order):
        source[target] = order[(i + 1) % n]  # a cycle through all n: nobody keeps its own
    return source


def _decode(data: bytes) -> Image.Image | None:
    from mmpt.datamodules.decode import decode_image

    try:
        return decode_image(data)
    except Exception:  # noqa: BLE001 - an unreadable image is scored wrong and counted
        return None


def rotated_items(spec: SetSpec, samples: Sequence[EvalSample]) -> list[tuple[EvalSample, int]]:
    """(sample, rotation) pairs to ask: every rotation of the options for circular sets.

    A set that already holds the rotated copies (MMBench's circular TSVs: ids of the original
    plus multiples of 1e6, grouped by :func:`~mmpt.eval.choice_metrics.mmbench_group`) is
    asked as it is.
    """
    pre_rotated = any(s.id.isdigit() and int(s.id) >= 1_000_000 for s in samples)
    if not spec.circular or pre_rotated:
        return [(s, 0) for s in samples]
    return [(s, r) for s in samples for r in range(len(s.options))]


def _options(sample: EvalSample, rotation: int) -> tuple[dict[str, str], str]:
    """The options rotated ``rotation`` places (MMBench CircularEval) and the right letter."""
    from mmpt.eval.choice_metrics import rotations

    assert sample.answer is not None  # checked by parse_sample
    return rotations(sample.options, sample.answer)[rotation]


def predict(
    gen: Generator,
    spec: SetSpec,
    samples: Sequence[EvalSample],
    decoding: Decoding,
    batch_size: int = 8,
    shuffle_images: bool = False,
    images_from: Sequence[EvalSample] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[Record]:
    """Prediction records of ``samples`` (in their order), generated in batches.

    Args:
        gen: The generator (model, chat template, system prompt).
        spec: The set (task, prompt, circular, by).
        samples: The samples to answer (this rank's share during fit).
        decoding: Greedy by default; see :class:`~mmpt.generate.Decoding`.
        batch_size: Prompts per ``generate`` call (options per forward for likelihood).
        shuffle_images: The control: sample i gets the image of sample ``derangement[i]``.
        images_from: Samples whose images to use (default ``samples``); the control passes
            the whole set here so that a rank's share still gets other samples' images.
        on_batch: Called with the number of prompts done after each batch (progress).

    Returns:
        One record per prompt: ``id``, ``prompt``, ``output``, and the task's truth
        (``references`` / ``answers`` / ``options``, ``answer``, ``choice``, ``correct``).
    """
    pool = list(images_from if images_from is not None else samples)
    index = {s.id: i for i, s in enumerate(pool)}
    source = derangement(len(pool)) if shuffle_images else list(range(len(pool)))
    items = rotated_items(spec, samples)
    if spec.task == "choice" and spec.by == "likelihood":
        return _by_likelihood(gen, spec, items, pool, source, index, on_batch)
    template = spec.prompt if spec.prompt is not None else prompt_of(spec)
    records: list[Record] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        images = [_decode(pool[source[index[s.id]]].image) for s, _ in chunk]
        rows = [
            _record(spec, template, s, r, img is None)
            for (s, r), img in zip(chunk, images, strict=True)
        ]
        todo = [i for i, img in enumerate(images) if img is not None]
        if todo:
            outputs = gen.generate(
                [rows[i]["prompt"] for i in todo], [[images[i]] for i in todo], **vars(decoding)
            )
            for i, text in zip(todo, outputs, strict=True):
                rows[i]["output"] = text.strip()
        records += [_finish(spec, row) for row in rows]
        if on_batch is not None:
            on_batch(len(chunk))
    return records


def _record(spec: SetSpec, template: str, sample: EvalSample, rotation: int, bad: bool) -> Record:
    row: Record = {"id": sample.id, "output": "", "unreadable": bad}
    if spec.task == "choice":
        options, letter = _options(sample, rotation)
        row |= {"rotation": rotation, "options": options, "answer": letter}
        row["prompt"] = fill_prompt(spec.task, template, sample, options)
    else:
        row["prompt"] = fill_prompt(spec.task, template, sample)
        row["references" if spec.task == "caption" else "answers"] = sample.references
    row |= {k: sample.extra[k] for k in ("category", "answer_type") if k in sample.extra}
    return row


def _finish(spec: SetSpec, row: Record) -> Record:
    if spec.task == "choice" and "choice" not in row:
        from mmpt.eval.choice_metrics import extract_choice

        row["choice"] = extract_choice(row["output"], row["options"]) if row["output"] else None
    if spec.task == "choice":
        row["correct"] = row["choice"] == row["answer"]
    return row


def _by_likelihood(
    gen: Generator,
    spec: SetSpec,
    items: list[tuple[EvalSample, int]],
    pool: list[EvalSample],
    source: list[int],
    index: dict[str, int],
    on_batch: Callable[[int], None] | None,
) -> list[Record]:
    """Multiple choice by the likeliest option text (no generation, no letter extraction)."""
    template = spec.prompt if spec.prompt is not None else prompt_of(spec)
    records = []
    for sample, rotation in items:
        image = _decode(pool[source[index[sample.id]]].image)
        row = _record(spec, template, sample, rotation, image is None)
        row["choice"] = None
        if image is not None:
            from mmpt.eval.choice_metrics import choice_from_scores

            letters = list(row["options"])
            from mmpt.eval.vlm_likelihood import option_logprobs

            scores = option_logprobs(gen, row["prompt"], image, list(row["options"].values()))
            row["logprobs"] = dict(zip(letters, scores, strict=True))
            row["choice"] = choice_from_scores(row["logprobs"])  # None on a tie: a miss
            row["output"] = row["options"].get(row["choice"], "")
        records.append(_finish(spec, row))
        if on_batch is not None:
            on_batch(1)
    return records


def _flat(metrics: dict[str, Any]) -> dict[str, float]:
    """Nested per-type / per-category dicts as ``outer/inner`` keys; counts as floats."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out |= {f"{key}/{k}": float(v) for k, v in value.items()}
        else:
            out[key] = float(value)
    return out


def score(spec: SetSpec, records: Sequence[Record], java: bool | None = None) -> dict[str, float]:
    """Metrics of a whole set from its prediction records (all ranks').

    Args:
        spec: The set.
        records: Every record of the set.
        java: Captions: None uses pycocoevalcap's Java PTB tokenizer and METEOR when ``java``
            is installed; False the Python tokenizer port and no METEOR (fast: Java's start-up
            costs 15-45 s a call).

    Returns:
        caption: :func:`~mmpt.eval.caption_metrics.caption_scores` (``CIDEr``, ``BLEU-4``,
        ``ROUGE-L`` ...); vqa: :func:`~mmpt.eval.vqa_metrics.vqa_scores` (``vqa_accuracy``,
        ``exact_match``, ``relaxed_accuracy``, ``per_answer_type/<type>``); choice:
        :func:`~mmpt.eval.choice_metrics.choice_scores` (``accuracy`` over asked items and,
        circular, ``circular_accuracy`` over questions; ``per_category/<name>``). Plus the
        ``empty`` and ``unreadable`` fractions of the prompts.
    """
    n = max(1, len(records))
    counts = {
        "empty": sum(not r["output"] and not r["unreadable"] for r in records) / n,
        "unreadable": sum(bool(r["unreadable"]) for r in records) / n,
    }
    if spec.task == "caption":
        from mmpt.eval.caption_metrics import caption_scores

        preds = {r["id"]: r["output"] for r in records}
        fast = {"tokenizer": "python", "meteor": False} if java is False else {}
        out = caption_scores(preds, {r["id"]: r["references"] for r in records}, **fast)
    elif spec.task == "vqa":
        from mmpt.eval.vqa_metrics import vqa_scores

        preds = {r["id"]: r["output"] for r in records}
        types = {r["id"]: r.get("answer_type") for r in records}
        out = vqa_scores(preds, {r["id"]: r["answers"] for r in records}, types)
    else:
        from mmpt.eval.choice_metrics import choice_scores, mmbench_group

        item = {f"{r['id']}@{r['rotation']}": r for r in records}
        out = choice_scores(
            {k: r["choice"] for k, r in item.items()},
            {k: r["answer"] for k, r in item.items()},
            groups={k: mmbench_group(r["id"]) for k, r in item.items()} if spec.circular else None,
            categories={k: r.get("category") for k, r in item.items()},
        )
    return _flat(out) | counts

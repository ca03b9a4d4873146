"""Held-out benchmark sets and question-answer SFT data for the synthetic shapes.

``mmpt data synth --kind image-text`` writes, next to ``train/`` and ``val/``:

- ``eval/caption``, ``eval/vqa``, ``eval/choice``: caption, VQA and multiple-choice sets in
  the eval shard layout (:mod:`mmpt.shards.eval_sets`), rendered from their own random
  streams (new jitter, never a training image);
- ``qa/``: single-turn conversations asking the same question types, for SFT (the VILA
  stage-3 quickstart mixes them with the caption conversations of ``train/``).

Question types (lowercase, with words the synthetic tokenizer knows): ``what colour is the
shape ?`` (the colour), ``what shape is it ?`` (the shape), ``is the shape in the <position>
?`` (``yes``/``no``, balanced), and ``what is in the image ?`` with four ``colour shape``
options (one right; one distractor shares the colour, one the shape) answered by letter.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mmpt.eval.prompts import (
    PLAIN_CHOICE_TEMPLATE,
    PLAIN_VQA_TEMPLATE,
    SYNTH_CAPTION_PROMPT,
    choice_prompt,
    vqa_prompt,
)
from mmpt.shards.eval_sets import eval_meta, eval_record
from mmpt.shards.writer import ShardWriter
from mmpt.synth.common import check_minimums, split_folders
from mmpt.synth.image_text import (
    COLORS,
    GENERATOR_NAME,
    NUM_COMBOS,
    POSITIONS,
    SHAPES,
    captions_for,
    combo_attributes,
    make_noise_bank,
    render_sample,
    synth_image_text,
)

VQA_KINDS = ("colour", "shape", "position")
CHOICE_QUESTION = "what is in the image ?"
LETTERS = ("A", "B", "C", "D")
EVAL_TASK_FOLDERS = {"caption": "eval/caption", "vqa": "eval/vqa", "choice": "eval/choice"}
_STREAM = {"caption": 3, "vqa": 4, "choice": 5, "qa": 6}  # train is 1, val 2
_NUM_ANSWERS = 10  # VQAv2 has 10 human answers per question; all agree here


def vqa_question(kind: str, attrs: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """One VQA question about a shape, with its answer.

    Args:
        kind: ``colour``, ``shape`` or ``position`` (see :data:`VQA_KINDS`).
        attrs: From :func:`~mmpt.synth.image_text.combo_attributes`.
        rng: Picks the asked position (the true one half of the time).

    Returns:
        ``question``, ``answer``, ``answer_type`` (``other`` or ``yes/no``) and
        ``question_type``.
    """
    if kind == "colour":
        return {"question": "what colour is the shape ?", "answer": attrs["color"],
                "answer_type": "other", "question_type": "what colour"}  # fmt: skip
    if kind == "shape":
        return {"question": "what shape is it ?", "answer": attrs["shape"],
                "answer_type": "other", "question_type": "what shape"}  # fmt: skip
    if kind != "position":
        raise ValueError(f"question kind must be one of {VQA_KINDS}, got {kind!r}")
    asked = attrs["position"]
    if rng.random() < 0.5:
        others = [p for p in POSITIONS if p != asked]
        asked = others[int(rng.integers(len(others)))]
    return {"question": f"is the shape in the {asked} ?",
            "answer": "yes" if asked == attrs["position"] else "no",
            "answer_type": "yes/no", "question_type": "is the shape in"}  # fmt: skip


def choice_question(attrs: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """A four-option question naming the shape's colour and kind; one option is right.

    Returns:
        ``question``, ``options`` (``{"A": "red circle", ...}``) and ``answer`` (a letter).
    """
    color, shape = attrs["color"], attrs["shape"]
    colors = [c for c in COLORS if c != color]
    shapes = [s for s in SHAPES if s != shape]
    other_c, other_s = (
        colors[int(rng.integers(len(colors)))],
        shapes[int(rng.integers(len(shapes)))],
    )
    texts = [f"{color} {shape}", f"{color} {other_s}", f"{other_c} {shape}"]
    while len(texts) < len(LETTERS):
        c, s = list(COLORS)[int(rng.integers(len(COLORS)))], SHAPES[int(rng.integers(len(SHAPES)))]
        if f"{c} {s}" not in texts:
            texts.append(f"{c} {s}")
    order = rng.permutation(len(texts))
    options = {LETTERS[i]: texts[j] for i, j in enumerate(order)}
    answer = LETTERS[int(np.flatnonzero(order == 0)[0])]
    return {"question": CHOICE_QUESTION, "options": options, "answer": answer}


def qa_texts() -> list[str]:
    """Every question, answer and option text the sets can hold (for the tokenizer)."""
    texts = [vqa_prompt("what colour is the shape ?", PLAIN_VQA_TEMPLATE)]
    texts += ["what shape is it ?", "yes", "no", *LETTERS, "."]
    texts += [f"is the shape in the {p} ?" for p in POSITIONS]
    options = {k: f"{c} {s}" for k, c, s in zip(LETTERS, COLORS, SHAPES, strict=False)}
    texts.append(choice_prompt(CHOICE_QUESTION, options, None, PLAIN_CHOICE_TEMPLATE))
    return texts


def _eval_record(task: str, i: int, attrs: dict[str, Any], rng: np.random.Generator) -> dict:
    """The json of eval sample ``i`` of ``task``."""
    ident = f"{task}-{i:06d}"
    if task == "caption":
        return eval_record(task, {"id": ident, "captions": captions_for(attrs), **attrs})
    if task == "vqa":
        q = vqa_question(VQA_KINDS[i % len(VQA_KINDS)], attrs, rng)
        answers = [q.pop("answer")] * _NUM_ANSWERS
        return eval_record(task, {"id": ident, **q, "answers": answers, **attrs})
    q = choice_question(attrs, rng)
    return eval_record(task, {"id": ident, **q, "hint": None, "category": "shapes", **attrs})


def _qa_conversation(i: int, attrs: dict[str, Any], rng: np.random.Generator) -> dict:
    """The json of QA conversation ``i``: the question kinds in turn, then their answer."""
    kinds = (*VQA_KINDS, "choice")
    kind = kinds[i % len(kinds)]
    if kind == "choice":
        q = choice_question(attrs, rng)
        prompt = choice_prompt(q["question"], q["options"], None, PLAIN_CHOICE_TEMPLATE)
    else:
        q = vqa_question(kind, attrs, rng)
        prompt = vqa_prompt(q["question"], PLAIN_VQA_TEMPLATE)
    turns = [
        {"from": "human", "value": "<image>\n" + prompt},
        {"from": "gpt", "value": q["answer"]},
    ]
    return {"conversations": turns, "question_kind": kind, **attrs}


PROMPTS = {
    "caption": SYNTH_CAPTION_PROMPT,
    "vqa": PLAIN_VQA_TEMPLATE,
    "choice": PLAIN_CHOICE_TEMPLATE,
}
"""The prompt of each synthetic eval set (stored in its meta), the same the ``qa/`` data uses."""


def write_image_eval(
    out: str | Path,
    eval_samples: int = NUM_COMBOS,
    qa_samples: int = 3000,
    image_size: int = 64,
    seed: int = 0,
    samples_per_shard: int = 1000,
    overwrite: bool = False,
    domain: str = "plain",
) -> dict[str, Any]:
    """Write ``out/eval/{caption,vqa,choice}`` and ``out/qa`` (see the module docstring).

    Each eval set draws its combinations evenly (each of the 192 once per 192 samples) in a
    seeded order, the VQA set cycles through the three question kinds, and ``qa/`` cycles
    through them and the multiple-choice question.

    Args:
        out: The synthetic set's folder.
        eval_samples: Samples per eval set.
        qa_samples: SFT conversations in ``qa/`` (0 writes none).
        image_size: Image side in pixels.
        seed: Same seed, same bytes; each set has its own random stream.
        samples_per_shard: Samples per shard.
        overwrite: Replace shards this generator did not write.
        domain: The visual domain (:data:`~mmpt.synth.image_text.DOMAINS`).

    Returns:
        ``eval_caption``, ``eval_vqa``, ``eval_choice`` and ``qa`` folders with their
        ``*_samples`` and ``*_shards`` counts.
    """
    check_minimums({"eval_samples": (eval_samples, 1), "qa_samples": (qa_samples, 0)})
    out = Path(out)
    names = [*EVAL_TASK_FOLDERS.values(), *(["qa"] if qa_samples else [])]
    folders = split_folders(out, names, overwrite, GENERATOR_NAME)
    generator = {"name": GENERATOR_NAME, "seed": seed, "image_size": image_size, "domain": domain}
    result: dict[str, Any] = {}
    for task, name in EVAL_TASK_FOLDERS.items():
        meta = eval_meta(task, "synthetic", {"format": "synthetic shapes"}, PROMPTS[task])
        meta["generator"] = {**generator, "samples": eval_samples}
        rng = np.random.default_rng([seed, _STREAM[task]])
        make = functools.partial(_eval_record, task)
        shards = _write(
            folders[name], meta, eval_samples, image_size, rng, samples_per_shard, make, domain
        )
        result |= {f"eval_{task}": str(folders[name]), f"eval_{task}_samples": eval_samples}
        result[f"eval_{task}_shards"] = shards
    if qa_samples:
        meta = {"kind": "conversation", "generator": {**generator, "samples": qa_samples}}
        rng = np.random.default_rng([seed, _STREAM["qa"]])
        make = _qa_conversation
        shards = _write(
            folders["qa"], meta, qa_samples, image_size, rng, samples_per_shard, make, domain
        )
        result |= {"qa": str(folders["qa"]), "qa_samples": qa_samples, "qa_shards": shards}
    return result


def _write(
    folder: Path,
    meta: dict[str, Any],
    count: int,
    image_size: int,
    rng: np.random.Generator,
    samples_per_shard: int,
    make: Callable[[int, dict[str, Any], np.random.Generator], dict[str, Any]],
    domain: str,
) -> int:
    combos = rng.permutation(np.arange(count) % NUM_COMBOS)
    noise_bank = make_noise_bank(rng, image_size)
    with ShardWriter(folder, samples_per_shard, modalities=["image", "text"], meta=meta) as w:
        for i, combo in enumerate(combos):
            attrs = combo_attributes(int(combo))
            info = make(i, attrs, rng)
            jpg = render_sample(attrs, image_size, rng, noise_bank, domain)
            w.write({"__key__": f"{i:09d}", "jpg": jpg, "json": info})
    return len(w.index.shards)


def synth_image_text_eval(
    out: str | Path,
    train_samples: int = 6000,
    image_size: int = 64,
    seed: int = 0,
    samples_per_shard: int = 1000,
    overwrite: bool = False,
    eval_samples: int = NUM_COMBOS,
    qa_samples: int | None = None,
    domain: str = "plain",
) -> dict[str, Any]:
    """``mmpt data synth --kind image-text``: the shapes set with its eval sets and QA data.

    :func:`~mmpt.synth.image_text.synth_image_text` (``train/``, ``val/``, ``tokenizer/``),
    then :func:`write_image_eval`.

    Args:
        out: Output folder.
        train_samples: Training pairs in ``train/``.
        image_size: Image side in pixels.
        seed: Same seed, same bytes.
        samples_per_shard: Samples per shard.
        overwrite: Replace shards this generator did not write.
        eval_samples: Samples per eval set (192: every combination once).
        qa_samples: Conversations in ``qa/``; default half of ``train_samples``.
        domain: The visual domain (:data:`~mmpt.synth.image_text.DOMAINS`).

    Returns:
        The two functions' results merged.
    """
    result = synth_image_text(
        out, train_samples, image_size, seed, samples_per_shard, overwrite, domain
    )
    qa = train_samples // 2 if qa_samples is None else qa_samples
    return result | write_image_eval(
        out, eval_samples, qa, image_size, seed, samples_per_shard, overwrite, domain
    )

"""The shard layout of VLM benchmark sets (caption, VQA, multiple choice), shared by their builders.

Every sample holds one image (``jpg``) and a ``json`` member; ``index.json``'s meta has
``kind: "eval"``, ``task`` and ``prompt`` (the set's prompt template, :mod:`mmpt.eval.prompts`):

- ``caption``: ``{"id": str, "captions": [str, ...]}`` (Karpathy retrieval shards carry the
  same ``captions`` list, so they serve as caption sets too);
- ``vqa``: ``{"id": str, "question": str, "answers": [str, ...], "answer_type": str | None}``;
- ``choice``: ``{"id": str, "question": str, "options": {"A": str, ...}, "answer": "A",
  "hint": str | None, "category": str | None}``.

Builders may add fields (``image_id``, ``question_type``, ``domain`` ...). The synthetic sets
(:mod:`mmpt.synth.image_eval`) write the same layout.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmpt.eval.prompts import DEFAULT_PROMPTS
from mmpt.shards.build import BuildReport
from mmpt.shards.documents import Doc, build_documents

EVAL_TASKS: tuple[str, ...] = ("caption", "vqa", "choice")
"""The ``task`` values of an eval set's ``index.json`` meta."""

REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "caption": ("id", "captions"),
    "vqa": ("id", "question", "answers", "answer_type"),
    "choice": ("id", "question", "options", "answer", "hint", "category"),
}
"""The ``json`` fields each task's samples always have."""


def eval_meta(
    task: str, source: str, build: dict[str, Any], prompt: str | None = None
) -> dict[str, Any]:
    """The ``index.json`` meta of an eval set.

    Args:
        task: ``caption``, ``vqa`` or ``choice``.
        source: Where the set came from (a file path, or ``synthetic``).
        build: The format and options it was built with.
        prompt: The set's prompt (see :mod:`mmpt.eval.prompts`); default the task's
            :data:`~mmpt.eval.prompts.DEFAULT_PROMPTS` entry.

    Returns:
        ``{"kind": "eval", "task", "source", "build", "prompt"}``.
    """
    if task not in EVAL_TASKS:
        raise ValueError(f"eval task must be one of {EVAL_TASKS}, got {task!r}")
    prompt = DEFAULT_PROMPTS[task] if prompt is None else prompt
    return {"kind": "eval", "task": task, "source": source, "build": build, "prompt": prompt}


def eval_record(task: str, record: dict[str, Any]) -> dict[str, Any]:
    """Check that a record has its task's fields (see :data:`REQUIRED_FIELDS`).

    Args:
        task: ``caption``, ``vqa`` or ``choice``.
        record: The ``json`` member to write.

    Returns:
        The record.

    Raises:
        ValueError: a field is missing (a builder bug, not a user error).
    """
    missing = [k for k in REQUIRED_FIELDS[task] if k not in record]
    if missing:
        raise ValueError(f"{task} record lacks {missing}: {record}")
    return record


def _compose(doc: Doc, key: str) -> dict[str, Any]:
    return {"jpg": doc.encoded[0], "json": {**doc.data, "key": key}}


def build_eval_shards(
    docs: Iterable[Doc],
    out: str | Path,
    task: str,
    source: str,
    build: dict[str, Any],
    samples_per_shard: int,
    resize_short_side: int | None,
    jpeg_quality: int,
    workers: int,
    progress: bool,
    overwrite: bool,
) -> BuildReport:
    """Write eval docs (``data``: the task's json record, one image each) as shards.

    Args:
        docs: One :class:`~mmpt.shards.documents.Doc` per sample, or with its skip reason.
        out: Output shard folder.
        task: ``caption``, ``vqa`` or ``choice``.
        source: The source file, recorded in the meta and named in errors.
        build: Format and options, recorded in the meta.
        samples_per_shard: Samples per shard.
        resize_short_side: Downscale images whose short side is larger.
        jpeg_quality: Quality of re-encoded JPEGs.
        workers: Processes reading images.
        progress: Show a progress bar.
        overwrite: Replace shards already in ``out``.

    Returns:
        The :class:`~mmpt.shards.build.BuildReport`.

    Raises:
        ValueError: every record was skipped (the reasons are in the message).
    """
    meta = eval_meta(task, source, build)
    report = build_documents(
        docs, out, _compose, meta, ["image", "text"], samples_per_shard, resize_short_side,
        jpeg_quality, workers, progress, overwrite,
    )  # fmt: skip
    if report.written == 0:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(report.skipped.items())) or "no records"
        raise ValueError(
            f"--from {source}: no {task} sample could be written ({reasons}); check the "
            "file's format and --images"
        )
    return report

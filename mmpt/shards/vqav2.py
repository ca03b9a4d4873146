"""VQAv2-format question + annotation files -> VQA eval shards.

The questions file is ``{"questions": [{"question_id", "image_id", "question"}],
"data_subtype": "val2014", ...}``; the annotations file is ``{"annotations":
[{"question_id", "answers": [{"answer", ...}] * 10, "answer_type", "question_type",
"multiple_choice_answer"}]}``. Both are given to ``--from`` (in either order; the builder
tells them apart by their top-level key). Images are COCO's
``<subtype>/COCO_<subtype>_<image_id:012d>.jpg``, found under ``--images`` with or without the
``<subtype>/`` folder. OK-VQA, VizWiz and TextVQA exports in this layout build the same way.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mmpt.shards.build import BuildReport
from mmpt.shards.coco_caption import load_json
from mmpt.shards.documents import Doc, find_image, image_roots, source_files
from mmpt.shards.eval_sets import build_eval_shards, eval_record


def _split_files(files: list[Path]) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """Tell the questions file from the annotations file; (questions path, questions, anns)."""
    loaded = [(f, load_json(f)) for f in files]
    questions = [(f, d) for f, d in loaded if isinstance(d, dict) and "questions" in d]
    annotations = [(f, d) for f, d in loaded if isinstance(d, dict) and "annotations" in d]
    if len(files) != 2 or len(questions) != 1 or len(annotations) != 1:
        names = ", ".join(str(f) for f in files)
        raise ValueError(
            f"--kind vqav2 needs two files in --from, a questions json (with 'questions') and "
            f"an annotations json (with 'annotations'); got {names}. Test splits without "
            "annotations cannot be scored"
        )
    return questions[0][0], questions[0][1], annotations[0][1]


def image_path(image_id: Any, subtype: str | None, roots: list[Path]) -> str | tuple[str, str]:
    """COCO's file for ``image_id``, with or without its ``<subtype>/`` folder."""
    if not subtype:
        return ("missing_image", "the questions file has no data_subtype to name images by")
    name = f"COCO_{subtype}_{int(image_id):012d}.jpg"
    for rel in (f"{subtype}/{name}", name):
        found = find_image(rel, roots)
        if Path(found).is_file():
            return found
    return find_image(f"{subtype}/{name}", roots)


def vqav2_docs(files: list[Path], roots: list[Path]) -> Iterator[Doc]:
    """One :class:`Doc` per question, with the human answers of its annotation.

    The files are read and checked here (errors before any shard is written); the docs
    come lazily.

    Raises:
        ValueError: not a questions + annotations pair.
    """
    qpath, qdata, adata = _split_files(files)
    questions, annotations = qdata.get("questions"), adata.get("annotations")
    if not isinstance(questions, list) or not isinstance(annotations, list):
        raise ValueError(f"--from {qpath}: 'questions' and 'annotations' must be lists")
    by_qid = {
        str(a["question_id"]): a for a in annotations if isinstance(a, dict) and "question_id" in a
    }
    return _docs(qpath, questions, by_qid, qdata.get("data_subtype"), roots)


def _docs(
    qpath: Path,
    questions: list[Any],
    by_qid: dict[str, Any],
    subtype: str | None,
    roots: list[Path],
) -> Iterator[Doc]:
    for i, q in enumerate(questions):
        where = f"{qpath}[questions][{i}]"
        if not isinstance(q, dict) or not {"question_id", "image_id", "question"} <= set(q):
            yield Doc(where, problem=("bad_row", "needs question_id, image_id and question"))
            continue
        qid = str(q["question_id"])
        ann = by_qid.get(qid, {})
        answers = [
            str(a["answer"])
            for a in ann.get("answers") or []
            if isinstance(a, dict) and "answer" in a
        ]
        if not answers:
            yield Doc(where, problem=("no_answers", f"question {qid} has no annotated answers"))
            continue
        try:
            image = image_path(q["image_id"], subtype, roots)
        except (TypeError, ValueError):
            yield Doc(where, problem=("bad_row", f"image_id {q['image_id']!r} is not a number"))
            continue
        record = {
            "id": qid,
            "question": str(q["question"]),
            "answers": answers,
            "answer_type": ann.get("answer_type"),
            "question_type": ann.get("question_type"),
            "image_id": str(q["image_id"]),
        }
        yield Doc(where, eval_record("vqa", record), [image])


def build_vqav2_shards(
    source: str | Path | Sequence[str | Path],
    out: str | Path,
    images_root: str | Path | list[str | Path] | None = None,
    samples_per_shard: int = 5000,
    resize_short_side: int | None = None,
    jpeg_quality: int = 95,
    workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> BuildReport:
    """Write a VQAv2-format set as VQA eval shards (``jpg`` + json question and answers).

    Skips, counted by reason: ``bad_row``, ``no_answers`` (a question without an annotation
    or answers), ``missing_image``, ``corrupt_image``.

    Args:
        source: The questions and annotations ``.json`` files (either order).
        out: Output shard folder.
        images_root: Folder(s) holding ``<subtype>/COCO_<subtype>_<id>.jpg`` (or the
            ``<subtype>`` folder itself); default the questions file's folder.
        samples_per_shard: Questions per shard.
        resize_short_side: Downscale images whose short side is larger.
        jpeg_quality: Quality of re-encoded JPEGs.
        workers: Processes reading images.
        progress: Show a progress bar.
        overwrite: Replace shards already in ``out``.

    Returns:
        A :class:`~mmpt.shards.build.BuildReport`.

    Raises:
        FileNotFoundError: A file or the images folder does not exist.
        ValueError: Not a questions + annotations pair, or no question could be written.
    """
    files = source_files(source, (".json",))
    roots = image_roots(images_root, files[0].parent)
    build = {"format": "vqav2", "files": [str(f.resolve()) for f in files]}
    build["images_root"] = [str(r) for r in roots]
    return build_eval_shards(
        vqav2_docs(files, roots), out, "vqa", str(files[0].resolve()), build,
        samples_per_shard, resize_short_side, jpeg_quality, workers, progress, overwrite,
    )  # fmt: skip

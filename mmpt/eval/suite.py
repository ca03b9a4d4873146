"""VLM evaluation suites: a YAML list of benchmark sets, run in one go, one JSON + Markdown report.

A suite file (``configs/eval/vlm_suite.yaml``, ``configs/eval/quickstart_suite.yaml``)::

    sets:
      - {name: coco, task: caption, data: shards/coco-karpathy-test}
      - {name: vqav2, task: vqa, data: shards/vqav2-val, max_samples: 5000,
         prompt: "{question} Answer in one word."}
      - {name: mmbench, task: choice, data: shards/mmbench-dev, circular: true}

Each entry is a :class:`~mmpt.eval.vlm_sets.SetSpec`. ``mmpt eval all --suite`` and
:class:`~mmpt.eval.vlm_callback.VLMEvalCallback` both run suites through :func:`evaluate_set`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmpt.eval.vlm_sets import EvalSample, SetSpec, read_set
from mmpt.eval.vlm_tasks import MAX_NEW_TOKENS, Record, predict, score
from mmpt.io import read_yaml

if TYPE_CHECKING:
    from mmpt.generate import Decoding, Generator

#: The metric a table shows first for each task.
HEADLINE = {"caption": "CIDEr", "vqa": "vqa_accuracy", "choice": "accuracy"}


def headline(spec: SetSpec) -> str:
    """The set's main metric (CircularEval accuracy for circular multiple choice)."""
    return "circular_accuracy" if spec.circular else HEADLINE[spec.task]


def load_suite(
    suite: str | Path | Sequence[Mapping[str, Any]], flag: str = "--suite"
) -> list[SetSpec]:
    """The sets of a suite: a YAML file with a ``sets:`` list, or that list itself (inline).

    Args:
        suite: Path of a suite YAML, or the list of set mappings (a recipe can hold its suite
            inline, so it does not depend on the folder it is run from).
        flag: Where the suite came from, for error messages.

    Raises:
        FileNotFoundError: No such file.
        ValueError: Not a ``sets:`` list, an unknown or missing field, a repeated name.
    """
    if not isinstance(suite, (str, Path)):
        return parse_sets(suite, flag)
    path = Path(suite)
    doc = read_yaml(path, flag)
    return parse_sets(doc.get("sets") if isinstance(doc, dict) else None, f"{flag} {path}")


def parse_sets(sets: Any, where: str) -> list[SetSpec]:
    """Check a ``sets:`` list (each a mapping of :class:`SetSpec` fields) and build the specs.

    Raises:
        ValueError: Not a non-empty list, an unknown or missing field, a repeated name.
    """
    if not isinstance(sets, (list, tuple)) or not sets:
        raise ValueError(f"{where}: expected a non-empty 'sets:' list of benchmark sets")
    known = {f.name for f in dataclasses.fields(SetSpec)}
    specs: list[SetSpec] = []
    for i, entry in enumerate(sets):
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}: sets[{i}] is not a mapping")
        unknown = sorted(set(entry) - known)
        missing = sorted({"name", "task", "data"} - set(entry))
        if unknown or missing:
            what = f"unknown field(s) {unknown}" if unknown else f"missing field(s) {missing}"
            raise ValueError(f"{where}: sets[{i}] has {what}; fields: {sorted(known)}")
        specs.append(SetSpec(**dict(entry)))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: set names must be unique, got {names}")
    return specs


@dataclass
class SetResult:
    """The outcome of one set.

    Attributes:
        spec: The set.
        metrics: Metric name -> value (see :func:`~mmpt.eval.vlm_tasks.score`).
        records: Every prediction record.
        seconds: Wall time of the prediction.
    """

    spec: SetSpec
    metrics: dict[str, float]
    records: list[Record] = field(default_factory=list)
    seconds: float = 0.0


def decoding_for(spec: SetSpec, decoding: Decoding | None) -> Decoding:
    """``decoding`` with the task's default ``max_new_tokens`` when none was given."""
    from mmpt.generate import Decoding

    if decoding is not None:
        return decoding
    return Decoding(max_new_tokens=MAX_NEW_TOKENS[spec.task])


def evaluate_set(
    gen: Generator,
    spec: SetSpec,
    samples: Sequence[EvalSample] | None = None,
    decoding: Decoding | None = None,
    batch_size: int = 8,
    shuffle_images: bool = False,
    gather: Callable[[list[Record]], list[Record]] | None = None,
    share: Callable[[Sequence[EvalSample]], list[EvalSample]] | None = None,
    on_batch: Callable[[int], None] | None = None,
    java: bool | None = None,
) -> SetResult:
    """Predict and score one set.

    Args:
        gen: The generator.
        spec: The set.
        samples: Its samples (default: read and checked from ``spec.data``).
        decoding: Decoding (default: greedy, the task's ``max_new_tokens``).
        batch_size: Prompts per batch.
        shuffle_images: The shuffled-images control.
        gather: Concatenates every rank's records (during fit); None: one process.
        share: This rank's share of the samples (during fit); None: all of them.
        on_batch: Progress callback (prompts done).
        java: Caption scoring with Java (None: when installed; False: the Python port).
    """
    samples = list(samples if samples is not None else read_set(spec))
    start = time.perf_counter()
    records = predict(
        gen,
        spec,
        share(samples) if share is not None else samples,
        decoding_for(spec, decoding),
        batch_size,
        shuffle_images=shuffle_images,
        images_from=samples,
        on_batch=on_batch,
    )
    if gather is not None:
        records = gather(records)
    return SetResult(spec, score(spec, records, java), records, time.perf_counter() - start)


def markdown_table(results: Sequence[SetResult]) -> str:
    """One row per set: name, task, samples, the headline metric, then every other metric."""
    lines = [
        "| set | task | samples | metric | value | other metrics |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        head = headline(r.spec)
        value = r.metrics.get(head)
        others = ", ".join(
            f"{k} {v:.4g}" for k, v in r.metrics.items() if k != head and isinstance(v, float)
        )
        shown = f"{value:.4f}" if isinstance(value, float) else "n/a"
        samples = len({rec["id"] for rec in r.records})
        lines.append(f"| {r.spec.name} | {r.spec.task} | {samples} | {head} | {shown} | {others} |")
    return "\n".join(lines) + "\n"


def write_suite_report(
    results: Sequence[SetResult], out_dir: str | Path, name: str = "suite", **context: Any
) -> dict[str, Path]:
    """Write the report of a run over sets.

    Files: ``<name>.json`` (metrics per set + context), ``<name>.md`` (the table) and one
    ``<name>_<set>.jsonl`` of predictions per set.

    Returns:
        Kind -> path written.
    """
    from mmpt.eval.report import write_json
    from mmpt.io import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {r.spec.name: r.metrics for r in results}
    sets = {
        r.spec.name: dataclasses.asdict(r.spec)
        | {"records": len(r.records), "seconds": round(r.seconds, 2)}
        for r in results
    }
    paths = {"json": write_json(out / f"{name}.json", metrics, sets=sets, **context)}
    paths["markdown"] = out / f"{name}.md"
    atomic_write_text(paths["markdown"], markdown_table(results))
    for r in results:
        lines = "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in r.records)
        paths[f"predictions/{r.spec.name}"] = out / f"{name}_{r.spec.name}.jsonl"
        atomic_write_text(paths[f"predictions/{r.spec.name}"], lines)
    return paths

"""Benchmark numbers of the VLM quickstart: the trained model vs shuffled images vs chance.

Runs ``mmpt eval all`` over the held-out synthetic sets (``configs/eval/quickstart_suite.yaml``:
caption CIDEr, VQA accuracy, multiple choice by letter with CircularEval and by option
likelihood) twice on the same checkpoint: with the true images and with images permuted
across samples (``--shuffle-images``, a derangement). Chance is computed from the sets:
captions = another image's references as the caption; VQA = a uniform guess among the set's
answers; multiple choice = 1/K per asked question (all K rotations for CircularEval). With
``--export`` the exported transformers LLaVA folder is evaluated too (its numbers must equal
the checkpoint's). Writes ``report.json`` and ``report.md`` and prints the table::

    mmpt fit -c configs/quickstart/vila_stage1.yaml          # then stage 2 and stage 3
    python scripts/quickstart_vlm_eval.py -c configs/quickstart/vila_stage3.yaml \\
        --ckpt runs/vila_tiny_stage3/last/checkpoints/last.ckpt --export
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from mmpt.eval.caption_metrics import caption_scores
from mmpt.eval.suite import headline, load_suite
from mmpt.eval.vlm_sets import SetSpec, read_set
from mmpt.eval.vlm_tasks import derangement
from mmpt.eval.vqa_metrics import vqa_accuracy

MMPT = [sys.executable, "-m", "mmpt.cli"]


def chance(spec: SetSpec) -> float:
    """The set's headline metric for a model that ignores the image (see the module doc)."""
    samples = read_set(spec, "suite data")
    if spec.task == "caption":
        source = derangement(len(samples), seed=1)
        preds = {s.id: samples[source[i]].references[0] for i, s in enumerate(samples)}
        refs = {s.id: s.references for s in samples}
        return caption_scores(preds, refs, tokenizer="python", meteor=False)["CIDEr"]
    if spec.task == "vqa":
        vocab = sorted({a for s in samples for a in s.references})
        per = [sum(vqa_accuracy(v, s.references) for v in vocab) / len(vocab) for s in samples]
        return sum(per) / len(per)
    if spec.circular:  # right under every rotation: (1/K)^K for K independent guesses
        return sum((1 / len(s.options)) ** len(s.options) for s in samples) / len(samples)
    return sum(1 / len(s.options) for s in samples) / len(samples)


def run_eval(args: argparse.Namespace, source: list[str], out: Path, shuffle: bool = False) -> dict:
    """``mmpt eval all`` on ``source`` (``-c/--ckpt`` or ``--model``); its metrics per set."""
    cmd = [*MMPT, "eval", "all", *source, "--suite", args.suite, "--out", str(out)]
    cmd += ["--device", args.device, "--batch-size", str(args.batch_size)]
    cmd += ["--max-samples", str(args.max_samples)] if args.max_samples else []
    subprocess.run(cmd + (["--shuffle-images"] if shuffle else []), check=True)
    name = Path(args.suite).stem + ("_shuffled" if shuffle else "")
    return json.loads((out / f"{name}.json").read_text())["metrics"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-c", "--config", default="configs/quickstart/vila_stage3.yaml")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--suite", default="configs/eval/quickstart_suite.yaml")
    p.add_argument("--out", default=None, help="report folder (default: beside --ckpt)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--export", action="store_true", help="also evaluate the LLaVA export")
    args = p.parse_args()
    out = Path(args.out or Path(args.ckpt).parent.parent / "benchmarks")
    specs = load_suite(args.suite)
    if args.max_samples:
        for spec in specs:
            spec.max_samples = args.max_samples
    ckpt = ["-c", args.config, "--ckpt", args.ckpt]
    columns = {"trained": run_eval(args, ckpt, out / "trained")}
    columns["shuffled images"] = run_eval(args, ckpt, out / "shuffled", shuffle=True)
    if args.export:
        subprocess.run([*MMPT, "export", *ckpt, "--out", str(out / "hf"), "--format", "llava"],
                       check=True)  # fmt: skip
        columns["exported LLaVA"] = run_eval(args, ["--model", str(out / "hf")], out / "export")
    rows = []
    for spec in specs:
        key = headline(spec)
        row = {"set": spec.name, "task": spec.task, "metric": key}
        row |= {name: metrics[spec.name][key] for name, metrics in columns.items()}
        row["chance"] = chance(spec)
        rows.append(row)
    names = [*columns, "chance"]
    lines = ["| set | metric | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for r in rows:
        values = " | ".join(f"{r[n]:.3f}" for n in names)
        lines.append(f"| {r['set']} | {r['metric']} | {values} |")
    table = "\n".join(lines) + "\n"
    report = {"config": args.config, "checkpoint": args.ckpt, "suite": args.suite, "rows": rows}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(table)
    print(table + f"report: {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

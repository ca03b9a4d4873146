"""``mmpt eval caption|vqa|choice|all``: VLM benchmarks, one JSON + Markdown report per run.

The model loads as ``mmpt generate`` loads it and decodes through its batched path.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mmpt.eval.vlm_sets import CHOICE_BY, SetSpec

#: The subcommands this module adds to ``mmpt eval``.
VLM_COMMANDS = ("caption", "vqa", "choice", "all")

EXAMPLES = """examples:
  mmpt eval caption -c configs/vila_stage3.yaml --ckpt runs/stage3/last.ckpt --data shards/coco
  mmpt eval vqa --model /models/my-vila --data shards/vqav2-val --prompt "{question} One word."
  mmpt eval choice --model /models/my-vila --data shards/mmbench-dev --circular
  mmpt eval all -c configs/vila_stage1.yaml --ckpt last.ckpt --suite configs/eval/vlm_suite.yaml
"""


def _model_args(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group("model (as mmpt generate)")
    g.add_argument("--model", help="export folder (mmpt export, or a transformers LLaVA folder)")
    g.add_argument("-c", "--config", action="append", help="training config(s) of --ckpt")
    g.add_argument("--ckpt", help="checkpoint (.ckpt) of the -c config")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    g.add_argument("--template", help="chat template (default: the one the model trained with)")
    g.add_argument("--system", help="system prompt")
    r = s.add_argument_group("run")
    r.add_argument("--out", help="report folder (default: <ckpt or model folder>/eval)")
    r.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    r.add_argument("--max-new-tokens", type=int, default=None, help="default: per task")
    r.add_argument("--max-samples", type=int, default=None, help="first N samples of each set")
    r.add_argument(
        "--no-java",
        action="store_true",
        help="captions: the Python PTB tokenizer port and no METEOR (fast; default: "
        "pycocoevalcap's Java tools when java is installed)",
    )
    r.add_argument(
        "--shuffle-images",
        action="store_true",
        help="control: give every sample another sample's image (a model that reads its "
        "images scores lower)",
    )


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``caption``, ``vqa``, ``choice`` and ``all`` to ``mmpt eval``'s subcommands."""
    helps = {
        "caption": "captioning (COCO Karpathy ...): CIDEr, BLEU-4, ROUGE-L over all references",
        "vqa": "open-ended VQA (VQAv2 ...): VQA accuracy with the official answer normalization",
        "choice": "multiple choice (MMBench ...): by generated letter or option likelihood",
        "all": "every set of a suite YAML: one JSON + Markdown report",
    }
    for task, help_ in helps.items():
        s = sub.add_parser(
            task,
            help=help_,
            description=help_,
            epilog=EXAMPLES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _model_args(s)
        if task == "all":
            s.add_argument("--suite", required=True, help="suite YAML (configs/eval/*.yaml)")
            continue
        s.add_argument("--data", required=True, help="the set's shards (folder, glob, URL)")
        s.add_argument("--name", help="set name in the report (default: the data folder's)")
        s.add_argument("--prompt", help="prompt template: {question}, {options}, {hint}")
        if task == "choice":
            s.add_argument("--circular", action="store_true", help="MMBench CircularEval")
            s.add_argument(
                "--by",
                choices=CHOICE_BY,
                default="generate",
                help="generate: the letter in the generated answer; likelihood: the option "
                "whose answer tokens the model finds likeliest",
            )


def specs_of(args: argparse.Namespace) -> list[SetSpec]:
    """The sets a command evaluates (a suite's, or the one of ``--data``)."""
    from mmpt.eval.suite import load_suite

    if args.task == "all":
        specs = load_suite(args.suite)
    else:
        name = args.name or Path(args.data.rstrip("/")).name or args.task
        extra = {"circular": args.circular, "by": args.by} if args.task == "choice" else {}
        specs = [SetSpec(name, args.task, args.data, args.prompt, **extra)]
    if args.max_samples is not None:
        if args.max_samples < 1:
            raise ValueError(f"--max-samples must be >= 1, got {args.max_samples}")
        for spec in specs:
            spec.max_samples = min(spec.max_samples or args.max_samples, args.max_samples)
    return specs


def _check(args: argparse.Namespace, overrides: list[str]) -> None:
    from mmpt.generate_cli import check_model_source

    check_model_source(args, overrides)
    if args.batch_size < 1 or (args.max_new_tokens is not None and args.max_new_tokens < 1):
        raise ValueError("--batch-size and --max-new-tokens must be >= 1")


def run_vlm(args: argparse.Namespace, overrides: list[str]) -> int:
    """Run ``mmpt eval caption|vqa|choice|all``; returns the exit code.

    Every set is read and checked first, then the model loads, then each set is generated
    and scored; prints the table and the report paths.
    """
    from rich import progress as bar

    from mmpt.datamodules.templates import get_template
    from mmpt.eval.suite import evaluate_set, markdown_table, write_suite_report
    from mmpt.eval.vlm_sets import read_set
    from mmpt.eval.vlm_tasks import rotated_items
    from mmpt.generate import Decoding, Generator
    from mmpt.generate_cli import load_model

    _check(args, overrides)
    if args.template is not None:
        get_template(args.template, "--template")
    specs = specs_of(args)
    flag = "--data" if args.task != "all" else f"--suite {args.suite}: data"
    sets = [(spec, read_set(spec, flag)) for spec in specs]  # bad sets fail before loading
    gen = Generator(load_model(args, overrides), args.template, args.system)
    decoding = None if args.max_new_tokens is None else Decoding(args.max_new_tokens)
    results = []
    columns = [
        bar.TextColumn("[bold]{task.description}"),
        bar.BarColumn(),
        bar.MofNCompleteColumn(),
    ]
    with bar.Progress(*columns, bar.TimeElapsedColumn(), transient=True) as progress:
        for spec, samples in sets:
            task = progress.add_task(spec.name, total=len(rotated_items(spec, samples)))
            results.append(
                evaluate_set(
                    gen,
                    spec,
                    samples,
                    decoding,
                    args.batch_size,
                    shuffle_images=args.shuffle_images,
                    on_batch=lambda n, t=task: progress.advance(t, n),
                    java=False if args.no_java else None,
                )
            )
    where = Path(args.ckpt).resolve().parent if args.ckpt else Path(args.model)
    out = Path(args.out) if args.out else where / "eval"
    name = args.task if args.task != "all" else Path(args.suite).stem
    name += "_shuffled" if args.shuffle_images else ""
    paths = write_suite_report(
        results,
        out,
        name,
        model=args.model,
        checkpoint=args.ckpt,
        config=args.config,
        shuffle_images=args.shuffle_images,
    )
    print(markdown_table(results), end="")
    for r in results:
        empty = sum(not rec["output"] for rec in r.records)
        print(f"{r.spec.name}: {len(r.records)} prompts, {empty} empty outputs")
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0

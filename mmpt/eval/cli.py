"""``mmpt eval <task>``: evaluate a model, write JSON + PNG.

Tasks: retrieval, zeroshot, mcq, probe, mir (:mod:`mmpt.eval.mir_cli`), univl
(:mod:`mmpt.eval.univl_cli`), the VLM benchmarks caption, vqa, choice, all
(:mod:`mmpt.eval.vlm_cli`), asr (CTC checkpoints and speech LLMs, :mod:`mmpt.eval.asr_cli`),
translate (:mod:`mmpt.eval.speech_llm`) and the dense tasks segment, detect
(:mod:`mmpt.eval.dense_cli`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mmpt.cli_args import Parser
from mmpt.datamodules.video import VIDEO_BACKENDS
from mmpt.eval.applicable import require_task
from mmpt.eval.asr_cli import add_asr_parser, run_asr
from mmpt.eval.callback import write_reports
from mmpt.eval.dense_cli import DENSE_TASKS, add_dense_parsers, run_dense
from mmpt.eval.embed import EmbeddingAccumulator, evaluate
from mmpt.eval.mir_cli import add_mir_args, check_mir_args, report_mir
from mmpt.eval.modality import item_counts, media_of
from mmpt.eval.probe_cli import add_parser as add_probe_parser
from mmpt.eval.probe_cli import run_probe
from mmpt.eval.report import print_metrics, write_json
from mmpt.eval.speech_llm import add_translate_parser, run_translate
from mmpt.eval.univl_cli import add_univl_args, run_univl
from mmpt.eval.vlm_cli import VLM_COMMANDS, run_vlm
from mmpt.eval.vlm_cli import add_parsers as add_vlm_parsers
from mmpt.eval.zeroshot_setup import DEFAULT_TEMPLATES, classes_from_names, zeroshot_setup


def _common_args(s: argparse.ArgumentParser, batch_size: int) -> None:
    """Arguments every ``mmpt eval`` task takes: config, checkpoint, data, output, device."""
    s.add_argument(
        "-c",
        "--config",
        action="append",
        required=True,
        help="the training config(s) the checkpoint was made with (compose like fit), or the "
        "run's saved config.yaml",
    )
    s.add_argument("--ckpt", required=True, help="checkpoint (.ckpt) to evaluate")
    s.add_argument(
        "--data",
        default=None,
        help="evaluation shards: folder, file, pattern or URL (default: the config's data.val, "
        "else data.test)",
    )
    s.add_argument("--out", default=None, help="report folder (default: <ckpt folder>/eval)")
    s.add_argument("--batch-size", type=int, default=batch_size)
    s.add_argument("--num-workers", type=int, default=2)
    s.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="mmpt eval", description=__doc__)
    sub = p.add_subparsers(
        dest="task",
        required=True,
    )
    for task, help_ in (
        ("retrieval", "zero-shot image<->text retrieval: R@1/5/10 both ways, mean/median rank"),
        ("zeroshot", "zero-shot classification with prompt ensembling: top-1/5, per-class recall"),
    ):
        s = sub.add_parser(task, help=help_, description=help_)
        _common_args(s, batch_size=256)
        s.add_argument(
            "--text-key",
            default=None,
            help="caption field, e.g. 'json:captions' (default: the shards' index.json "
            "meta.text_key,"
            " else data.val_text_key)",
        )
        s.add_argument(
            "--label-key",
            default=None,
            help="class field: an id or a class name, e.g. 'json:class' (default: data.label_key)",
        )
        s.add_argument(
            "--classnames",
            default=None,
            help="text file, one class name a line, line i = class id i (default: index.json "
            "meta.zeroshot, else the class names the labels hold)",
        )
        s.add_argument(
            "--templates",
            default=None,
            help="text file, one prompt template a line, '{}' = class name (default: index.json "
            f"meta.zeroshot, else {DEFAULT_TEMPLATES[0]!r})",
        )
    help_ = "EgoMCQ: pick the clip (of 5) a narration describes; inter/intra-video accuracy"
    s = sub.add_parser("mcq", help=help_, description=help_)
    _common_args(s, batch_size=8)
    s.add_argument("--num-frames", type=int, default=16, help="frames per clip (EgoVLP: 16)")
    s.add_argument("--backend", default="decord", choices=VIDEO_BACKENDS)
    s.add_argument(
        "--type-names",
        default=None,
        help='type id -> name, e.g. \'{"1": "inter", "2": "intra"}\' '
        "(default: the shards' meta.mcq_types)",
    )
    help_ = "EPIC-KITCHENS-100 multi-instance retrieval: mAP and nDCG, video->text and back"
    s = sub.add_parser("mir", help=help_, description=help_)
    _common_args(s, batch_size=8)
    add_mir_args(s)
    s.set_defaults(label_key=None)
    help_ = "UniVL: video->text captions (CIDEr ...) and text->video R@k, alignment re-ranking"
    s = sub.add_parser("univl", help=help_, description=help_)
    _common_args(s, batch_size=64)
    add_univl_args(s)
    add_probe_parser(sub)
    add_vlm_parsers(sub)
    add_asr_parser(sub)  # CTC checkpoints and speech LLMs
    add_translate_parser(sub)
    add_dense_parsers(sub, _common_args)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mmpt eval``; returns an exit code (2 for bad input)."""
    args, overrides = _parser().parse_known_args(argv)
    from mmpt.user_errors import run_reporting_errors

    return run_reporting_errors(lambda: _run(args, overrides))


def _build(args: argparse.Namespace, overrides: list[str]) -> tuple[Any, Any]:
    """The model (checkpoint loaded) and datamodule of the training config."""
    from mmpt.models.module import load_checkpoint
    from mmpt.run_config import build_from_config

    if not Path(args.ckpt).is_file():
        raise FileNotFoundError(f"--ckpt: no checkpoint at {args.ckpt!r}")
    cli = build_from_config(args.config, overrides)
    require_task(cli.model, args.task, args.ckpt)  # before reading the checkpoint
    load_checkpoint(cli.model, args.ckpt)
    return cli.model, cli.datamodule


def _device(name: str) -> torch.device:
    return torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    )


def _progress() -> Progress:
    columns = [
        TextColumn("[bold]embedding"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    ]
    return Progress(*columns, transient=True)


def _print_paths(paths: dict[str, Path]) -> None:
    console = Console()
    for kind, path in paths.items():
        console.print(f"{kind}: {path}")


def _out_dir(args: argparse.Namespace) -> Path:
    return Path(args.out) if args.out else Path(args.ckpt).resolve().parent / "eval"


def _run(args: argparse.Namespace, overrides: list[str]) -> int:
    if args.task in VLM_COMMANDS:
        return run_vlm(args, overrides)
    if args.task == "asr":
        return run_asr(args, overrides)
    if args.task == "translate":
        return run_translate(args, overrides)
    if args.task == "probe":
        if overrides:
            raise ValueError(f"unknown arguments for eval probe: {' '.join(overrides)}")
        return run_probe(args, _device(args.device))
    if args.task == "mcq":
        return _run_mcq(args, overrides)
    if args.task == "univl":
        model, dm = _build(args, overrides)
        return run_univl(args, model, dm, _device(args.device), _out_dir(args))
    if args.task in DENSE_TASKS:
        model, dm = _build(args, overrides)
        run_dense(args, model, dm, _device(args.device))
        return 0
    from lightning.fabric.utilities.apply_func import move_data_to_device

    from mmpt.datamodules.key_check import peek_samples, require_fields
    from mmpt.datamodules.loader import make_loader
    from mmpt.datamodules.skip_log import SkipLog
    from mmpt.models.contrastive import text_owner
    from mmpt.run_config import eval_stream_config

    relevancy = check_mir_args(args) if args.task == "mir" else None  # before the model loads
    model, dm = _build(args, overrides)
    if args.text_key:
        dm.val_text_key = args.text_key
    if args.label_key:
        dm.label_key = args.label_key
    dm.val_batch_size = args.batch_size
    cfg, field, data = eval_stream_config(dm, args.data)
    where = f"{field} ({data})"
    sources = cfg.sources(field)
    meta = sources[0].meta
    # Checked on the first samples, before the long part.
    samples = peek_samples([u for source in sources for u in source.urls])
    text_flag = "--text-key" if args.text_key else "--text-key (data.val_text_key)"
    if not args.text_key and isinstance((meta or {}).get("text_key"), str):
        # the shards name their caption field (e.g. retrieval sets: every caption of an image)
        dm.val_text_key, text_flag = meta["text_key"], "--text-key (the shards' index.json)"
    require_fields(samples, {text_flag: dm.val_text_key}, where)
    zeroshot = None
    if args.task == "zeroshot":
        zeroshot = zeroshot_setup(args, meta, samples, dm.label_key, where)
        dm.classnames = zeroshot["classnames"]  # None: the classes the labels name
    stream = dm.stream(cfg, train=False, field=field)
    stream.where = where
    # mir: one worker keeps the shard order, which is the order of the relevancy rows
    loader = make_loader(
        stream, min(args.num_workers, 1) if relevancy is not None else args.num_workers
    )
    device = _device(args.device)
    model.to(device).eval()

    acc, skips, names = EmbeddingAccumulator(), SkipLog(), []
    total = _safe_len(loader)
    with _progress() as bar, torch.no_grad():
        task = bar.add_task("eval", total=total)
        for batch in loader:
            skips.record("eval", 0, batch)
            batch = dm.normalize(move_data_to_device(batch, device))
            img, txt = model(batch)  # images, audio or video clips (B, D); captions (M, D)
            owner = getattr(batch, "text_to_video", None)
            labels = getattr(batch, "labels", None)  # video-text batches have none
            if labels is None:
                labels = torch.full((img.shape[0],), -1, dtype=torch.long)
            names += getattr(batch, "label_names", None) or [""] * labels.shape[0]
            acc.add(
                {
                    "image_emb": img,
                    "text_emb": txt,
                    "text_to_image": (text_owner(batch) if owner is None else owner).cpu(),
                    "labels": labels,
                }
            )
            bar.advance(task)
    skips.flush()
    if not len(acc):
        raise ValueError(f"{where}: no evaluation sample could be read (see the skips above)")
    emb = acc.result()
    if zeroshot is not None and zeroshot["classnames"] is None:  # classes from the labels
        zeroshot["classnames"], emb.labels = classes_from_names(names, emb.labels)
    tokenizer = model.preprocess.tokenizer

    def encode_text(prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return model.encode_text(tokenizer(prompts).to(device)).float().cpu()

    if relevancy is not None:
        out = _out_dir(args)
        context = {"checkpoint": str(args.ckpt), "data": data}
        metrics, paths = report_mir(
            args, emb.image, emb.text, relevancy, encode_text, out, **context
        )
        print_metrics(metrics, title=f"mmpt eval mir: {data}")
        _print_paths(paths)
        return 0
    media = media_of(model)
    result = evaluate(emb, encode_text, zeroshot, retrieval=args.task == "retrieval", media=media)
    if args.task == "zeroshot" and not result.metrics:
        raise ValueError(f"no labelled samples for zero-shot classification ({dm.label_key})")
    context: dict[str, Any] = {}
    if zeroshot is not None:
        context["classnames"] = zeroshot["classnames"]
        context["num_labelled"] = int((emb.labels >= 0).sum())
    paths = write_reports(
        result,
        _out_dir(args),
        args.task,
        checkpoint=str(args.ckpt),
        data=data,
        **item_counts(media, emb.image.shape[0], emb.text.shape[0]),
        **context,
    )
    print_metrics(result.metrics, title=f"mmpt eval {args.task}: {data}")
    _print_paths(paths)
    return 0


def _run_mcq(args: argparse.Namespace, overrides: list[str]) -> int:
    from mmpt.datamodules.loader import make_loader
    from mmpt.eval.mcq import evaluate_mcq, mcq_stream, parse_type_names, plot_mcq_accuracy

    if not args.data:
        raise ValueError("--data: give the EgoMCQ shards (mmpt data synth --kind video-text)")
    model, _ = _build(args, overrides)
    pre = model.preprocess
    if args.num_frames < 1:
        raise ValueError(f"--num-frames must be >= 1, got {args.num_frames}")
    stream = mcq_stream(
        args.data, pre.tokenizer, pre.image, args.num_frames, args.backend, args.batch_size
    )
    type_names = parse_type_names(args.type_names, stream.sources[0].meta)  # before the work
    loader = make_loader(stream, args.num_workers)
    device = _device(args.device)
    model.to(device).eval()
    with _progress() as bar:
        task = bar.add_task("eval", total=_safe_len(loader))
        result = evaluate_mcq(
            model, loader, type_names, pre.image, device, on_batch=lambda: bar.advance(task)
        )
    out = _out_dir(args)
    context = {
        "checkpoint": str(args.ckpt),
        "data": args.data,
        "num_frames": args.num_frames,
        "backend": args.backend,
        "type_names": type_names,
    }
    paths = {
        "json": write_json(out / "mcq.json", result.metrics, **context),
        "accuracy_plot": plot_mcq_accuracy(result.metrics, out / "mcq_accuracy.png"),
    }
    print_metrics(result.metrics, title=f"mmpt eval mcq: {args.data}")
    _print_paths(paths)
    return 0


def _safe_len(loader: torch.utils.data.DataLoader) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None

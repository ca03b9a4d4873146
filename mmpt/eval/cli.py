"""``mmpt eval {retrieval,zeroshot,mcq,probe}``: evaluate a checkpoint, write JSON + PNG."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mmpt.datamodules.video import VIDEO_BACKENDS
from mmpt.eval.callback import write_reports
from mmpt.eval.embed import EmbeddingAccumulator, evaluate
from mmpt.eval.probe_cli import add_parser as add_probe_parser
from mmpt.eval.probe_cli import run_probe
from mmpt.eval.report import print_metrics, write_json
from mmpt.safe_load import add_unsafe_load_flag


def _common_args(s: argparse.ArgumentParser, batch_size: int) -> None:
    """Arguments every ``mmpt eval`` task takes: config, checkpoint, data, output, device."""
    s.add_argument(
        "-c",
        "--config",
        action="append",
        required=True,
        help="the training config(s) the checkpoint was made with (compose like fit)",
    )
    s.add_argument("--ckpt", required=True, help="checkpoint (.ckpt) to evaluate")
    s.add_argument("--data", required=True, help="evaluation shards: folder, file, pattern or URL")
    s.add_argument("--out", default=None, help="report folder (default: <ckpt folder>/eval)")
    s.add_argument("--batch-size", type=int, default=batch_size)
    s.add_argument("--num-workers", type=int, default=2)
    s.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    add_unsafe_load_flag(s)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmpt eval", description=__doc__)
    sub = p.add_subparsers(dest="task", required=True, metavar="{retrieval,zeroshot,mcq,probe}")
    for task, help_ in (
        ("retrieval", "zero-shot image<->text retrieval: R@1/5/10 both ways, mean/median rank"),
        ("zeroshot", "zero-shot classification with prompt ensembling: top-1/5, per-class recall"),
    ):
        s = sub.add_parser(task, help=help_, description=help_)
        _common_args(s, batch_size=256)
        s.add_argument(
            "--text-key",
            default=None,
            help="caption field, e.g. 'json:captions' (default: data.val_text_key)",
        )
        s.add_argument("--classnames", default=None, help="text file, one class name a line")
        s.add_argument("--templates", default=None, help="text file, one prompt template a line")
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
    add_probe_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mmpt eval``; returns an exit code (2 for bad input)."""
    args, overrides = _parser().parse_known_args(argv)
    from mmpt.cli import data_error_message
    from mmpt.datamodules.stages import DataError

    try:
        return _run(args, overrides)
    except DataError as e:
        print(f"error: {data_error_message(e)}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _build(args: argparse.Namespace, overrides: list[str]) -> tuple[Any, Any]:
    """The model (checkpoint loaded) and datamodule of the training config."""
    from mmpt.cli import build_cli
    from mmpt.models.module import load_checkpoint

    if not Path(args.ckpt).is_file():
        raise FileNotFoundError(f"--ckpt: no checkpoint at {args.ckpt!r}")
    cli_args = [a for c in args.config for a in ("-c", c)] + ["--trainer.logger=false", *overrides]
    cli = build_cli(cli_args, run=False)
    load_checkpoint(cli.model, args.ckpt, unsafe=args.unsafe_load or None)
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
    if args.task == "probe":
        if overrides:
            raise ValueError(f"unknown arguments for eval probe: {' '.join(overrides)}")
        return run_probe(args, _device(args.device))
    if args.task == "mcq":
        return _run_mcq(args, overrides)
    from lightning.fabric.utilities.apply_func import move_data_to_device

    from mmpt.datamodules.loader import make_loader
    from mmpt.datamodules.streams import StreamConfig
    from mmpt.models.contrastive import text_owner

    model, dm = _build(args, overrides)
    if args.text_key:
        dm.val_text_key = args.text_key
    dm.val_batch_size = args.batch_size
    cfg = StreamConfig(urls=args.data, shuffle_buffer=0, shuffle_shards=False)
    stream = dm.stream(cfg, train=False, field="--data")
    zeroshot = _zeroshot_meta(args, stream.sources[0].meta)  # checked before the long part
    if args.task == "zeroshot" and zeroshot is None:
        raise ValueError(
            "no class names/templates: the shards' index.json has no meta.zeroshot; "
            "pass --classnames FILE and --templates FILE"
        )
    loader = make_loader(stream, args.num_workers)
    device = _device(args.device)
    model.to(device).eval()

    acc = EmbeddingAccumulator()
    total = _safe_len(loader)
    with _progress() as bar, torch.no_grad():
        task = bar.add_task("eval", total=total)
        for batch in loader:
            batch = dm.normalize(move_data_to_device(batch, device))
            img = model.encode_media(batch)  # images or audio clips
            txt = model.encode_text(batch.text_tokens)
            acc.add(
                {
                    "image_emb": img,
                    "text_emb": txt,
                    "text_to_image": text_owner(batch).cpu(),
                    "labels": batch.labels,
                }
            )
            bar.advance(task)
    emb = acc.result()
    tokenizer = model.preprocess.tokenizer

    def encode_text(prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return model.encode_text(tokenizer(prompts).to(device)).float().cpu()

    result = evaluate(
        emb,
        encode_text,
        zeroshot if args.task == "zeroshot" else None,
        retrieval=args.task == "retrieval",
    )
    if args.task == "zeroshot" and not result.metrics:
        raise ValueError("no labelled samples for zero-shot classification (data.label_key)")
    paths = write_reports(
        result,
        _out_dir(args),
        args.task,
        checkpoint=str(args.ckpt),
        data=args.data,
        num_images=emb.image.shape[0],
        num_texts=emb.text.shape[0],
    )
    print_metrics(result.metrics, title=f"mmpt eval {args.task}: {args.data}")
    _print_paths(paths)
    return 0


def _run_mcq(args: argparse.Namespace, overrides: list[str]) -> int:
    from mmpt.datamodules.loader import make_loader
    from mmpt.eval.mcq import evaluate_mcq, mcq_stream, parse_type_names, plot_mcq_accuracy

    model, _ = _build(args, overrides)
    if not (hasattr(model, "encode_video") and hasattr(model, "encode_text")):
        raise ValueError(
            f"{type(model).__name__} has no encode_video/encode_text: eval mcq needs a "
            "video-text model (mmpt.models.video_text.VideoTextModule)"
        )
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


def _zeroshot_meta(args: argparse.Namespace, meta: dict) -> dict | None:
    if args.classnames or args.templates:
        if not (args.classnames and args.templates):
            raise ValueError("--classnames and --templates go together")
        return {
            "classnames": _lines(args.classnames),
            "templates": _lines(args.templates),
        }
    zs = meta.get("zeroshot")
    return json.loads(json.dumps(zs)) if zs else None


def _lines(path: str) -> list[str]:
    lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"{path} is empty")
    return lines


def _safe_len(loader: torch.utils.data.DataLoader) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None

"""``mmpt data score``, ``dedup`` and ``filter``: their flags and runners."""

from __future__ import annotations

import argparse
import json
from typing import Any

from mmpt.curation.dedup import METHODS


def add_parsers(sub: Any) -> None:
    """Add ``score``, ``dedup`` and ``filter`` to the ``mmpt data`` subparsers."""
    help_ = (
        "per-sample scores as a Lightning predict job: CLIP score (image-caption cosine) or "
        "a VLM's judgement / caption likelihood (--kind vlm --prompt YAML)"
    )
    s = sub.add_parser("score", help=help_, description=help_)
    s.add_argument("--kind", choices=("clip", "vlm"), default="clip", help="default clip")
    s.add_argument("-c", "--config", action="append", help="the model's training config(s)")
    s.add_argument("--ckpt", help="checkpoint of the -c config")
    s.add_argument(
        "--model",
        help="clip: open_clip model folder (open_clip_config.json + weights: an OpenCLIP hub "
        "repo, or `mmpt export --format open_clip`), instead of -c/--ckpt; vlm: export folder "
        "(mmpt export, or a transformers LLaVA one)",
    )
    s.add_argument("--prompt", help="vlm: prompt YAML (configs/curation/mlm_filter.yaml)")
    s.add_argument("--template", help="vlm: chat template (default: the model's own)")
    s.add_argument("--system", help="vlm: system prompt")
    s.add_argument("--from", dest="source", required=True, help="shards to score")
    s.add_argument("--out", required=True, help="score folder: one parquet file per shard")
    s.add_argument(
        "--name", default=None, help="score column (clip; default clip) or prefix (vlm; mlm)"
    )
    s.add_argument(
        "--text-key",
        default=None,
        help="caption field (clip: the config's, txt;json:caption with --model; vlm: "
        "txt;json:caption)",
    )
    s.add_argument("--image-key", default=None, help="vlm: image member (default jpg/png/webp)")
    s.add_argument("--batch-size", type=int, default=None, help="per rank (vlm default 8)")
    s.add_argument("--num-workers", type=int, default=None)
    s.add_argument("--accelerator", default="auto", help="auto, cpu or gpu")

    help_ = "mark exact / perceptual-hash / embedding near-duplicates: a score table"
    d = sub.add_parser("dedup", help=help_, description=help_)
    d.add_argument("--from", dest="source", required=True, help="shards to deduplicate")
    d.add_argument("--out", required=True, help="score folder: writes dedup.parquet")
    d.add_argument("--method", choices=METHODS, default="phash")
    d.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="similarity at which two samples are duplicates: phash 1 - hamming/64 (default "
        "0.9), embedding cosine (0.95); exact ignores it",
    )
    d.add_argument(
        "--against", default=None, help="also mark samples that duplicate this (evaluation) set"
    )
    d.add_argument("--embeddings", default=None, help="embedding: `mmpt predict` folder of --from")
    d.add_argument(
        "--against-embeddings", default=None, help="embedding: `mmpt predict` folder of --against"
    )
    d.add_argument("--image-key", default=None, help="image member (default: jpg/jpeg/png/webp)")

    help_ = "keep the samples a boolean expression over score tables selects; re-shard them"
    f = sub.add_parser("filter", help=help_, description=help_)
    f.add_argument("--from", dest="sources", nargs="+", required=True, help="shard sources")
    f.add_argument("--scores", nargs="+", required=True, help="score folders or parquet files")
    f.add_argument(
        "--keep",
        required=True,
        help='expression, e.g. "clip >= 0.28 and not duplicate", "top(clip, 0.3)"',
    )
    f.add_argument("--out", required=True, help="output shard folder")
    f.add_argument("--samples-per-shard", type=int, default=10000)
    f.add_argument(
        "--quota",
        action="append",
        default=[],
        metavar="SOURCE=N",
        help="keep at most N samples of a source (its folder name); repeatable",
    )
    f.add_argument("--rank-by", default=None, help="column that picks the best under a quota")


def _quotas(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if not name or not value.isdigit():
            raise ValueError(f"--quota {item!r}: write SOURCE=N, e.g. --quota laion=100000")
        out[name] = int(value)
    return out


def run_dedup(args: argparse.Namespace) -> int:
    """``mmpt data dedup``."""
    from mmpt.curation.dedup import dedup

    counts = dedup(
        args.source,
        args.out,
        args.method,
        args.threshold,
        args.against,
        args.embeddings,
        args.against_embeddings,
        args.image_key,
    )
    print(f"mmpt data dedup ({args.method}): {json.dumps(counts)} -> {args.out}/dedup.parquet")
    return 0


def run_filter(args: argparse.Namespace) -> int:
    """``mmpt data filter``; exit 1 when nothing is kept."""
    from mmpt.curation.filter import filter_shards

    report = filter_shards(
        args.sources,
        args.scores,
        args.keep,
        args.out,
        args.samples_per_shard,
        _quotas(args.quota),
        args.rank_by,
    )
    print(f"mmpt data filter: kept {report.kept} -> {args.out}")
    for reason, count in report.dropped.most_common():
        print(f"  dropped {count}: {reason}")
    return 0 if report.kept else 1


def run_score(args: argparse.Namespace) -> int:
    """``mmpt data score``: CLIP score with ``--model DIR`` or ``-c CONFIG --ckpt CKPT``."""
    if args.kind == "vlm":
        return _run_vlm_score(args)
    from mmpt.curation.score import score_shards

    if args.prompt:
        raise ValueError("--prompt is for --kind vlm")
    if args.model is not None and (args.config or args.ckpt is not None):
        raise ValueError("--kind clip: give --model DIR or -c CONFIG --ckpt CKPT, not both")
    if args.model is None and (not args.config or args.ckpt is None):
        raise ValueError(
            "--kind clip scores with --model DIR (an open_clip model folder) or "
            "-c CONFIG --ckpt CKPT (an mmpt training run)"
        )
    model, datamodule = _open_clip_model(args) if args.model else _config_model(args)
    shards = score_shards(
        model,
        datamodule,
        args.source,
        args.out,
        args.name or "clip",
        args.accelerator,
        args.batch_size,
        args.num_workers,
    )
    print(f"mmpt data score: {shards} shard(s) scored -> {args.out}")
    return 0


def _config_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """``-c CONFIG --ckpt CKPT`` as (its contrastive model with the weights, its datamodule)."""
    from pathlib import Path

    from mmpt.eval.applicable import require_task
    from mmpt.models.module import load_checkpoint
    from mmpt.run_config import build_from_config

    if not Path(args.ckpt).is_file():
        raise FileNotFoundError(f"--ckpt: no checkpoint at {args.ckpt!r}")
    cli = build_from_config(args.config, [])
    require_task(cli.model, "retrieval", args.ckpt)  # a contrastive model, before reading it
    load_checkpoint(cli.model, args.ckpt)
    if args.text_key is not None:
        cli.datamodule.val_text_key = args.text_key
    return cli.model, cli.datamodule


def _open_clip_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """The ``--model`` open_clip folder as (ContrastiveModule, ImageTextDataModule)."""
    from mmpt.curation.clip_model import load_open_clip_folder, open_clip_datamodule

    model = load_open_clip_folder(args.model)
    return model, open_clip_datamodule(model, args.text_key)


def _run_vlm_score(args: argparse.Namespace) -> int:
    """``mmpt data score --kind vlm``: the model loads as ``mmpt generate`` loads it."""
    import os

    import torch

    from mmpt.curation.vlm_prompt import load_prompt
    from mmpt.curation.vlm_score import score_vlm
    from mmpt.generate_cli import check_model_source, load_model

    check_model_source(args, [])
    if args.prompt is None:
        raise ValueError("--kind vlm needs --prompt YAML (e.g. configs/curation/mlm_filter.yaml)")
    prompt = load_prompt(args.prompt)  # a bad YAML fails before the model loads
    if (args.batch_size is not None and args.batch_size < 1) or (args.num_workers or 0) < 0:
        raise ValueError("--batch-size must be >= 1 and --num-workers >= 0")
    cuda = args.accelerator != "cpu" and torch.cuda.is_available()
    args.device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu"
    model = load_model(args, [])
    shards = score_vlm(
        model,
        prompt,
        args.source,
        args.out,
        args.name or "mlm",
        args.accelerator,
        args.batch_size or 8,
        args.num_workers or 0,
        args.template,
        args.system,
        args.image_key,
        args.text_key or "txt;json:caption",
    )
    print(f"mmpt data score: {shards} shard(s) scored -> {args.out} ({prompt.mode})")
    return 0

"""``mmpt data``: make synthetic shards, build shards from raw files, index and inspect shards."""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from mmpt.data_args import data_parser
from mmpt.shards.audio_build import build_audio_text_shards
from mmpt.shards.build import build_image_text_shards
from mmpt.shards.coco_caption import build_coco_caption_shards
from mmpt.shards.grounding import build_grounding_shards
from mmpt.shards.imagefolder import build_classification_shards
from mmpt.shards.interleaved_build import build_interleaved_shards
from mmpt.shards.karpathy import build_retrieval_shards
from mmpt.shards.llava import build_conversation_shards
from mmpt.shards.mcq_table import build_mcq_shards
from mmpt.shards.multispectral_build import build_multispectral_shards
from mmpt.shards.rs_dense_build import build_rs_dense_shards
from mmpt.shards.torchgeo_build import build_torchgeo_shards
from mmpt.shards.video_build import build_video_text_shards
from mmpt.shards.vqav2 import build_vqav2_shards
from mmpt.synth import SYNTH_KINDS
from mmpt.user_errors import debug_enabled

#: ``mmpt data build --kind`` -> builder(source, out, **options). Later modalities add a line.
BUILD_KINDS: dict[str, Callable[..., Any]] = {
    "image-text": build_image_text_shards,
    "video-text": build_video_text_shards,
    "multispectral": build_multispectral_shards,
    "torchgeo": build_torchgeo_shards,
    "audio-text": build_audio_text_shards,
    "conversation": build_conversation_shards,
    "interleaved": build_interleaved_shards,
    "retrieval": build_retrieval_shards,
    "classification": build_classification_shards,
    "coco-caption": build_coco_caption_shards,
    "vqav2": build_vqav2_shards,
    "mcq": build_mcq_shards,
    "grounding": build_grounding_shards,
    "rs-dense": build_rs_dense_shards,
}
#: Kinds whose --from and --images may be given several times (shards of one data set).
_SEVERAL = ("conversation", "interleaved", "vqav2")

#: Option names whose flag is not ``--`` + the name with dashes.
_FLAGS = {
    "images_root": "--images",
    "videos_root": "--videos",
    "audio_root": "--audio",
    "masks_root": "--masks",
}


def _options(fn: Callable[..., Any], kind: str, given: dict[str, Any]) -> dict[str, Any]:
    """Keep the flags the user set; reject those the kind's function does not take."""
    options = {k: v for k, v in given.items() if v is not None and v is not False}
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return options
    unknown = [_FLAGS.get(k, "--" + k.replace("_", "-")) for k in options if k not in params]
    if unknown:
        raise ValueError(f"{', '.join(unknown)} does not apply to --kind {kind}")
    return options


def _lookup(table: dict[str, Callable[..., Any]], kind: str, command: str) -> Callable[..., Any]:
    if kind not in table:
        raise ValueError(
            f"unknown --kind {kind!r} for `mmpt data {command}`; known kinds: {', '.join(table)}"
        )
    return table[kind]


def _synth(args: argparse.Namespace) -> int:
    fn = _lookup(SYNTH_KINDS, args.kind, "synth")
    given = {
        "seed": args.seed,
        "train_samples": args.train_samples,
        "val_samples": args.val_samples,
        "test_samples": args.test_samples,
        "sensor": args.sensor,
        "mcq_samples": args.mcq_samples,
        "image_size": args.image_size,
        "eval_samples": args.eval_samples,
        "qa_samples": args.qa_samples,
        "num_frames": args.num_frames,
        "fps": args.fps,
        "samples_per_shard": args.samples_per_shard,
        "min_images": args.min_images,
        "max_images": args.max_images,
        "sample_rate": args.sample_rate,
        "spoken": args.spoken,
        "feature_dim": args.feature_dim,
        "noise": args.noise,
        "raw_clips": args.raw_clips,
        "language": args.language,
        "unlabelled": args.unlabelled,
        "shapes_per_image": args.shapes_per_image,
        "overwrite": args.overwrite,
    }
    result = fn(args.out, **_options(fn, args.kind, given))
    print(f"wrote {args.kind} synthetic data to {args.out}")
    for split in ("train", "val", "test", "mcq", "qa", "eval_caption", "eval_vqa", "eval_choice"):
        if split in result:
            n, shards = result.get(f"{split}_samples", "?"), result.get(f"{split}_shards", "?")
            print(f"  {split}: {n} samples in {shards} shard(s) at {result[split]}")
    for name in ("tokenizer", "text_encoder"):
        if name in result:
            print(f"  {name}: {result[name]}")
    return 0


def _build(args: argparse.Namespace) -> int:
    fn = _lookup(BUILD_KINDS, args.kind, "build")
    for flag, values in (("--from", args.source), ("--images", args.images_root or [])):
        if len(values) > 1 and args.kind not in _SEVERAL:
            raise ValueError(
                f"{flag} is given {len(values)} times; only --kind "
                f"{', '.join(_SEVERAL[:-1])} and {_SEVERAL[-1]} take several"
            )
    source = args.source[0] if len(args.source) == 1 else args.source
    roots = args.images_root
    given = {
        "images_root": roots[0] if roots and len(roots) == 1 else roots,
        "pairs": args.pairs,
        "min_sim": args.min_sim,
        "images_from_bytes": args.images_from_bytes,
        "split": args.split,
        "dataset": args.dataset,
        "classnames": args.classnames,
        "videos_root": args.videos_root,
        "audio_root": args.audio_root,
        "reencode_short": args.reencode_short,
        "nouns": args.nouns,
        "verbs": args.verbs,
        "samples_per_shard": args.samples_per_shard,
        "image_column": args.image_column,
        "caption_column": args.caption_column,
        "audio_column": args.audio_column,
        "text_column": args.text_column,
        "resample": args.resample,
        "resize_short_side": args.resize_short_side,
        "jpeg_quality": args.jpeg_quality,
        "workers": args.workers,
        "sensor": args.sensor,
        "format": args.format,
        "size": args.size,
        "masks_root": args.masks_root,
        "overwrite": args.overwrite,
    }
    options = _options(fn, args.kind, given)
    report = fn(source, args.out, progress=not args.no_progress, **options)
    print(f"wrote {report.written} samples in {len(report.shards)} shard(s) to {report.out}")
    if getattr(report, "clamped", 0):
        print(f"clamped {report.clamped} window(s) reaching past the end of their video (kept)")
    if report.total_skipped:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(report.skipped.items()))
        print(f"skipped {report.total_skipped}: {reasons}")
        for item in report.skipped_examples:
            print(f"  {item['reason']}: {item['source']} ({item['detail']})")
    if getattr(report, "dropped", None):
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(report.dropped.items()))
        dropped = sum(report.dropped.values())
        left = "a document left with none is also skipped"
        print(f"dropped {dropped} image(s) from documents ({left}): {reasons}")
    if report.written == 0:
        print(f"error: no samples written from {' '.join(map(str, args.source))}", file=sys.stderr)
        return 1
    return 0


def _index(args: argparse.Namespace) -> int:
    from mmpt.shards.indexer import index_shards

    report = index_shards(args.path, out=args.out, workers=args.workers)
    if report.note:
        print(f"not using the counts beside the shards: {report.note}")
    print(
        f"indexed {report.num_samples} samples in {len(report.shards)} shard(s) "
        f"(counts from {report.source}) -> {report.index_path}"
    )
    if report.corrupt:
        print(f"{len(report.corrupt)} unreadable shard(s), left out of the index:")
        for url, error in report.corrupt:
            print(f"  {url}: {error}")
        return 1
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from mmpt.shards.inspect import inspect_shards, print_report

    report = inspect_shards(args.path, check=args.check, workers=args.workers)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print_report(report)
    return 0 if report.ok else 1


def parser() -> argparse.ArgumentParser:
    """The parser of ``mmpt data`` with every synthetic and build kind."""
    return data_parser(SYNTH_KINDS, list(BUILD_KINDS))


def main(argv: list[str] | None = None) -> int:
    """Run ``mmpt data <synth|build|index|inspect|score|dedup|filter|continue> ...``.

    Args:
        argv: Arguments after ``data``; default ``sys.argv[1:]``.

    Returns:
        Exit code: 0 on success; 1 when ``inspect`` finds problems, ``index`` finds
        unreadable shards or ``build`` writes nothing; 2 for bad arguments or input
        (printed as ``error: ...`` on stderr).

    """
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse already printed
        return e.code if isinstance(e.code, int) else 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    from mmpt.continue_cli import run_continue
    from mmpt.curation.cli import run_dedup, run_filter, run_score
    from mmpt.vocab_cli import run_vocab

    commands = {"synth": _synth, "build": _build, "index": _index, "inspect": _inspect}
    commands |= {"score": run_score, "dedup": run_dedup, "filter": run_filter}
    commands |= {"continue": run_continue, "vocab": run_vocab}
    try:
        return commands[args.command](args)
    except (OSError, RuntimeError, ValueError) as e:
        if debug_enabled():  # MMPT_DEBUG=1: the traceback
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

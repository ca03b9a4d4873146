"""``mmpt data``: make synthetic shards, build shards from raw files, index and inspect shards."""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmpt.shards.audio_build import build_audio_text_shards
from mmpt.shards.build import build_image_text_shards
from mmpt.shards.imagefolder import build_classification_shards
from mmpt.shards.interleaved_build import build_interleaved_shards
from mmpt.shards.karpathy import build_retrieval_shards
from mmpt.shards.llava import build_conversation_shards
from mmpt.shards.multispectral_build import build_multispectral_shards
from mmpt.shards.video_build import build_video_text_shards
from mmpt.synth import SYNTH_KINDS

#: ``mmpt data build --kind`` -> builder(source, out, **options). Later modalities add a line.
BUILD_KINDS: dict[str, Callable[..., Any]] = {
    "image-text": build_image_text_shards,
    "video-text": build_video_text_shards,
    "multispectral": build_multispectral_shards,
    "audio-text": build_audio_text_shards,
    "conversation": build_conversation_shards,
    "interleaved": build_interleaved_shards,
    "retrieval": build_retrieval_shards,
    "classification": build_classification_shards,
}
#: Kinds whose --from and --images may be given several times (shards of one data set).
_SEVERAL = ("conversation", "interleaved")

#: Option names whose flag is not ``--`` + the name with dashes.
_FLAGS = {"images_root": "--images", "videos_root": "--videos", "audio_root": "--audio"}

EPILOG = """examples:
  mmpt data synth --kind image-text --out data/shapes
  mmpt data synth --kind interleaved --out data/docs --max-images 3
  mmpt data synth --kind video-text --out data/clips --num-frames 16
  mmpt data synth --kind multispectral --out data/landcover --image-size 32
  mmpt data synth --kind audio-text --out data/tones --train-samples 100
  mmpt data build --from captions.csv --out shards/ --images photos/ --workers 8
  mmpt data build --kind video-text --from egoclip.tsv --videos ego4d/chunks/ \
      --out shards/egoclip --reencode-short 256 --workers 8
  mmpt data build --kind multispectral --from ssl4eo-s12/ --sensor s2_l1c \
      --out shards/ssl4eo --size 256 --workers 8
  mmpt data build --kind multispectral --from EuroSAT_MS/ --out shards/eurosat --format tif
  mmpt data build --kind audio-text --from transcripts.jsonl --audio clips/ \
      --out shards/speech --resample 16000 --workers 8
  mmpt data build --kind conversation --from llava_v1_5_mix665k.json --images /data/llava \
      --out shards/sft --workers 8
  mmpt data build --kind conversation --pairs --from blip_laion_cc_sbu_558k.json \
      --images /data/llava-pretrain --out shards/pretrain
  mmpt data build --kind interleaved --from mmc4/docs_shard_*.jsonl --images mmc4/images \
      --out shards/mmc4 --min-sim 0.24
  mmpt data build --kind interleaved --from obelics/*.parquet --images-from-bytes \
      --out shards/obelics
  mmpt data build --kind retrieval --from dataset_coco.json --images /data/coco --split test \
      --out shards/coco-test
  mmpt data build --kind classification --from /data/imagenet/val --out shards/in1k-val
  mmpt data index /data/laion-shards --workers 8
  mmpt data index 'pipe:aws s3 cp s3://bucket/shards/{00000..00999}.tar -' --out shards.json
  mmpt data inspect shards/ --check
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmpt data",
        description="Make, build and inspect WebDataset shards.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(
        dest="command", metavar="{synth,build,index,inspect}", required=True
    )

    synth = sub.add_parser("synth", help="write a learnable synthetic dataset (train/ and val/)")
    synth.add_argument(
        "--kind", required=True, metavar="KIND", help=f"dataset kind: {', '.join(SYNTH_KINDS)}"
    )
    synth.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    synth.add_argument(
        "--seed", type=int, metavar="N", help="random seed; same seed, same bytes (default 0)"
    )
    synth.add_argument(
        "--train-samples",
        type=int,
        metavar="N",
        help="training samples (default: image-text 6000, interleaved 2000, video-text 1200, "
        "audio-text 3000)",
    )
    synth.add_argument(
        "--val-samples",
        type=int,
        metavar="N",
        help="validation samples (default: interleaved 192, video-text 180, audio-text 300)",
    )
    synth.add_argument(
        "--test-samples", type=int, metavar="N", help="test samples (multispectral; 350)"
    )
    synth.add_argument(
        "--sensor", metavar="NAME", help="multispectral: s2_l1c or s2_l2a (default s2_l1c)"
    )
    synth.add_argument(
        "--mcq-samples", type=int, metavar="N", help="multiple-choice questions (video-text; 200)"
    )
    synth.add_argument(
        "--image-size", type=int, metavar="PX", help="image side in pixels (default 64)"
    )
    synth.add_argument("--num-frames", type=int, metavar="N", help="frames per clip (video; 8)")
    synth.add_argument("--fps", type=int, metavar="N", help="clip frame rate (video; 8)")
    synth.add_argument(
        "--samples-per-shard",
        type=int,
        metavar="N",
        help="samples per shard (default: image-text 1000, interleaved and video-text 500)",
    )
    synth.add_argument(
        "--min-images", type=int, metavar="N", help="fewest images per document (interleaved; 1)"
    )
    synth.add_argument(
        "--max-images", type=int, metavar="N", help="most images per document (interleaved; 4)"
    )
    synth.add_argument(
        "--sample-rate", type=int, metavar="HZ", help="audio-text: clip sample rate (16000)"
    )
    synth.add_argument(
        "--spoken", action="store_true", help="audio-text: espeak-ng speaks the captions"
    )
    synth.add_argument("--overwrite", action="store_true", help="replace shards found in --out")

    build = sub.add_parser(
        "build",
        help="raw files -> shards + index.json (image-text pairs, video-text clips, "
        "multispectral tiles)",
    )
    build.add_argument(
        "--from",
        dest="source",
        required=True,
        nargs="+",
        type=Path,
        metavar="SOURCE",
        help="a .csv/.tsv/.jsonl table or a folder of image + same-stem .txt pairs; conversation: "
        "LLaVA .json/.jsonl file(s); interleaved: MMC4 .jsonl or OBELICS-style .parquet/.jsonl "
        "file(s); retrieval: a Karpathy split .json; classification: an ImageFolder; video-text: "
        "an EgoClip-style table (video_uid, clip_start, clip_end, clip_text[, tag_noun, tag_verb, "
        "video_path, clip_uid]); multispectral: an SSL4EO-S12 root or sensor folder, class "
        "folders or a flat folder of .tif/.npy tiles; audio-text: a table with audio paths and "
        "transcripts, or a folder of audio + same-stem .txt pairs",
    )
    build.add_argument("--out", required=True, type=Path, metavar="DIR", help="output shard folder")
    kinds = ", ".join(BUILD_KINDS)
    build.add_argument(
        "--kind",
        default="image-text",
        metavar="{" + ",".join(BUILD_KINDS) + "}",
        help=f"data kind: {kinds} (default image-text)",
    )
    build.add_argument(
        "--images",
        dest="images_root",
        type=Path,
        action="append",
        metavar="DIR",
        help="root of relative image paths (conversation, interleaved: repeat to search several)",
    )
    build.add_argument(
        "--pairs",
        action="store_true",
        help="conversation: write single-image two-turn rows as image-caption pairs (stage 1)",
    )
    build.add_argument(
        "--min-sim",
        type=float,
        metavar="S",
        help="interleaved (MMC4): drop images whose matched_sim is below S (default 0.24)",
    )
    build.add_argument(
        "--images-from-bytes",
        action="store_true",
        help="interleaved (OBELICS-style): the images column holds the encoded images",
    )
    build.add_argument(
        "--split", metavar="NAME", help="retrieval: Karpathy split(s), comma-separated (test)"
    )
    build.add_argument(
        "--classnames",
        type=Path,
        metavar="FILE",
        help="classification: class names, one a line in the sorted order of the class folders",
    )
    build.add_argument(
        "--videos",
        dest="videos_root",
        type=Path,
        metavar="DIR",
        help="video-text: root of the source videos (<video_uid>.mp4 or video_path)",
    )
    build.add_argument(
        "--audio",
        dest="audio_root",
        type=Path,
        metavar="DIR",
        help="audio-text: root of relative audio paths (default: the table's folder)",
    )
    build.add_argument(
        "--reencode-short",
        type=int,
        metavar="N",
        help="video-text: scale clips so the short side is N (even; default: keep the size)",
    )
    build.add_argument(
        "--nouns", type=Path, metavar="FILE", help="video-text: noun names, one per line"
    )
    build.add_argument(
        "--verbs", type=Path, metavar="FILE", help="video-text: verb names, one per line"
    )
    build.add_argument(
        "--samples-per-shard",
        "--shard-size",
        type=int,
        metavar="N",
        help="samples per shard (default: image-text 10000, video-text 1000, multispectral 500, "
        "audio-text 2000)",
    )
    build.add_argument("--image-column", metavar="COL", help="table column holding image paths")
    build.add_argument("--caption-column", metavar="COL", help="table column holding captions")
    build.add_argument("--audio-column", metavar="COL", help="audio-text: column of audio paths")
    build.add_argument(
        "--text-column", metavar="COL", help="audio-text: column of transcripts/captions"
    )
    build.add_argument(
        "--resample",
        type=int,
        metavar="HZ",
        help="audio-text: decode, downmix to mono, resample and store as 16-bit FLAC",
    )
    build.add_argument(
        "--resize-short-side", type=int, metavar="PX", help="downscale to this short side"
    )
    build.add_argument(
        "--jpeg-quality", type=int, metavar="Q", help="quality of re-encoded JPEGs (95)"
    )
    build.add_argument(
        "--workers", type=int, metavar="N", help="decode/encode processes (default 1)"
    )
    build.add_argument(
        "--sensor",
        metavar="NAME",
        help="multispectral: s2_l1c, s2_l2a, s1 or a band list B4,B3,B2,B8 (default: inferred)",
    )
    build.add_argument(
        "--format", choices=("npy", "tif"), help="multispectral: tile file format (default npy)"
    )
    build.add_argument(
        "--size", type=int, metavar="N", help="multispectral: resize every tile to N x N"
    )
    build.add_argument("--overwrite", action="store_true", help="replace shards found in --out")
    build.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    index = sub.add_parser(
        "index",
        help="count the samples of existing shards and write their index.json",
        description="Count the samples of existing shards (tar headers, no decoding; or "
        "img2dataset's *_stats.json / open_clip's sizes.json when they agree with the first "
        "shard) and write index.json, which gives training its run length. Unreadable shards "
        "are listed and left out of the index (exit code 1).",
    )
    index.add_argument(
        "path", metavar="PATH", help="a shard folder, a .tar file or pattern, pipe: or fsspec URL"
    )
    index.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="index file to write (default: index.json beside the shards); a .json file here "
        "is itself a data source (data.train.urls: FILE), also for remote shards",
    )
    index.add_argument(
        "--workers", type=int, default=1, metavar="N", help="processes reading shards"
    )

    insp = sub.add_parser("inspect", help="count samples and keys; find corrupt samples")
    insp.add_argument("path", type=Path, help="a shard folder or a .tar file")
    insp.add_argument("--check", action="store_true", help="decode every image and json")
    insp.add_argument("--json", action="store_true", help="print the report as JSON")
    insp.add_argument(
        "--workers", type=int, default=1, metavar="N", help="processes reading shards"
    )
    return parser


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
        "num_frames": args.num_frames,
        "fps": args.fps,
        "samples_per_shard": args.samples_per_shard,
        "min_images": args.min_images,
        "max_images": args.max_images,
        "sample_rate": args.sample_rate,
        "spoken": args.spoken,
        "overwrite": args.overwrite,
    }
    result = fn(args.out, **_options(fn, args.kind, given))
    print(f"wrote {args.kind} synthetic data to {args.out}")
    for split in ("train", "val", "test", "mcq"):
        if split in result:
            n, shards = result.get(f"{split}_samples", "?"), result.get(f"{split}_shards", "?")
            print(f"  {split}: {n} samples in {shards} shard(s) at {result[split]}")
    if "tokenizer" in result:
        print(f"  tokenizer: {result['tokenizer']}")
    return 0


def _build(args: argparse.Namespace) -> int:
    fn = _lookup(BUILD_KINDS, args.kind, "build")
    for flag, values in (("--from", args.source), ("--images", args.images_root or [])):
        if len(values) > 1 and args.kind not in _SEVERAL:
            raise ValueError(
                f"{flag} is given {len(values)} times; only --kind {' and '.join(_SEVERAL)} take "
                "several"
            )
    source = args.source[0] if len(args.source) == 1 else args.source
    roots = args.images_root
    given = {
        "images_root": roots[0] if roots and len(roots) == 1 else roots,
        "pairs": args.pairs,
        "min_sim": args.min_sim,
        "images_from_bytes": args.images_from_bytes,
        "split": args.split,
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
        print(f"dropped {sum(report.dropped.values())} image(s) from written samples: {reasons}")
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


def main(argv: list[str] | None = None) -> int:
    """Run ``mmpt data <synth|build|index|inspect> ...``.

    Args:
        argv: Arguments after ``data``; default ``sys.argv[1:]``.

    Returns:
        Exit code: 0 on success; 1 when ``inspect`` finds problems, ``index`` finds
        unreadable shards or ``build`` writes nothing; 2 for bad arguments or input
        (printed as ``error: ...`` on stderr).

    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse already printed
        return e.code if isinstance(e.code, int) else 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    commands = {"synth": _synth, "build": _build, "index": _index, "inspect": _inspect}
    try:
        return commands[args.command](args)
    except (OSError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

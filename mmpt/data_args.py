"""``mmpt data``'s command line: its subcommands, their flags and examples."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from mmpt.cli_args import Parser
from mmpt.continue_cli import add_continue_parser

EPILOG = r"""examples:
  mmpt data synth --kind image-text --out data/shapes
  mmpt data synth --kind interleaved --out data/docs --max-images 3
  mmpt data synth --kind video-text --out data/clips --num-frames 16
  mmpt data synth --kind video-caption --out data/univl --raw-clips
  mmpt data synth --kind multispectral --out data/landcover --image-size 32
  mmpt data synth --kind audio-text --out data/tones --train-samples 100
  mmpt data synth --kind tone-speech --out data/tonespeech-b --language b
  mmpt data synth --kind grounding --out data/grounding
  mmpt data build --from captions.csv --out shards/ --images photos/ --workers 8
  mmpt data build --kind video-text --from egoclip.tsv --videos ego4d/chunks/ \
      --out shards/egoclip --reencode-short 256 --workers 8
  mmpt data build --kind multispectral --from ssl4eo-s12/ --sensor s2_l1c \
      --out shards/ssl4eo --size 256 --workers 8
  mmpt data build --kind multispectral --from EuroSAT_MS/ --out shards/eurosat --format tif
  mmpt data build --kind torchgeo --dataset EuroSAT --from /data/eurosat --split test \
      --out shards/eurosat-test
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
  mmpt data build --kind coco-caption --from captions_val2014.json --images /data/coco/val2014 \
      --out shards/coco-cap-val
  mmpt data build --kind vqav2 --from v2_OpenEnded_mscoco_val2014_questions.json \
      v2_mscoco_val2014_annotations.json --images /data/coco --out shards/vqav2-val
  mmpt data build --kind mcq --from MMBench_DEV_EN.tsv --out shards/mmbench-dev
  mmpt data build --kind rs-dense --from DOTA/train/labelTxt --images DOTA/train/images \
      --size 1024 --out shards/dota-train
  mmpt data build --kind rs-dense --from iSAID/train/instances.json --images iSAID/train/images \
      --size 800 --out shards/isaid-train
  mmpt data index /data/laion-shards --workers 8
  mmpt data index 'pipe:aws s3 cp s3://bucket/shards/{00000..00999}.tar -' --out shards.json
  mmpt data vocab --from shards/speech/train --out vocab.json
  mmpt data inspect shards/ --check
  mmpt data continue --llm /models/Qwen2.5-1.5B-Instruct --from shards/speech --out shards/cont
"""


def data_parser(synth_kinds: Sequence[str], build_kinds: Sequence[str]) -> argparse.ArgumentParser:
    """The parser of ``mmpt data {synth,build,index,inspect}``.

    Args:
        synth_kinds: ``mmpt data synth --kind`` choices.
        build_kinds: ``mmpt data build --kind`` choices.
    """
    parser = Parser(
        prog="mmpt data",
        description="Make, build and inspect WebDataset shards.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="write a learnable synthetic dataset (train/ and val/)")
    synth.add_argument(
        "--kind", required=True, metavar="KIND", help=f"dataset kind: {', '.join(synth_kinds)}"
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
    synth.add_argument(
        "--eval-samples",
        type=int,
        metavar="N",
        help="image-text: samples per held-out eval set in eval/caption, eval/vqa, eval/choice "
        "(192)",
    )
    synth.add_argument(
        "--qa-samples",
        type=int,
        metavar="N",
        help="image-text: question-answer conversations in qa/ (default: half of train)",
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
    synth.add_argument(
        "--feature-dim", type=int, metavar="N", help="video-caption: feature width (64)"
    )
    synth.add_argument(
        "--noise", type=float, metavar="STD", help="video-caption: feature noise std (0.1)"
    )
    synth.add_argument(
        "--raw-clips", action="store_true", help="video-caption: also write mp4 clips in clips/"
    )
    synth.add_argument(
        "--language", metavar="L", help="tone-speech: a (target) or b (a related language)"
    )
    synth.add_argument(
        "--unlabelled", action="store_true", help="tone-speech: training clips without transcripts"
    )
    synth.add_argument(
        "--shapes-per-image", type=int, metavar="N", help="grounding: shapes per image (3)"
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
        "file(s); retrieval: a Karpathy split .json; classification: an ImageFolder; coco-caption: "
        "a COCO/NoCaps captions .json; vqav2: the questions and annotations .json; mcq: a "
        "multiple-choice .tsv/.csv/.jsonl (MMBench TSV with base64 images); video-text: "
        "an EgoClip-style table (video_uid, clip_start, clip_end, clip_text[, tag_noun, tag_verb, "
        "video_path, clip_uid]); multispectral: an SSL4EO-S12 root or sensor folder, class "
        "folders or a flat folder of .tif/.npy tiles; audio-text: a table with audio paths and "
        "transcripts, or a folder of audio + same-stem .txt pairs",
    )
    build.add_argument("--out", required=True, type=Path, metavar="DIR", help="output shard folder")
    kinds = ", ".join(build_kinds)
    build.add_argument(
        "--kind",
        default="image-text",
        metavar="{" + ",".join(build_kinds) + "}",
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
        "--dataset",
        metavar="NAME",
        help="torchgeo: dataset class (EuroSAT, So2Sat ...); --from = root",
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
        "--split",
        metavar="NAME",
        help="retrieval: Karpathy split(s), comma-separated (test); torchgeo: train, val, test",
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
        "--size",
        type=int,
        metavar="N",
        help="multispectral: resize every tile to N x N; rs-dense: cut images into N x N tiles",
    )
    build.add_argument(
        "--masks",
        dest="masks_root",
        type=Path,
        metavar="DIR",
        help="rs-dense: semantic PNG masks named like the images (SAMRS, Potsdam)",
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

    from mmpt.vocab_cli import add_vocab_parser

    add_vocab_parser(sub)
    insp = sub.add_parser("inspect", help="count samples and keys; find corrupt samples")
    insp.add_argument("path", type=Path, help="a shard folder or a .tar file")
    insp.add_argument("--check", action="store_true", help="decode every image and json")
    insp.add_argument("--json", action="store_true", help="print the report as JSON")
    insp.add_argument(
        "--workers", type=int, default=1, metavar="N", help="processes reading shards"
    )
    from mmpt.curation.cli import add_parsers as add_curation_parsers

    add_curation_parsers(sub)
    add_continue_parser(sub)
    return parser

"""``mmpt data vocab``: the CTC vocabulary of the transcripts in speech shards."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from mmpt.ctc_vocab import CTCVocab, build_char_vocab


def add_vocab_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``vocab`` to ``mmpt data``'s subcommands."""
    p = sub.add_parser(
        "vocab",
        help="CTC vocabulary (vocab.json) of the transcripts in speech shards",
        description="Read every transcript of the shards and write Hugging Face's CTC "
        "vocab.json: <pad> (the CTC blank), <unk>, | (between words), then each character. "
        "With --tokenizer, the vocabulary of a subword tokenizers file instead.",
    )
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        nargs="+",
        metavar="SHARDS",
        help="shard folder(s), files or patterns (the training transcripts)",
    )
    p.add_argument("--out", required=True, type=Path, metavar="FILE", help="vocab.json to write")
    p.add_argument(
        "--text-key",
        default="json:transcript;txt;json:text",
        metavar="KEY",
        help="transcript field, alternatives ;-separated (default json:transcript;txt;json:text)",
    )
    p.add_argument("--lowercase", action="store_true", help="lowercase transcripts first")
    p.add_argument(
        "--min-count",
        type=int,
        default=1,
        metavar="N",
        help="leave out characters seen fewer times (they become <unk>)",
    )
    p.add_argument(
        "--tokenizer",
        type=Path,
        metavar="FILE",
        help="a tokenizers JSON file (subword units; needs <pad> and <unk> tokens)",
    )


def transcripts(sources: list[str], text_key: str) -> Iterator[str]:
    """Every transcript of the shards (samples without one are skipped).

    Raises:
        FileNotFoundError: A source has no shards.
    """
    from mmpt.datamodules.decode import read_captions
    from mmpt.datamodules.stages import SkipCounter, read_shards
    from mmpt.datamodules.urls import resolve_source

    urls = [u for s in sources for u in resolve_source(s, "--from").urls]
    for sample in read_shards(urls, SkipCounter()):
        try:
            yield from read_captions(sample, text_key)
        except KeyError:
            continue


def run_vocab(args: argparse.Namespace) -> int:
    """Write the vocabulary; prints its size and the characters' counts."""
    if args.tokenizer is not None:
        vocab = CTCVocab.load(args.tokenizer, args.lowercase, flag="--tokenizer")
        vocab.save(args.out)
        print(f"wrote {len(vocab)} subword tokens of {args.tokenizer} to {args.out}")
        return 0
    texts = list(transcripts(args.source, args.text_key))
    if not texts:
        raise ValueError(f"--from: no transcript in {args.text_key!r} (check --text-key)")
    vocab, counts = build_char_vocab(texts, args.lowercase, args.min_count)
    vocab.save(args.out)
    rare = sorted(c for c, n in counts.items() if n < args.min_count)
    print(
        f"wrote {len(vocab)} tokens ({len(vocab) - 3} characters) from {len(texts)} "
        f"transcripts to {args.out}"
    )
    if rare:
        print(f"left out (fewer than {args.min_count}, mapped to <unk>): {''.join(rare)}")
    return 0


__all__ = ["add_vocab_parser", "run_vocab", "transcripts"]

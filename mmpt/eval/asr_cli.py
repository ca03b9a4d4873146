"""``mmpt eval asr``: transcribe speech shards, score WER/CER, write JSON + per-utterance TSV.

``--ckpt`` takes a CTC checkpoint (``CTCModule`` or a wav2vec-S run), rebuilt from the
checkpoint alone; greedy decoding, or beam search with an n-gram LM where torchaudio's CTC
decoder is installed. A speech-LLM path (``--model``) can sit beside :func:`run_ctc_asr`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from mmpt.eval.asr_metrics import TextNormalizer, wer_cer, write_tsv

DEFAULT_TEXT_KEY = "json:transcript;txt;json:text"


def add_asr_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``asr`` to ``mmpt eval``'s tasks; returns its parser (for more model sources)."""
    help_ = "speech recognition: WER and CER (jiwer), JSON + per-utterance TSV"
    s = sub.add_parser("asr", help=help_, description=help_)
    s.add_argument("--ckpt", default=None, help="CTC checkpoint (.ckpt of CTCModule/WavSModule)")
    s.add_argument("--data", required=True, help="evaluation shards: folder, file or pattern")
    s.add_argument("--out", default=None, help="report folder (default: <ckpt folder>/eval)")
    s.add_argument("--text-key", default=DEFAULT_TEXT_KEY, help="transcript field")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--num-workers", type=int, default=2)
    s.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    s.add_argument("--keep-case", action="store_true", help="score without lowercasing")
    s.add_argument("--keep-punctuation", action="store_true", help="score with punctuation")
    s.add_argument("--beam-size", type=int, default=0, help="beam search width (0: greedy)")
    s.add_argument("--lm", default=None, help="KenLM n-gram file for beam search")
    s.add_argument("--lexicon", default=None, help="lexicon file for beam search")
    s.add_argument("--lm-weight", type=float, default=2.0)
    s.add_argument("--word-score", type=float, default=0.0)
    from mmpt.safe_load import add_unsafe_load_flag

    add_unsafe_load_flag(s)
    return s


def normalizer_of(args: argparse.Namespace) -> TextNormalizer:
    """The scoring normalisation the flags ask for."""
    return TextNormalizer(
        lowercase=not args.keep_case, remove_punctuation=not args.keep_punctuation
    )


def _device(name: str) -> torch.device:
    return torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    )


def ctc_transcripts(args: argparse.Namespace) -> tuple[list[str], list[str], list[str], dict]:
    """Keys, references and hypotheses of ``--data`` by the CTC model of ``--ckpt``.

    Returns:
        keys, refs, hyps, and ``info`` (decoding, skipped samples by reason).

    Raises:
        FileNotFoundError: No checkpoint or no shards.
        ValueError: Not a CTC checkpoint, beam search unavailable, nothing readable.
    """
    from lightning.fabric.utilities.apply_func import move_data_to_device

    from mmpt.datamodules.ctc import CTCDataModule
    from mmpt.datamodules.loader import make_loader
    from mmpt.datamodules.streams import StreamConfig
    from mmpt.models.ctc_load import load_ctc

    model = load_ctc(args.ckpt, unsafe=args.unsafe_load or None)
    decode = model.vocab.greedy
    if args.beam_size > 0:
        from mmpt.models.ctc_beam import BeamSearchDecoder

        decode = BeamSearchDecoder(
            model.vocab, args.lm, args.lexicon, args.beam_size, args.lm_weight, args.word_score
        )
    cfg = StreamConfig(urls=args.data, shuffle_buffer=0, shuffle_shards=False)
    dm = CTCDataModule(
        val=cfg,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        text_key=args.text_key,
        preprocess=model.preprocess,
    )
    stream = dm.stream(cfg, train=False, field="--data")
    stream.where = f"--data ({args.data})"
    device = _device(args.device)
    model.to(device)
    keys: list[str] = []
    refs: list[str] = []
    hyps: list[str] = []
    skipped: dict[str, int] = {}
    with torch.no_grad():
        for batch in make_loader(stream, args.num_workers):
            for reason, (count, _) in (getattr(batch, "skip_reasons", None) or {}).items():
                skipped[reason] = skipped.get(reason, 0) + count
            batch = dm.normalize(move_data_to_device(batch, device))
            logits, frames = model(batch.audio, batch.audio_lengths)
            hyps += decode(logits, frames)
            refs += batch.transcripts
            keys += batch.keys
    if not refs:
        raise ValueError(f"--data {args.data}: no utterance could be read (skipped: {skipped})")
    decoding = "greedy" if args.beam_size <= 0 else f"beam {args.beam_size}"
    info = {"decoding": decoding, "lm": args.lm, "skipped": skipped, "vocab_size": len(model.vocab)}
    return keys, refs, hyps, info


def report_asr(
    keys: list[str],
    refs: list[str],
    hyps: list[str],
    normalizer: TextNormalizer,
    out: Path,
    **context: Any,
) -> dict[str, Any]:
    """Score and write ``asr.json`` (metrics, normaliser, context) and ``asr.tsv`` in ``out``.

    Returns:
        The metrics (without the per-utterance rows) and the paths written.
    """
    from mmpt.eval.report import print_metrics, write_json

    result = wer_cer(refs, hyps, normalizer, keys)
    rows = result.pop("rows")
    tsv = write_tsv(rows, out / "asr.tsv")
    normalizer_settings = result.pop("normalizer")
    json_path = write_json(out / "asr.json", result, normalizer=normalizer_settings, **context)
    print_metrics({"wer": result["wer"], "cer": result["cer"], "utterances": len(rows)}, "asr")
    print(f"json: {json_path}\ntsv: {tsv}")
    return {**result, "json": json_path, "tsv": tsv}


def run_ctc_asr(args: argparse.Namespace) -> int:
    """``mmpt eval asr --ckpt CTC.ckpt --data SHARDS``."""
    keys, refs, hyps, info = ctc_transcripts(args)
    out = Path(args.out) if args.out else Path(args.ckpt).resolve().parent / "eval"
    report_asr(
        keys, refs, hyps, normalizer_of(args), out, checkpoint=args.ckpt, data=args.data, **info
    )
    return 0


def run_asr(args: argparse.Namespace, overrides: list[str]) -> int:
    """Run ``mmpt eval asr`` with the model source its flags name.

    Raises:
        ValueError: Unknown extra arguments, or no model source given.
    """
    if overrides:
        raise ValueError(f"unknown arguments for eval asr: {' '.join(overrides)}")
    if args.ckpt:
        return run_ctc_asr(args)
    raise ValueError("eval asr: give --ckpt (a CTC checkpoint)")


__all__ = ["add_asr_parser", "ctc_transcripts", "normalizer_of", "report_asr", "run_asr"]

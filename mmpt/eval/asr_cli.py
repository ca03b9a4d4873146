"""``mmpt eval asr``: transcribe speech shards, score WER/CER, write JSON + per-utterance TSV.

``--ckpt`` takes a CTC checkpoint (``CTCModule`` or a wav2vec-S run), rebuilt from the
checkpoint alone; greedy decoding, or beam search with an n-gram LM where torchaudio's CTC
decoder is installed. A speech LLM (``--model DIR`` or ``-c CONFIG --ckpt CKPT``) is prompted
to transcribe (:func:`mmpt.eval.speech_llm.run_speech_llm_asr`); both are scored by
:func:`report_asr`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from mmpt.eval.asr_metrics import TextNormalizer, wer_cer, write_tsv

DEFAULT_TEXT_KEY = "json:transcript;txt;json:text"


def add_asr_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``asr`` to ``mmpt eval``'s tasks: a CTC checkpoint or a speech LLM; returns it.

    ``--ckpt`` alone is a CTC checkpoint (rebuilt from the checkpoint); ``--model DIR`` (an
    ``mmpt export`` folder) or ``-c CONFIG --ckpt CKPT`` is a speech LLM prompted to transcribe.
    """
    from mmpt.eval.speech_llm import ASR_PROMPT, add_model_args

    help_ = "speech recognition (CTC model or speech LLM): WER and CER (jiwer), JSON + TSV"
    s = sub.add_parser("asr", help=help_, description=help_)
    add_model_args(s, ASR_PROMPT)
    s.add_argument(
        "--reference-key", "--text-key", dest="reference_key", default=DEFAULT_TEXT_KEY,
        help=f"transcript field ({DEFAULT_TEXT_KEY})",
    )  # fmt: skip
    s.add_argument("--keep-case", action="store_true", help="score without lowercasing")
    s.add_argument("--keep-punctuation", action="store_true", help="score with punctuation")
    ctc = s.add_argument_group("CTC checkpoints")
    ctc.add_argument("--num-workers", type=int, default=2)
    ctc.add_argument("--beam-size", type=int, default=0, help="beam search width (0: greedy)")
    ctc.add_argument("--lm", default=None, help="KenLM n-gram file for beam search")
    ctc.add_argument("--lexicon", default=None, help="lexicon file for beam search")
    ctc.add_argument("--lm-weight", type=float, default=2.0)
    ctc.add_argument("--word-score", type=float, default=0.0)
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


def check_beam_args(args: argparse.Namespace) -> None:
    """Refuse beam-search flags that cannot run, before the model loads.

    Raises:
        ValueError: ``--lm``/``--lexicon`` without ``--beam-size``, or ``--beam-size`` where
            torchaudio's CTC decoder is missing (names flashlight-text and its pip command).
    """
    if args.beam_size <= 0:
        if args.lm or args.lexicon:
            raise ValueError("--lm/--lexicon are for beam search: add --beam-size N (e.g. 50)")
        return
    from mmpt.models.ctc_beam import require_beam_search

    require_beam_search()


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

    check_beam_args(args)
    model = load_ctc(args.ckpt)
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
        text_key=args.reference_key,
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
        ValueError: No model source, or extra arguments for a CTC checkpoint.
    """
    if args.model or args.config:
        from mmpt.eval.speech_llm import run_speech_llm_asr

        return run_speech_llm_asr(args, overrides)
    if not args.ckpt:
        raise ValueError(
            "eval asr: give --ckpt CTC.ckpt (a CTC model), or a speech LLM: --model DIR or "
            "-c CONFIG --ckpt CKPT"
        )
    if overrides:
        raise ValueError(f"unknown arguments for eval asr: {' '.join(overrides)}")
    return run_ctc_asr(args)


__all__ = [
    "add_asr_parser",
    "check_beam_args",
    "ctc_transcripts",
    "normalizer_of",
    "report_asr",
    "run_asr",
]

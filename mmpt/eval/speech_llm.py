"""``mmpt eval asr --model`` / ``mmpt eval translate``: a speech LLM (BLSP) prompted over shards.

Each clip goes through ``mmpt generate``'s batched path (:class:`mmpt.generate.Generator`)
with a prompt ("Transcribe the speech." / "Translate the speech into English."); the outputs
are scored against the shards' reference field: WER and CER with jiwer for ASR, sacrebleu
BLEU and chrF for translation. Reports: ``<out>/<task>.json`` and a per-utterance
``<out>/<task>.tsv``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from mmpt.generate import Generator

log = logging.getLogger("mmpt.eval")

ASR_PROMPT = "Transcribe the speech."
TRANSLATE_PROMPT = "Translate the speech into {language}."
#: Language names for ``{language}`` in translation prompts (CoVoST 2's languages); other codes
#: stand for themselves.
LANGUAGES = {
    "ar": "Arabic", "ca": "Catalan", "cy": "Welsh", "de": "German", "en": "English",
    "es": "Spanish", "et": "Estonian", "fa": "Persian", "fr": "French", "id": "Indonesian",
    "it": "Italian", "ja": "Japanese", "lv": "Latvian", "mn": "Mongolian", "nl": "Dutch",
    "pt": "Portuguese", "ru": "Russian", "sl": "Slovenian", "sv": "Swedish", "ta": "Tamil",
    "tr": "Turkish", "zh": "Chinese",
}  # fmt: skip
#: ASR text normalisation applied to references and outputs before WER / CER (recorded).


@dataclass
class SpeechSet:
    """The readable utterances of a set and what was skipped.

    Attributes:
        keys: Sample keys.
        clips: Mono float32 clips (N_i,) at the model's rate.
        references: Reference texts.
        skipped: Skipped samples by reason (``unreadable``, ``no_audio``, ``bad_audio``,
            ``overlong`` (longer than the speech encoder's ``max_seconds``), ``no_reference``).
    """

    keys: list[str] = field(default_factory=list)
    clips: list[torch.Tensor] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, key: str, detail: object = "") -> None:
        """Count one skipped sample and log why."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        log.warning("skipped %s: %s %s", key, reason, detail)


def read_speech_set(
    gen: Generator, data: str, reference_key: str, max_samples: int | None = None
) -> SpeechSet:
    """Clips and references of ``data``'s shards; bad samples counted and skipped.

    Raises:
        FileNotFoundError: ``data`` matches no shard.
        ValueError: The model has no speech encoder, or no sample could be read.
    """
    import webdataset as wds

    from mmpt.datamodules.audio import AUDIO_EXTENSIONS, AudioReader
    from mmpt.datamodules.decode import MissingField, read_field
    from mmpt.datamodules.urls import resolve_source

    if gen.pre.audio is None:
        raise ValueError("the model has no speech encoder (model.audio): not a speech LLM")
    urls = resolve_source(data, "--data").urls
    limit = gen.pre.audio.max_samples
    # read whole clips: one longer than the encoder takes is skipped, never scored cropped
    reader = AudioReader(dataclasses.replace(gen.pre.audio, max_seconds=1e9), train=False)
    out = SpeechSet()

    def unreadable(exn: BaseException) -> bool:
        out.skip("unreadable", "?", exn)
        return True

    for sample in wds.WebDataset(urls, shardshuffle=False, handler=unreadable, empty_check=False):
        if max_samples is not None and len(out.keys) >= max_samples:
            break
        key = sample.get("__key__", "?")
        ext = next((e for e in AUDIO_EXTENSIONS.split(";") if e in sample), None)
        if ext is None:
            out.skip("no_audio", key)
            continue
        try:
            ref = str(read_field(sample, reference_key)).strip()
        except (MissingField, ValueError) as e:
            out.skip("no_reference", key, e)
            continue
        if not ref:
            out.skip("no_reference", key, "empty")
            continue
        try:
            clip = reader.read(sample[ext], ext)
        except Exception as e:  # noqa: BLE001 - an undecodable clip is a counted skip
            out.skip("bad_audio", key, e)
            continue
        if clip.shape[0] > limit:
            out.skip("overlong", key, f"{clip.shape[0]} samples > the encoder's {limit}")
            continue
        out.keys.append(key)
        out.clips.append(clip)
        out.references.append(ref)
    if not out.keys:
        raise ValueError(f"--data {data}: no utterance with audio and {reference_key!r} read")
    return out


def generate_all(
    gen: Generator, clips: list[torch.Tensor], prompt: str, batch_size: int, max_new_tokens: int
) -> Iterator[str]:
    """The model's output for each clip, greedy, ``batch_size`` clips per ``generate`` call."""
    for start in range(0, len(clips), batch_size):
        part = clips[start : start + batch_size]
        yield from gen.generate(
            [prompt] * len(part), None, [[c] for c in part], max_new_tokens=max_new_tokens
        )


def _write_tsv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
        w.writerow(header)
        w.writerows(rows)
    return path


def add_model_args(s: argparse.ArgumentParser, prompt: str) -> None:
    """The model, data and run flags of a speech-LLM eval command."""
    g = s.add_argument_group("model (as mmpt generate)")
    g.add_argument("--model", help="mmpt export folder of a speech LLM (BLSP)")
    g.add_argument("-c", "--config", action="append", help="training config(s) of --ckpt")
    g.add_argument("--ckpt", help="checkpoint (.ckpt) of the -c config")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    g.add_argument("--template", help="chat template (default: the one the model trained with)")
    g.add_argument("--system", help="system prompt")
    r = s.add_argument_group("run")
    r.add_argument("--data", required=True, help="speech shards (folder, glob, URL)")
    r.add_argument("--prompt", default=prompt, help=f"instruction before the clip ({prompt!r})")
    r.add_argument("--out", help="report folder (default: <ckpt or model folder>/eval)")
    r.add_argument("--batch-size", type=int, default=8, help="clips per generate call")
    r.add_argument("--max-new-tokens", type=int, default=128)
    r.add_argument("--max-samples", type=int, default=None, help="first N utterances")


def add_translate_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``translate`` to ``mmpt eval``'s subcommands."""
    help_ = "speech translation with a speech LLM: sacrebleu BLEU and chrF, per-utterance TSV"
    s = sub.add_parser("translate", help=help_, description=help_)
    add_model_args(s, TRANSLATE_PROMPT)
    s.add_argument("--target-lang", required=True, help="target language code (en, de, zh ...)")
    s.add_argument("--reference-key", default="json:translation", help="reference field")
    s.add_argument("--tokenize", default=None, help="sacrebleu tokeniser (default: per language)")


def add_speech_llm_asr_args(s: argparse.ArgumentParser) -> None:
    """The flags of ``mmpt eval asr`` for a speech LLM (``--model`` or ``-c``/``--ckpt``)."""
    add_model_args(s, ASR_PROMPT)
    s.add_argument("--reference-key", default="json:transcript;txt", help="transcript field")


def _setup(args: argparse.Namespace, overrides: list[str]) -> tuple[Generator, SpeechSet, Path]:
    """Check the flags, load the model, read the set; returns them and the report folder."""
    from mmpt.datamodules.templates import get_template
    from mmpt.datamodules.urls import resolve_source
    from mmpt.generate import Generator
    from mmpt.generate_cli import check_model_source, load_model

    check_model_source(args, overrides)
    if min(args.batch_size, args.max_new_tokens, args.max_samples or 1) < 1:
        raise ValueError("--batch-size, --max-new-tokens and --max-samples must be >= 1")
    if args.template is not None:
        get_template(args.template, "--template")
    resolve_source(args.data, "--data")  # a missing set fails before the model loads
    gen = Generator(load_model(args, overrides), args.template, args.system)
    data = read_speech_set(gen, args.data, args.reference_key, args.max_samples)
    where = Path(args.ckpt).resolve().parent if args.ckpt else Path(args.model)
    return gen, data, Path(args.out) if args.out else where / "eval"


def _context(args: argparse.Namespace, data: SpeechSet, outputs: list[str]) -> dict[str, Any]:
    return {
        "model": args.model,
        "checkpoint": args.ckpt,
        "config": args.config,
        "data": args.data,
        "prompt": args.prompt,
        "reference_key": args.reference_key,
        "decoding": {"greedy": True, "max_new_tokens": args.max_new_tokens},
        "num_utterances": len(outputs),
        "empty_outputs": sum(not o.strip() for o in outputs),
        "skipped": data.skipped,
    }


def _print(task: str, metrics: dict[str, Any], paths: dict[str, Path], ctx: dict) -> None:
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
    print(f"{task}: {shown} over {ctx['num_utterances']} utterances")
    print(f"  {ctx['empty_outputs']} empty outputs; skipped: {ctx['skipped'] or 'none'}")
    for kind, path in paths.items():
        print(f"{kind}: {path}")


def run_speech_llm_asr(args: argparse.Namespace, overrides: list[str]) -> int:
    """``mmpt eval asr --model DIR --data SHARDS --prompt ...``: WER / CER of a speech LLM."""
    from mmpt.eval.asr_cli import normalizer_of, report_asr

    gen, data, out = _setup(args, overrides)
    normalizer = normalizer_of(args)
    keep = [i for i, r in enumerate(data.references) if normalizer(r)]
    for i in sorted(set(range(len(data.keys))) - set(keep)):
        data.skip("empty_reference", data.keys[i], "nothing left after normalisation")
    if not keep:
        raise ValueError(f"--data {args.data}: every reference is empty after normalisation")
    keys = [data.keys[i] for i in keep]
    refs = [data.references[i] for i in keep]
    clips = [data.clips[i] for i in keep]
    outputs = list(generate_all(gen, clips, args.prompt, args.batch_size, args.max_new_tokens))
    ctx = _context(args, data, outputs)
    report_asr(keys, refs, outputs, normalizer, out, task="asr", **ctx)
    return 0


def run_translate(args: argparse.Namespace, overrides: list[str]) -> int:
    """``mmpt eval translate``: sacrebleu BLEU and chrF of a speech LLM's translations."""
    from mmpt.eval.report import write_json
    from mmpt.eval.translate_metrics import corpus_scores, sentence_scores

    language = LANGUAGES.get(args.target_lang, args.target_lang)
    args.prompt = args.prompt.replace("{language}", language)
    gen, data, out = _setup(args, overrides)
    outputs = list(generate_all(gen, data.clips, args.prompt, args.batch_size, args.max_new_tokens))
    scores = corpus_scores(outputs, data.references, args.target_lang, args.tokenize)
    metrics = {"bleu": scores.pop("bleu"), "chrf": scores.pop("chrf")}
    per = sentence_scores(outputs, data.references, args.target_lang, args.tokenize)
    rows = [
        [k, r, h, s["bleu"], s["chrf"]]
        for k, r, h, s in zip(data.keys, data.references, outputs, per, strict=True)
    ]
    ctx = {**_context(args, data, outputs), "target_lang": args.target_lang, **scores}
    paths = {
        "json": write_json(out / "translate.json", metrics, task="translate", **ctx),
        "tsv": _write_tsv(
            out / "translate.tsv", ["key", "reference", "hypothesis", "bleu", "chrf"], rows
        ),
    }
    _print("translate", metrics, paths, ctx)
    return 0


__all__ = [
    "ASR_PROMPT",
    "TRANSLATE_PROMPT",
    "add_speech_llm_asr_args",
    "add_translate_parser",
    "read_speech_set",
    "run_speech_llm_asr",
    "run_translate",
]

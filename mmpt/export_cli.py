"""``mmpt export``: a trained checkpoint -> the format of the library that will use it.

The dispatcher only picks the target; each target lives in its own module (``mmpt.export.*``
and :mod:`mmpt.models.vlm_export`).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path

from torch import nn

from mmpt.cli_args import Parser

#: ``--format`` -> what it writes (shown in --help and in errors).
FORMATS = {
    "open_clip": "contrastive image-text model -> open_clip folder (config, weights, tokenizer)",
    "timm": "the image tower of any model (MAE encoder, contrastive vision) -> timm checkpoint",
    "hf": "transformers folder: open_clip-tower CLIP -> CLIPModel + CLIPProcessor; otherwise the "
    "wav2vec 2.0 speech tower of any model -> Wav2Vec2Model + feature extractor (a CTC model "
    "-> Wav2Vec2ForCTC + Wav2Vec2Processor)",
    "llava": "VLM with an HF SigLIP/CLIP tower and mlp2x_gelu -> transformers LLaVA + processor",
    "mmpt": "any VLM -> mmpt's own folder (mmpt.load, `mmpt generate --model` rebuild it)",
}
Exporter = Callable[[nn.Module, Path, argparse.Namespace], Path]
log = logging.getLogger("mmpt.export")


def _open_clip(model: nn.Module, out: Path, args: argparse.Namespace) -> Path:
    from mmpt.export.open_clip import export_open_clip

    return export_open_clip(model, out, name=args.name)


def _timm(model: nn.Module, out: Path, args: argparse.Namespace) -> Path:
    from mmpt.export.parts import find_part
    from mmpt.export.timm import export_timm

    return export_timm(find_part(model, "vision"), out)


def _hf_speech(model: nn.Module, out: Path, args: argparse.Namespace) -> Path:
    from mmpt.export.hf_wav2vec2 import export_hf_wav2vec2
    from mmpt.export.parts import find_part

    return export_hf_wav2vec2(find_part(model, "audio"), out)


def _hf_ctc(model: nn.Module, out: Path, args: argparse.Namespace) -> Path:
    from mmpt.export.hf_wav2vec2_ctc import export_hf_ctc

    return export_hf_ctc(model, out)


def _hf_clip(model: nn.Module, out: Path, args: argparse.Namespace) -> Path:
    from mmpt.export.hf_clip import export_hf_clip

    return export_hf_clip(model, out)


def _mmpt_vlm(model: nn.Module, out: Path, args: argparse.Namespace) -> Path:
    from mmpt.models.vlm_export import export_mmpt_vlm

    return export_mmpt_vlm(model, out, args.template)


def _llava(model: nn.Module, out: Path, args: argparse.Namespace) -> Path:
    from mmpt.export.hf_llava import export_llava

    return export_llava(model, out, args.template)  # refuses what transformers cannot load


def _vlm_auto(model: nn.Module) -> str:
    """``llava`` when transformers has a class for the model, else ``mmpt`` (logged why)."""
    from mmpt.export.hf_llava import llava_unsupported

    reason = llava_unsupported(model)
    if reason is None:
        return "llava"
    log.warning("exporting to mmpt's own format, not transformers' LLaVA: %s", reason)
    return "mmpt"


def targets(model: nn.Module) -> dict[str, Exporter]:
    """The formats ``model``'s family can be exported to, the default (``auto``) first."""
    from mmpt.models.encoders.wav2vec2 import Wav2Vec2Tower

    found: dict[str, Exporter] = {}
    if hasattr(model, "export_mmpt"):  # VLMModule
        found["llava"], found["mmpt"] = _llava, _mmpt_vlm
    towers = [getattr(model, a, None) for a in ("vision", "text")]
    if "mmpt" not in found and all(t is not None for t in towers):  # contrastive image-text
        found["open_clip"] = _open_clip
    if any(hasattr(getattr(model, a, None), "image_preprocess") for a in ("vision", "encoder")):
        found["timm"] = _timm
    if "open_clip" in found:
        found["hf"] = _hf_clip
    elif hasattr(model, "lm_head") and hasattr(model, "vocab"):  # CTCModule
        found["hf"] = _hf_ctc
    elif any(isinstance(getattr(model, a, None), Wav2Vec2Tower) for a in ("audio", "encoder")):
        found["hf"] = _hf_speech
    return found


def _parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="mmpt export",
        description="Export a checkpoint to another library's format. Extra --model... flags "
        "override the config, as in `mmpt fit`. Formats: "
        + "; ".join(f"{k}: {v}" for k, v in FORMATS.items()),
    )
    p.add_argument(
        "-c",
        "--config",
        action="append",
        required=True,
        help="the training config(s) the checkpoint was made with (compose like fit)",
    )
    p.add_argument("--ckpt", required=True, help="checkpoint (.ckpt) to export")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--format",
        default="auto",
        choices=["auto", *FORMATS],
        help="target; auto: contrastive -> open_clip, MAE -> timm, wav2vec 2.0 -> hf, VLM -> "
        "llava when transformers has a class for it, else mmpt",
    )
    p.add_argument("--name", default=None, help="open_clip model config name (default: --out's)")
    p.add_argument(
        "--no-merge",
        action="store_true",
        help="a model with peft adapters (model.adapters): export the base weights and write "
        "the adapters as a peft folder OUT/adapter (PeftModel.from_pretrained loads it onto the "
        "exported model; llava, open_clip, hf); default: merge them into the weights",
    )
    return p


def _build(configs: list[str], overrides: list[str]) -> tuple[nn.Module, str | None]:
    """The config's model, and the name of the data template it trained with (or None)."""
    from mmpt.run_config import build_from_config

    cli = build_from_config(configs, overrides, cpu=True)
    template = getattr(getattr(cli.datamodule, "template", None), "name", None)
    return cli.model, template


def export(args: argparse.Namespace, overrides: list[str]) -> Path:
    """Build the model of ``args.config``, load ``args.ckpt`` and write ``args.format``.

    Raises:
        FileNotFoundError: A missing config or checkpoint.
        ValueError: A format the model's family (or its towers) cannot be exported to.
    """
    from mmpt.models.module import load_checkpoint

    for cfg in args.config:
        if not Path(cfg).is_file():
            raise FileNotFoundError(f"-c: no config file at {cfg!r}")
    if not Path(args.ckpt).is_file():
        raise FileNotFoundError(f"--ckpt: no checkpoint at {args.ckpt!r}")
    model, args.template = _build(args.config, overrides)
    found = targets(model)
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no export target: open_clip needs image and text "
            "towers, timm an image tower, hf those or a wav2vec 2.0 tower, mmpt a VLM"
        )
    fmt = next(iter(found)) if args.format == "auto" else args.format
    if args.format == "auto" and fmt == "llava":
        fmt = _vlm_auto(model)
    if fmt not in found:
        raise ValueError(
            f"--format {fmt} does not apply to {type(model).__name__}; it exports to "
            f"{', '.join(found)}"
        )
    load_checkpoint(model, args.ckpt)
    model.eval()
    return _write(model, found[fmt], fmt, args)


def _write(model: nn.Module, exporter: Exporter, fmt: str, args: argparse.Namespace) -> Path:
    """Export, with peft adapters merged into the weights or (``--no-merge``) beside them."""
    from mmpt.models.adapters import adapter_layers, merge_adapters

    out, no_merge = Path(args.out), getattr(args, "no_merge", False)
    if not adapter_layers(model):
        if no_merge:
            raise ValueError("--no-merge: the model has no adapters (model.adapters) to keep")
        return exporter(model, out, args)
    if not no_merge:
        log.info("merged the adapters of %d modules into the weights", len(merge_adapters(model)))
        return exporter(model, out, args)
    from mmpt.export.peft_adapter import UNMERGED_FORMATS, export_unmerged

    if fmt not in UNMERGED_FORMATS:
        raise ValueError(
            f"--no-merge: format {fmt} has no peft adapter export ("
            f"{', '.join(UNMERGED_FORMATS)} have); drop --no-merge to merge the adapters"
        )
    log.info(
        "peft adapter written to %s",
        export_unmerged(model, out, lambda m: exporter(m, out, args), fmt),
    )
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mmpt export``; returns an exit code (2 for bad input)."""
    from mmpt.user_errors import run_reporting_errors

    args, overrides = _parser().parse_known_args(argv)

    def run() -> int:
        print(f"exported to {export(args, overrides)}")
        return 0

    return run_reporting_errors(run)

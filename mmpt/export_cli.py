"""``mmpt export``: a trained VLM checkpoint -> an HF-style folder (LLM, connector, vision)."""

from __future__ import annotations

import argparse
import sys

from mmpt.safe_load import add_unsafe_load_flag


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmpt export",
        description="Export a VLM checkpoint as an HF-style folder: the LLM and tokenizer "
        "(save_pretrained), connector.safetensors, vision.safetensors and mmpt_vlm.json. "
        "Extra --model... flags override the config, as in `mmpt fit`.",
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
    add_unsafe_load_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mmpt export``; returns an exit code (2 for bad input)."""
    args, overrides = _parser().parse_known_args(argv)
    try:
        from mmpt.cli import build_cli
        from mmpt.models.module import load_checkpoint

        cli_args = [a for c in args.config for a in ("-c", c)]
        # the export runs on the CPU whatever devices the training config asked for
        cpu = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.num_nodes=1"]
        cpu += ["--trainer.strategy=auto", "--trainer.logger=false"]
        cli = build_cli([*cli_args, *cpu, *overrides], run=False)
        model = cli.model
        if not hasattr(model, "export_hf"):
            raise ValueError(f"{type(model).__name__} has no HF export (VLMModule has)")
        load_checkpoint(model, args.ckpt, unsafe=args.unsafe_load or None)
        out = model.export_hf(args.out)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0

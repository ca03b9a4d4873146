"""``mmpt export``: a trained VLM checkpoint -> mmpt's own loadable folder (``mmpt-vlm/3``)."""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmpt export",
        description="Export a VLM checkpoint as mmpt's own folder (mmpt_vlm.json, llm/ with the "
        "tokenizer, the other parts as safetensors), which mmpt.load and `mmpt generate --model` "
        "rebuild without the training config. "
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
        from mmpt.models.vlm import VLMModule
        from mmpt.models.vlm_export import export_mmpt_vlm

        model = cli.model
        if not isinstance(model, VLMModule):
            raise ValueError(f"{type(model).__name__} has no mmpt export (VLMModule has)")
        load_checkpoint(model, args.ckpt)
        template = getattr(getattr(cli.datamodule, "template", None), "name", None)
        out = export_mmpt_vlm(model, args.out, template)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0

"""The ``mmpt`` command: LightningCLI for fit/validate/test/predict, plus data, eval and tools."""

from __future__ import annotations

import sys
import warnings

import lightning as L
from lightning.pytorch.cli import LightningCLI

from mmpt.user_errors import data_error_message as data_error_message

TOP_HELP = """usage: mmpt <command> [options]

Multimodal pretraining workbench.

training (LightningCLI: -c config files compose, dotted overrides, --print_config):
  fit         train a model:            mmpt fit -c configs/quickstart/vila_stage1.yaml
  validate    run validation once:      mmpt validate -c CONFIG --ckpt_path last.ckpt
  test        run the test loop:        mmpt test -c CONFIG --ckpt_path last.ckpt
  predict     run prediction:           mmpt predict -c CONFIG --ckpt_path last.ckpt

data:
  data synth      make a learnable synthetic set   mmpt data synth --kind image-text --out DIR
  data build      raw files -> WebDataset shards   mmpt data build --from captions.csv --out DIR
  data inspect    counts, keys, corrupt samples    mmpt data inspect DIR --check

export, generation and checkpoints:
  export          checkpoint -> transformers LLaVA, open_clip, timm, HF wav2vec2 or mmpt's format
                                                    mmpt export -c CFG --ckpt CKPT --out DIR
  generate        images/audio + prompt -> text     mmpt generate --model DIR --image a.jpg
  merge           weighted average of checkpoints   mmpt merge --ckpt A B --weights 0.5 0.5 --out M
  schedule        plot a config's LR schedule (PNG) mmpt schedule -c CONFIG [--total-steps N]

evaluation (JSON report + PNG plot):
  eval retrieval  zero-shot image<->text retrieval mmpt eval retrieval -c CFG --ckpt CKPT --data DIR
  eval zeroshot   zero-shot classification         mmpt eval zeroshot -c CFG --ckpt CKPT --data DIR
  eval mcq        EgoMCQ video multiple choice     mmpt eval mcq -c CFG --ckpt CKPT --data DIR
  eval mir        EPIC-100 multi-instance (MIR)    mmpt eval mir -c CFG --ckpt CKPT --data DIR
                                                    --relevancy relevancy.pkl
  eval caption    VLM captioning: CIDEr, BLEU-4    mmpt eval caption --model DIR --data DIR
  eval vqa        VLM VQA accuracy                 mmpt eval vqa -c CFG --ckpt CKPT --data DIR
  eval choice     VLM multiple choice (MMBench)    mmpt eval choice --model DIR --data DIR
  eval all        a suite of VLM sets, one report  mmpt eval all --model DIR --suite SUITE.yaml

`mmpt <command> --help` shows the options of each command.
"""


class MMPTCLI(LightningCLI):
    """LightningCLI that links the model's preprocessing into the datamodule.

    The model's tokenizer, image size and normalisation reach the datamodule through
    ``link_arguments``, so data and model can never disagree.
    """

    def add_arguments_to_parser(self, parser) -> None:  # noqa: D102
        parser.link_arguments(
            "model.preprocess", "data.init_args.preprocess", apply_on="instantiate"
        )

    def before_instantiate_classes(self) -> None:
        """Fill the loggers' ``save_dir``; render ``data.synthetic`` the urls read, if missing.

        A logger without ``save_dir`` writes under ``trainer.default_root_dir`` (so do the
        checkpoints of a ``ModelCheckpoint`` without ``dirpath``). Synthetic data is rendered
        before the model reads its tokenizer, and only when a shard source lies in its folder.
        """
        from mmpt.datamodules.synthetic import config_urls, synthetic_to_render
        from mmpt.run_config import fill_logger_dirs

        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        if cfg is None:
            return
        fill_logger_dirs(cfg)
        data = cfg.get("data.init_args")
        urls = config_urls(data)
        for spec in synthetic_to_render(data.get("synthetic") if data else None, urls):
            spec.ensure(urls)


def build_cli(args: list[str] | None = None, run: bool = True) -> MMPTCLI:
    """Build the LightningCLI (models and datamodules chosen by ``class_path``)."""
    with warnings.catch_warnings():
        # `mmpt eval` parses its training config programmatically while sys.argv holds its own
        # flags: LightningCLI warns about exactly that, harmlessly.
        warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter")
        return _make_cli(args, run)


def _make_cli(args: list[str] | None, run: bool) -> MMPTCLI:
    return MMPTCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        # Checkpoints are written atomically (mmpt/checkpoint_io.py). A config's or the command
        # line's `trainer.plugins` replaces this default: list AtomicCheckpointIO there to keep it.
        trainer_defaults={"plugins": {"class_path": "mmpt.checkpoint_io.AtomicCheckpointIO"}},
    )


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``mmpt`` subcommands; returns the process exit code."""
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(TOP_HELP)
        return 0
    if argv[0] == "data":
        from mmpt.data_cli import main as data_main

        return data_main(argv[1:])
    if argv[0] == "export":
        from mmpt.export_cli import main as export_main

        return export_main(argv[1:])
    if argv[0] == "generate":
        from mmpt.generate_cli import main as generate_main

        return generate_main(argv[1:])
    if argv[0] == "eval":
        from mmpt.eval.cli import main as eval_main

        return eval_main(argv[1:])
    if argv[0] == "merge":
        from mmpt.merge_cli import main as merge_main

        return merge_main(argv[1:])
    if argv[0] == "schedule":
        from mmpt.schedule_cli import main as schedule_main

        return schedule_main(argv[1:])
    if argv[0] not in ("fit", "validate", "test", "predict"):
        print(f"mmpt: unknown command {argv[0]!r}\n\n{TOP_HELP}", file=sys.stderr)
        return 2
    # The streams' lengths are exact per rank and worker (tests/test_datamodule_pipeline.py).
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
    from mmpt.datamodules.stages import DataError
    from mmpt.models.init_from import InitFromError
    from mmpt.safe_load import UnsafeCheckpointError

    try:
        build_cli(None if from_shell else argv)
    except DataError as e:  # the data does not fit the model: say why, without a traceback
        print(f"error: {data_error_message(e)}", file=sys.stderr)
        return 2
    except (InitFromError, UnsafeCheckpointError) as e:  # a checkpoint refused: one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

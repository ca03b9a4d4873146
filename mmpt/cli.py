"""The ``mmpt`` command: LightningCLI for fit/validate/test/predict, plus data, eval and tools."""

from __future__ import annotations

import sys
import warnings
from argparse import ArgumentError
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningCLI

from mmpt.cli_args import join_negative_numbers, unknown_option_hint
from mmpt.user_errors import UserError, run_reporting_errors
from mmpt.user_errors import data_error_message as data_error_message

TOP_HELP = """usage: mmpt <command> [options]

Multimodal pretraining workbench.

training (LightningCLI: -c config files compose, dotted overrides, --print_config):
  fit         train a model:            mmpt fit -c configs/quickstart/vila_stage1.yaml
  validate    run validation once:      mmpt validate -c CONFIG --ckpt_path last.ckpt
  test        run the test loop:        mmpt test -c CONFIG --ckpt_path last.ckpt
  predict     write embeddings + keys:  mmpt predict -c CONFIG --ckpt_path last.ckpt

data:
  data synth      make a learnable synthetic set   mmpt data synth --kind image-text --out DIR
  data build      raw files -> WebDataset shards   mmpt data build --from captions.csv --out DIR
  data index      count samples into index.json    mmpt data index DIR
  data score      CLIP score per sample (parquet)  mmpt data score -c CFG --ckpt CKPT --from D
  data vocab      CTC vocabulary from transcripts  mmpt data vocab --from DIR --out vocab.json
  data continue   BLSP: an LLM continues transcripts mmpt data continue --llm DIR --from D --out D
  data dedup      near-duplicates -> score table   mmpt data dedup --from DIR --out SCORES
  data filter     keep by scores, re-shard          mmpt data filter --from DIR --scores S --keep E
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
  eval univl      UniVL captions (CIDEr) and R@k    mmpt eval univl -c CFG --ckpt CKPT --data DIR
  eval asr        speech recognition: WER, CER     mmpt eval asr --model DIR --data DIR
  eval translate  speech translation: BLEU, chrF   mmpt eval translate --model DIR --data DIR
  eval segment    mIoU of a dense (MTP) model      mmpt eval segment -c CFG --ckpt CKPT --data D
  eval detect     mask AP, rotated mAP@0.5         mmpt eval detect -c CFG --ckpt CKPT --data D
  eval probe      kNN / linear probe of a tower    mmpt eval probe --ckpt CKPT --train D --test D
                  resize/normalise sweep            --resize pretrain,none --normalize ...
  eval caption    VLM captioning: CIDEr, BLEU-4    mmpt eval caption --model DIR --data DIR
  eval vqa        VLM VQA accuracy                 mmpt eval vqa -c CFG --ckpt CKPT --data DIR
  eval choice     VLM multiple choice (MMBench)    mmpt eval choice --model DIR --data DIR
  eval all        a suite of VLM sets, one report  mmpt eval all --model DIR --suite SUITE.yaml

`mmpt <command> --help` shows the options of each command; the documentation is in docs/
(`make docs` builds the site).
"""


#: ``mmpt <command>`` -> "module:function" returning its argparse parser (the LightningCLI
#: commands fit/validate/test/predict are parsed by LightningCLI itself).
COMMAND_PARSERS = {
    "data": "mmpt.data_cli:parser",
    "eval": "mmpt.eval.cli:_parser",
    "export": "mmpt.export_cli:_parser",
    "generate": "mmpt.generate_cli:_parser",
    "merge": "mmpt.merge_cli:_parser",
    "schedule": "mmpt.schedule_cli:_parser",
}
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def command_parser(command: str) -> Any:
    """The argparse parser of ``mmpt <command>`` (not the LightningCLI commands).

    Raises:
        KeyError: Not an argparse command of mmpt.
    """
    import importlib

    module, function = COMMAND_PARSERS[command].split(":")
    return getattr(importlib.import_module(module), function)()


class MMPTCLI(LightningCLI):
    """LightningCLI that links the model's preprocessing into the datamodule.

    The model's tokenizer, image size and normalisation reach the datamodule through
    ``link_arguments``, so data and model can never disagree.
    """

    def __init__(self, *args, **kwargs) -> None:
        """LightningCLI's, with the run folder of a ``fit`` claimed and released around it.

        A ``fit`` claims its run folder while parsing (:func:`mmpt.runs.claim_fit_run`) and
        releases it here when LightningCLI returns or raises.
        """
        self._run_claim = None
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            self._close_run(failed=True)
            raise
        self._close_run(failed=False)

    def _close_run(self, failed: bool) -> None:
        if self._run_claim is not None:
            trainer = getattr(self, "trainer", None)
            self._run_claim.close(failed, trained=bool(trainer and trainer.global_step > 0))
            self._run_claim = None

    def add_arguments_to_parser(self, parser) -> None:  # noqa: D102
        parser.link_arguments(
            "model.preprocess", "data.init_args.preprocess", apply_on="instantiate"
        )

    def parse_arguments(self, parser, args) -> None:  # noqa: D102
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as e:  # an unknown flag: suggest the known one it resembles
            sub = self._subcommand_parsers.get(next(iter(args or sys.argv[1:]), ""), parser)
            hint = unknown_option_hint(str(e), list(sub._option_string_actions))
            if hint is None:
                raise
            raise UserError(hint) from e

    def before_instantiate_classes(self) -> None:
        """Fill the loggers' ``save_dir``, claim a fit's run folder, render ``data.synthetic``.

        A logger without ``save_dir`` writes under ``trainer.default_root_dir`` (so do the
        checkpoints of a ``ModelCheckpoint`` without ``dirpath``). A ``fit`` gets its own
        ``version_N`` (or the one ``--ckpt_path`` resumes), locked (:mod:`mmpt.runs`). Synthetic
        data (the synthetic set the urls read, if missing) is rendered
        before the model reads its tokenizer, and only when a shard source lies in its folder.
        """
        from mmpt.datamodules.synthetic import config_urls, synthetic_to_render
        from mmpt.preflight import preflight
        from mmpt.run_config import fill_logger_dirs

        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        if cfg is None:
            return
        fill_logger_dirs(cfg)
        data = cfg.get("data.init_args")
        urls = config_urls(data)
        for spec in synthetic_to_render(data.get("synthetic") if data else None, urls):
            spec.ensure(urls)
        # Weights (and, for fit/validate/test/predict, GPUs) before any class is built.
        preflight(cfg.as_dict(), training=self.subcommand is not None)
        if self.subcommand == "fit":  # last: a config refused above leaves no run folder
            from mmpt.runs import claim_fit_run

            self._run_claim = claim_fit_run(cfg)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """Lightning's Trainer, with mmpt's model summary; ``predict`` writes embeddings.

        A ``predict`` gets an :class:`~mmpt.predict_writer.EmbeddingWriter` unless the config
        has one (``<log_dir>/predictions/rank*/``).
        """
        from mmpt.console import use_mmpt_model_summary

        trainer = super().instantiate_trainer(**kwargs)
        use_mmpt_model_summary(trainer)
        if self.subcommand == "predict":
            from mmpt.predict_writer import EmbeddingWriter

            if not any(isinstance(c, EmbeddingWriter) for c in trainer.callbacks):
                trainer.callbacks.append(EmbeddingWriter())
        return trainer


def build_cli(args: list[str] | None = None, run: bool = True) -> MMPTCLI:
    """Build the LightningCLI (models and datamodules chosen by ``class_path``)."""
    from mmpt.console import silence_library_noise

    silence_library_noise()  # Lightning's tips and warnings that ask nothing of the user
    with warnings.catch_warnings():
        # `mmpt eval` parses its training config programmatically while sys.argv holds its own
        # flags: LightningCLI warns about exactly that, harmlessly.
        warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter")
        return _make_cli(args, run)


class _ParserBuilt(Exception):
    def __init__(self, parser: Any) -> None:
        self.parser = parser


class _ParserOnly(MMPTCLI):
    """Stops right after building the parser (nothing parsed, nothing built)."""

    def parse_arguments(self, parser, args) -> None:  # noqa: D102
        raise _ParserBuilt(parser)


def training_parser() -> Any:
    """The LightningCLI parser of ``fit``/``validate``/``test``/``predict``, built once per call.

    ``training_parser().parse_args(["fit", "-c", cfg, "--print_config"])`` checks a command
    without building the parser again (the docs' command test reuses one for every command).
    """
    try:
        _make_cli(["fit"], run=True, cls=_ParserOnly)
    except _ParserBuilt as built:
        return built.parser
    raise AssertionError("unreachable: _ParserOnly always raises")


def _make_cli(args: list[str] | None, run: bool, cls: type[MMPTCLI] = MMPTCLI) -> MMPTCLI:
    return cls(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        # Parse errors raise (main prints them as one `error:` block); `--trainer.max_epoch` is
        # refused rather than read as `--trainer.max_epochs`.
        parser_kwargs={"allow_abbrev": False, "exit_on_error": False},
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        # Checkpoints are written atomically (mmpt/checkpoint_io.py). A config's or the command
        # line's `trainer.plugins` replaces this default: list AtomicCheckpointIO there to keep it.
        trainer_defaults={"plugins": {"class_path": "mmpt.checkpoint_io.AtomicCheckpointIO"}},
    )


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``mmpt`` subcommands; returns the process exit code."""
    given = list(sys.argv[1:] if argv is None else argv)
    # `--model.lr -1e-3` as `--model.lr=-1e-3` (argparse reads -1e-3 as a flag); the shell's
    # argv is parsed as sys.argv when nothing changed.
    from_shell = argv is None and join_negative_numbers(given) == given
    argv = join_negative_numbers(given)
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

    # Config, data, weights, checkpoint and device errors: one `error:` block, exit code 2.
    def fit() -> int:
        build_cli(None if from_shell else argv)
        return 0

    return run_reporting_errors(fit)


if __name__ == "__main__":
    raise SystemExit(main())

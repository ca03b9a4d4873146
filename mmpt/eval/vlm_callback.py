"""VLM benchmarks during fit: a suite every N steps and at the end, as ``eval/<set>/<metric>``.

In a recipe::

    trainer:
      callbacks:
        - class_path: mmpt.eval.VLMEvalCallback
          init_args: {suite: configs/eval/quickstart_suite.yaml, every_n_steps: 400}
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist

from mmpt.eval.suite import SetResult, evaluate_set, headline, load_suite, write_suite_report
from mmpt.eval.vlm_sets import EvalSample, SetSpec, read_set, shard_of
from mmpt.eval.vlm_tasks import Record

log = logging.getLogger("mmpt.eval")


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_records(records: list[Record]) -> list[Record]:
    """Every rank's prediction records, concatenated in rank order (collective under DDP)."""
    rank, world = _world()
    if world == 1:
        return records
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, records)
    return [r for part in parts for r in part]


class VLMEvalCallback(L.Callback):
    """Runs a benchmark suite (caption / VQA / multiple choice) on the training model.

    Every ``every_n_steps`` optimizer steps and at the end of fit, each set of the suite is
    split over the ranks (every rank generates its share), the prediction records are
    gathered, and every rank scores the whole set. Metrics go to the loggers as
    ``eval/<set>/<metric>`` (and to ``trainer.callback_metrics``, so ``ModelCheckpoint`` can
    monitor them). Rank 0 writes ``<log_dir>/eval/vlm_step<N>.json|.md`` (plus predictions)
    per evaluation, and ``vlm_eval.json`` (the history) with ``vlm_eval.png`` (each set's
    main metric against the step). The model is put in eval mode for the evaluation and
    back in train mode afterwards. Sets are read and checked when fit starts. A caption set
    without its own ``prompt`` is asked with the datamodule's ``caption_prompt`` (the way the
    model trains on pairs: the image alone in a stage-1 ``plain`` recipe). Under a sharded
    strategy (FSDP) it warns and does nothing: run ``mmpt eval all`` on the checkpoints.

    Args:
        suite: Suite YAML (``configs/eval/*.yaml``; see :mod:`mmpt.eval.suite`), or its
            ``sets:`` list inline (paths then resolve like the recipe's data paths).
        every_n_steps: Evaluate every N global steps (0: only at the end).
        at_end: Evaluate when fit ends (unless that step was just evaluated).
        batch_size: Prompts per ``generate`` call.
        max_new_tokens: Tokens generated per prompt (default: per task).
        max_samples: Cap every set at its first N samples (a set's own cap may be lower).
        skip_missing: Warn and skip a set whose shards do not exist (recipes that list
            benchmarks not every user has); False: an error when fit starts.
        java: Caption scoring with pycocoevalcap's Java tools (None: when installed);
            False (default) the Python tokenizer port and no METEOR, which adds no start-up.
        template: Chat template to prompt with (default: the datamodule's).
    """

    def __init__(
        self,
        suite: str | list[dict[str, Any]],
        every_n_steps: int = 0,
        at_end: bool = True,
        batch_size: int = 8,
        max_new_tokens: int | None = None,
        max_samples: int | None = None,
        skip_missing: bool = False,
        java: bool | None = False,
        template: str | None = None,
    ) -> None:
        if every_n_steps < 0 or batch_size < 1:
            raise ValueError("VLMEvalCallback: every_n_steps must be >= 0 and batch_size >= 1")
        self.suite, self.every_n_steps, self.at_end = suite, every_n_steps, at_end
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.max_samples, self.skip_missing = max_samples, skip_missing
        self.java, self.template = java, template
        self.sets: list[tuple[SetSpec, list[EvalSample]]] = []
        self.history: list[dict[str, Any]] = []
        self._last_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Read and check every set of the suite (fit only), before any training step."""
        if stage != "fit" or self.sets:
            return
        strategy = type(trainer.strategy).__name__
        if "FSDP" in strategy or "ModelParallel" in strategy:
            # generation runs a different number of forwards on each rank, and every forward
            # of a sharded model is a collective: it would hang
            log.warning(
                "VLMEvalCallback: not run under %s (sharded weights); evaluate the checkpoints "
                "with mmpt eval all --suite %s",
                strategy,
                self.suite,
            )
            return
        if not hasattr(pl_module, "preprocess") or getattr(pl_module, "vision", None) is None:
            raise ValueError(
                f"VLMEvalCallback: {type(pl_module).__name__} is not a VLM with a vision tower"
            )
        where = self.suite if isinstance(self.suite, str) else "(inline)"
        field = f"VLMEvalCallback suite {where}: data"
        caption_prompt = getattr(trainer.datamodule, "caption_prompt", None)
        for spec in load_suite(self.suite, "VLMEvalCallback suite"):
            if spec.task == "caption" and spec.prompt is None and caption_prompt is not None:
                spec.prompt = caption_prompt
            if self.max_samples is not None:
                spec.max_samples = min(spec.max_samples or self.max_samples, self.max_samples)
            try:
                self.sets.append((spec, read_set(spec, field)))
            except FileNotFoundError as err:
                if not self.skip_missing:
                    raise
                log.warning("VLMEvalCallback: set %s skipped: %s", spec.name, err)
        if not self.sets:
            log.warning(
                "VLMEvalCallback: no set of %s could be read; nothing to evaluate", self.suite
            )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        """Evaluate when the global step reaches a multiple of ``every_n_steps``."""
        step = trainer.global_step
        due = self.every_n_steps and step > 0 and step % self.every_n_steps == 0
        if due and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The final evaluation (skipped when this step was just evaluated)."""
        if self.at_end and trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[SetResult]:
        """Run every set now, log, record and write the reports; returns the results."""
        from mmpt.generate import Decoding, Generator

        self._last_step = step = trainer.global_step
        if not self.sets:
            return []
        rank, world = _world()
        dm = trainer.datamodule
        template = self.template or getattr(getattr(dm, "template", None), "name", None)
        was_training = pl_module.training
        gen = Generator(pl_module, template or pl_module.data_template)
        decoding = None if self.max_new_tokens is None else Decoding(self.max_new_tokens)
        try:
            results = [
                evaluate_set(
                    gen,
                    spec,
                    samples,
                    decoding,
                    self.batch_size,
                    gather=gather_records,
                    share=lambda s: shard_of(s, rank, world),
                    java=self.java,
                )
                for spec, samples in self.sets
            ]
        finally:
            pl_module.train(was_training)
        metrics = {f"eval/{r.spec.name}/{k}": v for r in results for k, v in r.metrics.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        self.history.append({"step": step, **{r.spec.name: r.metrics for r in results}})
        if trainer.is_global_zero:
            out = Path(trainer.log_dir or trainer.default_root_dir) / "eval"
            write_suite_report(results, out, f"vlm_step{step}", step=step, suite=self.suite)
            self.write_history(out)
        return results

    def write_history(self, out_dir: Path) -> dict[str, Path]:
        """``vlm_eval.json`` (every evaluation's metrics) and ``vlm_eval.png`` (main metrics)."""
        from mmpt.eval.report import new_figure, save_figure
        from mmpt.io import atomic_write_text

        out_dir.mkdir(parents=True, exist_ok=True)
        json_path = out_dir / "vlm_eval.json"
        atomic_write_text(json_path, json.dumps({"history": self.history}, indent=2) + "\n")
        fig = new_figure(6.0, 4.0)
        ax = fig.add_subplot()
        for spec, _ in self.sets:
            key = headline(spec)
            points = [(h["step"], h[spec.name].get(key)) for h in self.history if spec.name in h]
            points = [(s, v) for s, v in points if v is not None]
            if points:
                ax.plot(*zip(*points, strict=True), "o-", label=f"{spec.name} {key}")
        ax.set(xlabel="step", ylabel="metric", title="VLM benchmarks during fit")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best")
        return {"json": json_path, "plot": save_figure(fig, out_dir / "vlm_eval.png")}

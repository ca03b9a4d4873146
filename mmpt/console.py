"""What a user sees during ``mmpt fit``: progress bar, model summary, and no library noise."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichModelSummary as _RichModelSummary
from lightning.pytorch.callbacks import RichProgressBar as _RichProgressBar
from lightning.pytorch.callbacks import TQDMProgressBar as _TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf
from lightning.pytorch.utilities.model_summary import (
    get_formatted_model_size,
    get_human_readable_count,
)

#: Lightning's logger of ``rank_zero_info`` messages (its tips among them).
RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"
#: Start of Lightning's advertisements for its cloud products (litlogger, litmodels).
CLOUD_TIP = "💡 Tip: For seamless cloud"


class _RunCount:
    """What mmpt's progress bars count: optimizer steps to ``max_steps``, else 1-based epochs."""

    def _by_steps(self) -> bool:
        trainer = self._trainer
        return trainer is not None and trainer.max_steps is not None and trainer.max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        """``max_steps`` on a run bounded by steps, else the batches of this epoch."""
        if self._by_steps():
            return self.trainer.max_steps
        return super().total_train_batches

    def _train_text(self, current_epoch: int) -> str:
        """``Step``, else ``Epoch e/N``, 1-based (``Epoch e`` without ``max_epochs``)."""
        if self._by_steps():
            return "Step"
        text = f"Epoch {current_epoch + 1}"
        if self.trainer.max_epochs is not None and self.trainer.max_epochs > 0:
            text += f"/{self.trainer.max_epochs}"
        return text

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Logged progress-bar metrics without ``v_num``; the 1-based epoch when counting steps."""
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        if self._by_steps():
            items = {"epoch": str(trainer.current_epoch + 1), **items}
        return items


class RichProgressBar(_RunCount, _RichProgressBar):
    """Lightning's Rich progress bar, counting what ends the run.

    - ``trainer.max_steps`` set: one bar over the whole run, ``Step`` and the optimizer steps
      done out of ``max_steps`` (a resumed run starts at its step); the 1-based epoch is shown
      beside the metrics. Lightning shows ``Epoch 0/-2`` there and restarts at every epoch.
    - otherwise: ``Epoch e/N`` with the 1-based epoch, so the last of 2 epochs is
      ``Epoch 2/2`` (Lightning: ``Epoch 1/1``), and the batches of the epoch.

    Lightning's ``v_num`` (the run folder's number, shown as ``0.000``) is not shown: the run
    summary at the end prints the run folder.

    YAML::

        trainer:
          callbacks:
            - class_path: mmpt.console.RichProgressBar

    Takes Lightning's ``RichProgressBar`` arguments (``refresh_rate``, ``leave``, ``theme``,
    ``console_kwargs``).
    """

    def _get_train_description(self, current_epoch: int) -> str:
        text = self._train_text(current_epoch)
        return f"{text:{len(self.validation_description)}}"  # no flicker next to "Validation"

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Counting steps: keep the one bar (and its clock) across epochs."""
        if self._by_steps() and self.train_progress_bar_id is not None and not self._leave:
            self.refresh()
            return
        super().on_train_epoch_start(trainer, pl_module)

    def _update(
        self, progress_bar_id: Any, current: int, visible: bool = True, hard: bool = False
    ) -> None:
        """The training bar of a run bounded by steps shows the optimizer steps done."""
        if self._by_steps() and progress_bar_id == self.train_progress_bar_id:
            current = self.trainer.global_step
        super()._update(progress_bar_id, current, visible, hard)


def _update_n(bar: Any, n: int) -> None:
    """Set a tqdm bar's count (absolute, not an increment) and redraw it."""
    if not bar.disable:
        bar.n = n
        bar.refresh()


class TQDMProgressBar(_RunCount, _TQDMProgressBar):
    """Lightning's tqdm progress bar counting as :class:`RichProgressBar` does.

    ``Step`` and the optimizer steps out of ``trainer.max_steps`` on one bar for the whole run,
    else ``Epoch e/N`` (1-based) and the batches of the epoch; no ``v_num``.

    YAML::

        trainer:
          callbacks:
            - class_path: mmpt.console.TQDMProgressBar

    Takes Lightning's ``TQDMProgressBar`` arguments (``refresh_rate``, ``process_position``,
    ``leave``).
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Open the training bar (its steps are set at the first epoch start)."""
        super().on_train_start(trainer, pl_module)
        self._counting_steps = False

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        """Counting steps: one bar across epochs, set up once; else a bar per epoch, 1-based."""
        bar = self._train_progress_bar
        if not (self._by_steps() and getattr(self, "_counting_steps", False) and bar is not None):
            if self._leave or bar is None:
                bar = self.train_progress_bar = self.init_train_tqdm()
            bar.reset(total=convert_inf(self.total_train_batches))
            bar.initial = 0
            if self._by_steps():
                self._counting_steps = not self._leave
                bar.n = trainer.global_step  # a resumed run's step
        bar.set_description(self._train_text(trainer.current_epoch))

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Counting steps: the bar shows the optimizer steps done."""
        if not self._by_steps():
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar, n = self._train_progress_bar, trainer.global_step
        if bar is not None and self._should_update(n, bar.total):
            _update_n(bar, n)
            bar.set_postfix(self.get_metrics(trainer, pl_module))
        return None


class RichModelSummary(_RichModelSummary):
    """Lightning's Rich model summary without its FLOPs column and line when they are unknown.

    Lightning counts FLOPs only by running ``example_input_array``, which mmpt's modules (whose
    input is a ``Batch``) do not set: it printed ``Total FLOPs: 0`` and a column of zeros. The
    training FLOPs are logged instead as ``perf/tflops_per_s`` by
    :class:`~mmpt.throughput.ThroughputMonitor` (analytic, :mod:`mmpt.models.flops`). With
    FLOPs known this is Lightning's summary.
    """

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        """Print the layer table and the totals (rank 0; Lightning calls it)."""
        if total_flops:
            return _RichModelSummary.summarize(
                summary_data,
                total_parameters,
                trainable_parameters,
                model_size,
                total_training_modes,
                total_flops,
                **summarize_kwargs,
            )
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            numeric = name.startswith("Params") or name.endswith("sizes")
            table.add_column(name, justify="right" if numeric else "left", no_wrap=name == "Name")
        for row in zip(*(values for _, values in columns), strict=True):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        grid = Table.grid(expand=True)
        frozen = total_parameters - trainable_parameters
        for label, value in (
            ("Trainable params", get_human_readable_count(int(trainable_parameters))),
            ("Non-trainable params", get_human_readable_count(int(frozen))),
            ("Total params", get_human_readable_count(int(total_parameters))),
            ("Total estimated model params size (MB)", get_formatted_model_size(model_size)),
            ("Modules in train mode", str(total_training_modes["train"])),
            ("Modules in eval mode", str(total_training_modes["eval"])),
        ):
            grid.add_row(f"[bold]{label}[/]: {value}")
        console.print(grid)
        return None


def use_mmpt_model_summary(trainer: L.Trainer) -> None:
    """Replace the model summary Lightning adds by default with :class:`RichModelSummary`.

    Only Lightning's own ``RichModelSummary`` is replaced (its depth and options kept); a
    summary callback of another class, or none (``enable_model_summary: false``), stays.
    """
    for i, cb in enumerate(trainer.callbacks):
        if type(cb) is _RichModelSummary:
            ours = RichModelSummary(max_depth=cb._max_depth, **cb._summarize_kwargs)
            trainer.callbacks[i] = ours


class _DropCloudTips(logging.Filter):
    """Drops Lightning's litlogger/litmodels tips (printed on every run, offline too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(CLOUD_TIP)


def silence_library_noise() -> None:
    """Silence the messages a plain ``mmpt fit`` printed that ask nothing of the user.

    Each filter matches one message at its source, and calling this twice adds nothing:

    - Lightning's tips to install litlogger / litmodels (``rank_zero_info``, at every
      Trainer start): an advertisement, not about the run;
    - torch's ``FutureWarning`` "``isinstance(treespec, LeafSpec)`` is deprecated", raised
      inside Lightning's ``utilities/_pytree.py`` when it builds its combined dataloader:
      Lightning's code to change, nothing a user can act on;
    - Lightning's "Your ``IterableDataset`` has ``__len__`` defined" warning: mmpt's streams
      know their exact length per rank and worker (tests/test_datamodule_pipeline.py).
    """
    log = logging.getLogger(RANK_ZERO_LOGGER)
    if not any(isinstance(f, _DropCloudTips) for f in log.filters):
        log.addFilter(_DropCloudTips())
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")

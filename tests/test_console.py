"""What a fit shows: progress bar counts, model summary, silenced library noise, metrics.csv."""

from __future__ import annotations

import csv
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
import rich
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.callbacks import RichModelSummary as LightningRichModelSummary
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mmpt.console import (
    RANK_ZERO_LOGGER,
    RichModelSummary,
    RichProgressBar,
    TQDMProgressBar,
    silence_library_noise,
    use_mmpt_model_summary,
)
from mmpt.loggers import CSVLogger
from mmpt.models.module import MMPTModule


class Tiny(MMPTModule):
    """A linear layer (a decayed weight, an undecayed bias) on mmpt's optimizer and schedule."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.example_input_array = torch.zeros(1, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(batch[0]).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", self(batch[0]).pow(2).mean())


def loader() -> DataLoader:
    """3 batches of 4."""
    return DataLoader(TensorDataset(torch.randn(12, 4)), batch_size=4)


def trainer(**kwargs) -> L.Trainer:
    defaults = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "enable_progress_bar": False,
    }
    return L.Trainer(**{**defaults, **kwargs})


@pytest.fixture
def bar_text() -> Iterator[tuple[RichProgressBar, io.StringIO]]:
    """mmpt's progress bar writing into a buffer; the global Rich console restored after."""
    buf = io.StringIO()
    bar = RichProgressBar(console_kwargs={"file": buf, "width": 200, "force_terminal": False})
    yield bar, buf
    rich.reconfigure()


def test_progress_bar_counts_steps_to_max_steps(bar_text) -> None:
    bar, buf = bar_text
    trainer(callbacks=[bar], enable_progress_bar=True, max_steps=7, max_epochs=-1).fit(
        Tiny(), loader()
    )
    last = buf.getvalue().strip().splitlines()[-1]
    assert last.startswith("Step") and " 7/7 " in last, last  # over 3 epochs, one bar
    assert "epoch: 3 " in last and "v_num" not in last and "Epoch" not in last
    assert "-2" not in buf.getvalue()


def test_progress_bar_epochs_are_one_based(bar_text) -> None:
    bar, buf = bar_text
    trainer(callbacks=[bar], enable_progress_bar=True, max_epochs=2).fit(Tiny(), loader())
    text = buf.getvalue()
    assert "Epoch 2/2" in text.strip().splitlines()[-1] and " 3/3 " in text
    assert "Epoch 1/1" not in text  # Lightning's 0-based count


def test_model_summary_drops_unknown_flops(capsys: pytest.CaptureFixture) -> None:
    model = Tiny()
    model.example_input_array = None  # like mmpt's modules: Lightning cannot count FLOPs
    t = trainer(enable_model_summary=True, max_steps=1)
    use_mmpt_model_summary(t)
    assert not any(type(cb) is LightningRichModelSummary for cb in t.callbacks)
    assert sum(isinstance(cb, RichModelSummary) for cb in t.callbacks) == 1
    t.fit(model, loader())
    out = capsys.readouterr().out
    assert "Trainable params" in out and "lin" in out and "Linear" in out
    assert "FLOPs" not in out


def test_model_summary_keeps_known_flops(capsys: pytest.CaptureFixture) -> None:
    t = trainer(callbacks=[RichModelSummary()], enable_model_summary=True, max_steps=1)
    t.fit(Tiny(), loader())  # example_input_array set: Lightning counts, its summary is kept
    out = capsys.readouterr().out
    assert "Total FLOPs" in out and "Total FLOPs: 0" not in out


def test_library_noise_is_silenced() -> None:
    from lightning.pytorch.utilities._pytree import _tree_flatten

    records: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    rank_zero = logging.getLogger(RANK_ZERO_LOGGER)
    rank_zero.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            silence_library_noise()
            silence_library_noise()  # twice: nothing added twice
            _tree_flatten({"a": [1, 2]})  # Lightning's flatten builds torch's deprecated LeafSpec
            trainer(max_steps=1)  # Lightning tips about litlogger on every Trainer
            warnings.warn("an unrelated FutureWarning", FutureWarning, stacklevel=1)
    finally:
        rank_zero.removeHandler(handler)
    assert not any("litlogger" in r for r in records), records
    assert any("GPU available" in r for r in records)  # other messages still pass
    messages = [str(w.message) for w in caught]
    assert not any("LeafSpec" in m for m in messages), messages
    assert "an unrelated FutureWarning" in messages
    assert sum(type(f).__name__ == "_DropCloudTips" for f in rank_zero.filters) == 1


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open() as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_metrics_csv_has_one_row_per_step_with_named_lrs(tmp_path: Path) -> None:
    logger = CSVLogger(str(tmp_path), flush_logs_every_n_steps=2)  # flushes mid-step too
    t = trainer(
        logger=logger,
        callbacks=[LearningRateMonitor(logging_interval="step")],
        max_steps=5,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
    )
    t.fit(Tiny(), loader(), loader())
    header, rows = read_rows(Path(logger.log_dir) / "metrics.csv")
    assert "lr/decay" in header and "lr/no_decay" in header
    assert not any("pg1" in h or "lr-" in h for h in header), header
    steps = [int(r["step"]) for r in rows]
    assert steps == [0, 1, 2, 3, 4], steps
    for r in rows:
        assert r["train/loss"] and r["lr/decay"] and r["lr/no_decay"], r
    assert [r["step"] for r in rows if r["val/loss"]] == ["2"]  # validation after epoch 1


def test_csv_writer_keeps_conflicting_values_apart(tmp_path: Path) -> None:
    logger = CSVLogger(str(tmp_path))
    logger.log_metrics({"a": 1.0}, step=0)
    logger.log_metrics({"b": 2.0}, step=0)
    logger.log_metrics({"a": 3.0}, step=0)  # the same step again: a second row, not a loss
    logger.log_metrics({"a": 4.0}, step=1)
    logger.finalize("success")
    _, rows = read_rows(Path(logger.log_dir) / "metrics.csv")
    assert [(r["step"], r["a"], r["b"]) for r in rows] == [
        ("0", "1.0", "2.0"),
        ("0", "3.0", ""),
        ("1", "4.0", ""),
    ]


def test_recipes_use_mmpts_progress_bar() -> None:
    configs = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))
    texts = {p.name: p.read_text() for p in configs}
    assert sum("mmpt.console.RichProgressBar" in t for t in texts.values()) >= 10
    assert not [n for n, t in texts.items() if "lightning.pytorch.callbacks.RichProgressBar" in t]


@pytest.mark.parametrize(
    ("kw", "want", "count"),
    [
        ({"max_steps": 7, "max_epochs": -1}, "Step", (7, 7)),
        ({"max_epochs": 2}, "Epoch 2/2", (3, 3)),
    ],
)
def test_tqdm_bar_counts_alike(kw: dict, want: str, count: tuple, capsys) -> None:
    run = trainer(callbacks=[TQDMProgressBar()], enable_progress_bar=True, **kw)
    run.fit(Tiny(), loader())
    bar = run.progress_bar_callback.train_progress_bar
    assert bar.desc.startswith(want) and (bar.n, bar.total) == count, (bar.desc, bar.n, bar.total)
    assert "Epoch 0" not in capsys.readouterr().out and "v_num" not in str(bar.postfix)


def test_plain_fit_console_and_metrics(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """`mmpt fit` end to end: no tip, no deprecation warning, no FLOPs line, the step bar, and
    one metrics.csv row per step with the named learning rates."""
    from mmpt.cli import main
    from tests.helpers import write_shards
    from tests.test_cli import tiny_fit_config, write_yaml

    cfg = tiny_fit_config(write_shards(tmp_path / "shards", n=24, per_shard=8), tmp_path / "run")
    cfg["trainer"].update(enable_progress_bar=True, enable_model_summary=True)
    cfg["trainer"]["logger"]["class_path"] = "mmpt.loggers.CSVLogger"
    cfg["trainer"]["callbacks"] = [  # no checkpoint, reports or summary: fast
        {"class_path": "mmpt.console.RichProgressBar"},
        {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"},
    ]
    with warnings.catch_warnings():
        assert main(["fit", "-c", str(write_yaml(tmp_path / "tiny.yaml", cfg))]) == 0
    out, err = capfd.readouterr()
    console = out + err
    assert "Trainable params" in console and "Step" in console and " 3/3 " in console
    for noise in ("litlogger", "LeafSpec", "FLOPs", "Epoch 0", "-2 ", "v_num"):
        assert noise not in console, noise
    header, rows = read_rows(tmp_path / "run" / "metrics.csv")
    assert [r["step"] for r in rows] == ["0", "1", "2"]
    assert all(r["train/loss"] and r["lr/decay"] and r["lr/no_decay"] for r in rows), rows
    assert rows[-1]["val/loss"] and not any("pg" in h for h in header)

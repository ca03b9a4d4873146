"""mmpt.callbacks.EMA: the average follows its recursion; checkpoints and validation use it."""

from __future__ import annotations

import warnings
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from mmpt.callbacks import EMA
from mmpt.models.module import MMPTModule
from mmpt.models.schedules import Constant


class Tiny(L.LightningModule):
    """Linear body + frozen head, an int buffer; SGD with a large LR so weights move."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)
        self.head.requires_grad_(False)
        self.register_buffer("ids", torch.arange(7) * 1001)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.head(self.body(batch)).pow(2).mean() + self.body.weight.sum()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.seen.append(self.body.weight.detach().clone())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


class TinyMMPT(MMPTModule):
    """The same network as an MMPTModule, frozen by pattern in ``configure_model``."""

    def __init__(self) -> None:
        super().__init__(
            optimizer=partial(torch.optim.SGD, lr=0.1), lr_schedule=Constant(), freeze=["head.*"]
        )
        self.body = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.head(self.body(batch)).pow(2).mean() + self.body.weight.sum()


class Recorder(L.Callback):
    """Trainable weights after every optimizer step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.steps.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def _data(n: int) -> DataLoader:
    return DataLoader(torch.randn(n * 2, 4, generator=torch.Generator().manual_seed(0)), 2)


def _fit(module: L.LightningModule, ema: EMA, steps: int, **kw: object) -> Recorder:
    rec = Recorder()
    callbacks = [rec, ema, *kw.pop("callbacks", [])]  # type: ignore[misc]
    kw.setdefault("enable_checkpointing", False)
    kw.setdefault("limit_val_batches", 0)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kw,  # type: ignore[arg-type]
    )
    val = _data(1) if kw["limit_val_batches"] else None
    trainer.fit(module, _data(steps), val)
    return rec


def _expected(rec: Recorder, decay: float, update_steps: list[int]) -> dict[str, torch.Tensor]:
    """Closed-form recursion over the recorded weights after the given 0-based steps."""
    ema: dict[str, torch.Tensor] = {}
    for i in update_steps:
        w = {k: v.double() for k, v in rec.steps[i].items()}
        ema = w if not ema else {k: decay * ema[k] + (1 - decay) * w[k] for k in w}
    return ema


@pytest.mark.parametrize(("start", "every", "steps"), [(0, 1, 6), (2, 2, 7)])
def test_ema_matches_recursion(start: int, every: int, steps: int) -> None:
    torch.manual_seed(0)
    model = Tiny()
    head0 = model.head.weight.detach().clone()
    ema = EMA(decay=0.8, start_step=start, every_n_steps=every)
    rec = _fit(model, ema, steps)
    assert len(rec.steps) == steps
    updates = list(range(start, steps, every))
    expected = _expected(rec, 0.8, updates)
    assert not torch.allclose(rec.steps[-1]["body.weight"].double(), expected["body.weight"])
    averaged = ema._average_model.module.state_dict()  # type: ignore[union-attr]
    for k in ("body.weight", "body.bias"):
        torch.testing.assert_close(averaged[k].double(), expected[k], rtol=0, atol=1e-6)
        # after fit the module holds the average (Lightning's on_train_end)
        torch.testing.assert_close(model.state_dict()[k].double(), expected[k], rtol=0, atol=1e-6)
    assert torch.equal(model.head.weight, head0)  # frozen: bit-identical
    assert torch.equal(model.ids, torch.arange(7) * 1001)  # int buffer: copied, not averaged


def test_ema_last_ckpt_holds_average(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ema = EMA(decay=0.5)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    rec = _fit(Tiny(), ema, 4, enable_checkpointing=True, callbacks=[ckpt])
    obj = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    expected = _expected(rec, 0.5, [0, 1, 2, 3])
    torch.testing.assert_close(obj["state_dict"]["body.weight"].double(), expected["body.weight"])
    live = obj["current_model_state"]["body.weight"]
    assert torch.equal(live, rec.steps[-1]["body.weight"])
    assert int(obj["averaging_state"]["n_averaged"]) == 4


def test_ema_validates_on_average_and_follows_model_before_start() -> None:
    torch.manual_seed(0)
    model = Tiny()
    model.seen = []
    ema = EMA(decay=0.5, start_step=100)
    rec = _fit(model, ema, 3, limit_val_batches=1, val_check_interval=1)
    # EMA not started: validation and the final module see the trained weights
    assert torch.equal(model.seen[-1], rec.steps[-1]["body.weight"])
    assert torch.equal(model.body.weight, rec.steps[-1]["body.weight"])


def test_ema_validation_swaps_in_average() -> None:
    torch.manual_seed(0)
    model = Tiny()
    model.seen = []
    ema = EMA(decay=0.5)
    rec = _fit(model, ema, 2, limit_val_batches=1, val_check_interval=2)
    expected = _expected(rec, 0.5, [0, 1])["body.weight"]
    torch.testing.assert_close(model.seen[-1].double(), expected)


def test_ema_mmpt_module_freeze_no_warning() -> None:
    torch.manual_seed(0)
    model = TinyMMPT()
    head0 = model.head.weight.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = _fit(model, EMA(decay=0.9), 3)
    assert not [w for w in caught if "WeightAveraging" in str(w.message)]
    assert not model.head.weight.requires_grad
    assert torch.equal(model.head.weight, head0)
    expected = _expected(rec, 0.9, [0, 1, 2])["body.weight"]
    torch.testing.assert_close(model.body.weight.double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs", [{"decay": 1.0}, {"decay": 0.0}, {"start_step": -1}, {"every_n_steps": 0}]
)
def test_ema_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="EMA"):
        EMA(**kwargs)


class CLIFactory:
    """An optimizer factory holding the run's datamodule, as LightningCLI's does.

    LightningCLI's ``OptimizerCallable`` closes over the CLI, whose config holds the
    instantiated datamodule and its :class:`~mmpt.datamodules.stages.SharedEpoch` counters
    (a ``multiprocessing.Value``, which cannot be deep-copied).
    """

    def __init__(self) -> None:
        from mmpt.datamodules.stages import SharedEpoch

        self.datamodule_epoch = SharedEpoch()

    def __call__(self, params: list) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=0.1)


class TinyCLIModule(TinyMMPT):
    """TinyMMPT whose optimizer factory reaches a shared-memory counter (the continual recipe)."""

    def __init__(self) -> None:
        super().__init__()
        self.optimizer_factory = CLIFactory()


def test_deepcopy_shares_the_optimizer_factory_and_copies_the_weights() -> None:
    import copy

    model = TinyCLIModule()
    twin = copy.deepcopy(model)
    assert twin.optimizer_factory is model.optimizer_factory
    assert twin.body.weight is not model.body.weight
    assert torch.equal(twin.body.weight, model.body.weight)
    assert twin.freeze_patterns == model.freeze_patterns
    assert twin.freeze_patterns is not model.freeze_patterns  # the rest is a real deep copy
    twin.body.weight.data.add_(1.0)
    assert not torch.equal(twin.body.weight, model.body.weight)


def test_ema_with_a_factory_holding_the_datamodule() -> None:
    """The continual ``ema`` recipe failed at setup: the average's deep copy of the module
    reached the datamodule's ``multiprocessing.Value`` through the optimizer factory."""
    torch.manual_seed(0)
    model = TinyCLIModule()
    ema = EMA(decay=0.9)
    rec = _fit(model, ema, 3)
    expected = _expected(rec, 0.9, [0, 1, 2])["body.weight"]
    torch.testing.assert_close(model.body.weight.double(), expected, rtol=0, atol=1e-6)

"""mmpt.guards: non-finite steps skipped exactly (weights and AdamW state) or stopped; OOM told."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from mmpt.batch import ImageBatch
from mmpt.guards import (
    NonFiniteGuard,
    NonFiniteLossError,
    OOMReporter,
    describe_batch,
)


def make_batches(n: int = 8) -> list[ImageBatch]:
    gen = torch.Generator().manual_seed(0)
    return [
        ImageBatch(
            images=torch.randn(4, 3, 2, 2, generator=gen),
            labels=torch.randint(0, 3, (4,), generator=gen),
            keys=[f"b{i}-s{j}" for j in range(4)],
        )
        for i in range(n)
    ]


class Tiny(L.LightningModule):
    """Linear classifier; ``nan_loss`` / ``nan_grad`` batch indices poison the loss / grads."""

    def __init__(self, nan_loss: set[int] = frozenset(), nan_grad: set[int] = frozenset()):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(12, 3)
        self.bad_loss = {f"b{i}-s0" for i in nan_loss}
        self.bad_grad = {f"b{i}-s0" for i in nan_grad}
        self.oom = False

    def training_step(self, batch: ImageBatch | torch.Tensor, batch_idx: int) -> torch.Tensor:
        if self.oom:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if not isinstance(batch, ImageBatch):  # a plain tensor batch, without keys
            return self.net(batch).sum()
        loss = nn.functional.cross_entropy(self.net(batch.images.flatten(1)), batch.labels)
        if batch.keys[0] in self.bad_loss:
            loss = loss * float("nan")
        if batch.keys[0] in self.bad_grad:
            loss = loss + torch.sqrt(self.net.weight.sum() * 0)  # value 0, gradient NaN
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.05, weight_decay=0.1)


def fit(model: Tiny, batches: list, tmp_path: Path, callbacks: list, **kw: object) -> L.Trainer:
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(tmp_path),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        **kw,
    )
    trainer.fit(model, DataLoader(batches, batch_size=None))
    return trainer


def state(model: Tiny, trainer: L.Trainer) -> tuple[dict, dict]:
    opt = trainer.optimizers[0].state_dict()
    return model.state_dict(), opt["state"]


def assert_same(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    for k in a[0]:
        torch.testing.assert_close(a[0][k], b[0][k], rtol=0, atol=0)
    assert a[1].keys() == b[1].keys()
    for i in a[1]:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(a[1][i][name], b[1][i][name], rtol=0, atol=0)


@pytest.mark.parametrize("poison", ["nan_loss", "nan_grad"])
def test_skip_equals_run_without_bad_batches(tmp_path: Path, poison: str) -> None:
    batches, bad = make_batches(), {2, 5}
    model = Tiny(**{poison: bad})
    guard = NonFiniteGuard(action="skip", max_skips=1)
    with pytest.warns(UserWarning, match="skipped optimizer step") as record:
        trainer = fit(model, batches, tmp_path / "a", [guard])
    ref_model = Tiny()
    good = [b for i, b in enumerate(batches) if i not in bad]
    ref = fit(ref_model, good, tmp_path / "b", [])
    assert_same(state(model, trainer), state(ref_model, ref))
    assert int(trainer.optimizers[0].state_dict()["state"][0]["step"]) == len(good)
    assert guard.skipped == 2 and trainer.global_step == len(batches)
    text = " ".join(str(w.message) for w in record if "NonFiniteGuard" in str(w.message))
    assert "b2-s0" in text and "b5-s3" in text
    assert ("loss nan" in text) == (poison == "nan_loss")
    if poison == "nan_grad":
        assert "gradients" in text
    metrics = (Path(trainer.logger.log_dir) / "metrics.csv").read_text()
    assert "guard/nonfinite_skipped" in metrics


def test_stop_names_step_and_keys(tmp_path: Path) -> None:
    model = Tiny(nan_loss={3})
    with pytest.raises(NonFiniteLossError, match=r"step 3: loss nan .*b3-s0, b3-s1"):
        fit(model, make_batches(), tmp_path, [NonFiniteGuard(action="stop")])


def test_nonfinite_grads_stop_with_finite_loss(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteLossError, match=r"gradients \(finite loss\); keys: b1-s0"):
        fit(Tiny(nan_grad={1}), make_batches(), tmp_path, [NonFiniteGuard(action="stop")])


def test_grads_unchecked_when_disabled(tmp_path: Path) -> None:
    guard = NonFiniteGuard(action="stop", check_grads=False)
    model = Tiny(nan_grad={1})
    # the NaN gradients of batch 1 go through; the NaN weights then give a NaN loss at step 2
    with pytest.raises(NonFiniteLossError, match=r"step 2: loss nan"):
        fit(model, make_batches(), tmp_path, [guard])
    assert torch.isnan(model.net.weight).all()


def test_max_skips_stops(tmp_path: Path) -> None:
    guard = NonFiniteGuard(action="skip", max_skips=2)
    with (
        warnings.catch_warnings(),
        pytest.raises(NonFiniteLossError, match=r"3 consecutive .*max_skips=2.*step 4"),
    ):
        warnings.simplefilter("ignore")
        fit(Tiny(nan_loss={2, 3, 4}), make_batches(), tmp_path, [guard])


def test_accumulation_skips_whole_window(tmp_path: Path) -> None:
    batches = make_batches()
    model = Tiny(nan_loss={2})
    with pytest.warns(UserWarning, match=r"loss nan \(batch 2\); keys: b2-s0"):
        trainer = fit(model, batches, tmp_path / "a", [NonFiniteGuard()], accumulate_grad_batches=2)
    ref_model = Tiny()
    ref = fit(ref_model, batches[:2] + batches[4:], tmp_path / "b", [], accumulate_grad_batches=2)
    assert_same(state(model, trainer), state(ref_model, ref))


def test_batches_without_keys(tmp_path: Path) -> None:
    batches = [torch.randn(4, 12) for _ in range(3)]
    batches[1][0, 0] = float("inf")
    with pytest.raises(NonFiniteLossError, match=r"step 1: loss \S+ \(batch 1\); keys: \(none\)"):
        fit(Tiny(), batches, tmp_path, [NonFiniteGuard(action="stop")])
    with pytest.warns(UserWarning, match="skipped"):
        fit(Tiny(), batches, tmp_path, [NonFiniteGuard()])


def test_bad_args() -> None:
    with pytest.raises(ValueError, match="action"):
        NonFiniteGuard(action="ignore")


def test_oom_report(tmp_path: Path) -> None:
    model = Tiny()
    model.oom = True
    with pytest.raises(torch.OutOfMemoryError) as info:
        fit(model, make_batches(), tmp_path, [OOMReporter()])
    msg = "\n".join(getattr(info.value, "__notes__", []))  # printed with the traceback
    assert "ImageBatch with 4 keys" in msg and "images (4, 3, 2, 2) float32" in msg
    assert "labels (4,) int64" in msg and "global step 0" in msg
    assert "data.batch_size" in msg and "accumulate_grad_batches" in msg
    assert "gradient_checkpointing" in msg and "fsdp" in msg and "bf16-mixed" in msg


def test_runtime_oom_and_other_errors(tmp_path: Path) -> None:
    class Boom(Tiny):
        def training_step(self, batch: ImageBatch, batch_idx: int) -> torch.Tensor:
            raise RuntimeError(self.message)

    model = Boom()
    model.message = "CUDA error: out of memory"
    with pytest.raises(RuntimeError, match="out of memory") as info:
        fit(model, make_batches(), tmp_path, [OOMReporter()])
    assert "Last training batch" in "\n".join(info.value.__notes__)
    model.message = "something else"
    with pytest.raises(RuntimeError, match="something else"):
        fit(model, make_batches(), tmp_path, [OOMReporter()])


def test_describe_batch_nested() -> None:
    text = describe_batch({"pixels": [torch.zeros(2, 3, 8, 8, dtype=torch.uint8)], "keys": ["a"]})
    assert "pixels[0] (2, 3, 8, 8) uint8" in text and "with 1 keys" in text


def test_ranks_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another rank's bad step (all-reduced flag) makes this finite rank skip too."""
    import mmpt.guards as guards

    bad_rank_steps = {3}
    calls: list[int] = []

    def reduce_max(flag: torch.Tensor) -> None:
        calls.append(int(flag))
        if len(calls) - 1 in bad_rank_steps:
            flag.fill_(1)

    monkeypatch.setattr(guards, "_reduce_max", reduce_max)
    model = Tiny()
    with pytest.warns(UserWarning, match=r"step 3: non-finite loss or gradients on another rank"):
        trainer = fit(model, make_batches(), tmp_path / "a", [NonFiniteGuard()])
    monkeypatch.undo()
    ref_model = Tiny()
    batches = make_batches()
    ref = fit(ref_model, batches[:3] + batches[4:], tmp_path / "b", [])
    assert_same(state(model, trainer), state(ref_model, ref))
    assert calls == [0] * len(batches)

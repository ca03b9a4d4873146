"""mmpt merge: weighted averages of checkpoints, key/shape/buffer checks, loadable output."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from mmpt.merge_cli import DROPPED_KEYS, main, merge_checkpoints
from mmpt.models.module import load_checkpoint, load_matching


class Tiny(L.LightningModule):
    """Two linears, a float buffer and an int buffer (like position ids)."""

    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Linear(4, width)
        self.norm = nn.BatchNorm1d(width)  # float stats + int64 num_batches_tracked
        self.register_buffer("position_ids", torch.arange(5))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.norm(self.body(batch)).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.1)


def _train(seed: int, path: Path, width: int = 3) -> Path:
    """A real Lightning checkpoint after 2 steps (optimizer state, loops, callbacks...)."""
    torch.manual_seed(seed)
    model = Tiny(width)
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(torch.randn(8, 4), batch_size=4))
    trainer.save_checkpoint(path)
    obj = torch.load(path, weights_only=False)
    obj["mmpt_image_tower"] = {"attr": "vision", "tower": {"class_path": "x"}}
    torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return [_train(seed, root / f"run{seed}.ckpt") for seed in range(3)]


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def _check_mean(out: dict, paths: list[Path], weights: list[float]) -> None:
    states = [_state(p) for p in paths]
    assert list(out["state_dict"]) == list(states[0])
    for key, got in out["state_dict"].items():
        if got.is_floating_point():
            want = sum(w * s[key].double() for w, s in zip(weights, states, strict=True))
            torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
            assert got.dtype == states[0][key].dtype
        else:
            assert torch.equal(got, states[0][key])


def test_merge_two_normalizes_weights(ckpts: list[Path]) -> None:
    out = merge_checkpoints([str(p) for p in ckpts[:2]], [1.0, 3.0])
    _check_mean(out, ckpts[:2], [0.25, 0.75])
    assert out["mmpt_merge"]["weights"] == [0.25, 0.75]
    assert out["mmpt_merge"]["sources"] == [str(p) for p in ckpts[:2]]
    assert not set(DROPPED_KEYS) & set(out)
    assert out["hyper_parameters"] == {"width": 3}
    assert out["mmpt_image_tower"]["attr"] == "vision"


def test_merge_three_equal_and_task_arithmetic(ckpts: list[Path]) -> None:
    paths = [str(p) for p in ckpts]
    _check_mean(merge_checkpoints(paths, None), ckpts, [1 / 3] * 3)
    out = merge_checkpoints(paths, [1.0, 1.0, -1.0], normalize=False)  # a + (b - c)
    _check_mean(out, ckpts, [1.0, 1.0, -1.0])
    with pytest.raises(ValueError, match="negative weights .* need --no-normalize"):
        merge_checkpoints(paths, [1.0, 1.0, -1.0])
    with pytest.raises(ValueError, match="got 2 weights for 3 checkpoints"):
        merge_checkpoints(paths, [1.0, 1.0])


def test_merge_plain_state_dicts_cast_to_first_dtype(tmp_path: Path) -> None:
    torch.manual_seed(0)
    a, b = Tiny().state_dict(), Tiny().state_dict()
    a = {k: v.half() if v.is_floating_point() else v for k, v in a.items()}
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    out = merge_checkpoints([str(tmp_path / "a.pt"), str(tmp_path / "b.pt")], [0.5, 0.5])
    assert set(out) == {"state_dict", "mmpt_merge"}
    w = out["state_dict"]["body.weight"]
    assert w.dtype == torch.float16
    want = (a["body.weight"].float() + b["body.weight"]) / 2
    torch.testing.assert_close(w, want.half())
    with pytest.raises(ValueError, match="is a plain state dict but .* is a Lightning checkpoint"):
        lightning = tmp_path / "l.ckpt"
        torch.save({"state_dict": b}, lightning)
        merge_checkpoints([str(lightning), str(tmp_path / "a.pt")], None)


def _save_pair(tmp_path: Path, b: dict[str, torch.Tensor]) -> list[str]:
    torch.manual_seed(0)
    torch.save({"state_dict": Tiny().state_dict()}, tmp_path / "a.ckpt")
    torch.save({"state_dict": b}, tmp_path / "b.ckpt")
    return [str(tmp_path / "a.ckpt"), str(tmp_path / "b.ckpt")]


def test_merge_rejects_shape_mismatch(tmp_path: Path) -> None:
    paths = _save_pair(tmp_path, Tiny(width=6).state_dict())
    with pytest.raises(ValueError) as err:
        merge_checkpoints(paths, None)
    msg = str(err.value)
    assert "'body.weight'" in msg and "(3, 4)" in msg and "(6, 4)" in msg


def test_merge_rejects_missing_and_extra_keys(tmp_path: Path) -> None:
    state = Tiny().state_dict()
    del state["norm.running_var"]
    paths = _save_pair(tmp_path, state)
    with pytest.raises(ValueError, match=r"b\.ckpt lacks key 'norm.running_var' present in .*a"):
        merge_checkpoints(paths, None)
    paths = _save_pair(tmp_path, {**Tiny().state_dict(), "extra.weight": torch.ones(2)})
    with pytest.raises(ValueError, match=r"b\.ckpt has extra key 'extra.weight'"):
        merge_checkpoints(paths, None)


def test_merge_rejects_int_buffer_mismatch(tmp_path: Path) -> None:
    state = Tiny().state_dict()
    state["position_ids"] = torch.arange(5) + 1
    paths = _save_pair(tmp_path, state)
    with pytest.raises(ValueError, match="non-float tensor 'position_ids'"):
        merge_checkpoints(paths, None)


def test_merged_checkpoint_loads(ckpts: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "sub" / "merged.ckpt"
    assert main(["--ckpt", *map(str, ckpts[:2]), "--out", str(out)]) == 0
    model = Tiny()
    assert load_matching(model, str(out)) == ([], [])
    expected = merge_checkpoints([str(p) for p in ckpts[:2]], None)["state_dict"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key])
    load_checkpoint(Tiny(), str(out))
    again = Tiny.load_from_checkpoint(out)
    assert torch.equal(again.body.weight, expected["body.weight"])
    assert not list(tmp_path.glob("sub/.*.tmp"))


def test_cli_summary_and_missing_file(
    ckpts: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "merged.ckpt"
    args = ["--ckpt", *map(str, ckpts[:2]), "--weights", "1", "3", "--out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "normalized to sum 1" in text and "averaged" in text and "copied" in text
    saved = torch.load(out, weights_only=False)
    assert saved["mmpt_merge"]["weights"] == [0.25, 0.75]
    assert "optimizer_states" not in saved and "loops" not in saved

    missing = str(tmp_path / "nope.ckpt")
    assert main(["--ckpt", str(ckpts[0]), missing, "--out", str(tmp_path / "x.ckpt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "nope.ckpt" in err[0]
    assert not (tmp_path / "x.ckpt").exists()

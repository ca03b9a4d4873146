"""Checkpoints never run code: a malicious pickle is refused by every reader, before it runs.

Every place mmpt reads a checkpoint (``model.init_from``, ``mmpt eval``/``load_checkpoint``,
``mmpt merge``, the re-warm schedule, ``tower_from_checkpoint``, a tower's ``init_from``, the
resume IO and the FSDP strategies) refuses a file whose pickle names a global outside the
allow-list, naming the file, the global and the escape hatch; the marker file its payload
would create never appears. The escape hatch loads a trusted legacy file, and checkpoints a
real fit writes load everywhere.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml

from mmpt.checkpoint_io import AtomicCheckpointIO
from mmpt.merge_cli import main as merge_main
from mmpt.models.contrastive import ContrastiveModule
from mmpt.models.encoders import OpenCLIPTextTower, TimmVisionTower
from mmpt.models.encoders.from_checkpoint import tower_from_checkpoint
from mmpt.models.module import load_checkpoint
from mmpt.models.schedules import Rewarm
from mmpt.safe_load import UnsafeCheckpointError, check_pickle
from tests.helpers import TINY_TEXT, TINY_VISION, write_shards

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*IterableDataset. has .__len__. defined"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


class Payload:
    """Unpickling this creates ``marker`` (what an attacker's ``os.system`` call would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def make_model(**kw: Any) -> ContrastiveModule:
    torch.manual_seed(0)
    vision = TimmVisionTower(**TINY_VISION["init_args"])
    text = OpenCLIPTextTower(**TINY_TEXT["init_args"])
    return ContrastiveModule(vision, text, **kw)


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 2-step fit of a tiny CLIP, saved by Lightning through mmpt's checkpoint IO."""
    from mmpt.datamodules.image_text import ImageTextDataModule
    from mmpt.datamodules.streams import StreamConfig

    tmp = tmp_path_factory.mktemp("real")
    shards = write_shards(tmp / "shards", n=16, per_shard=8)
    model = make_model(optimizer=functools.partial(torch.optim.AdamW, lr=1e-3))
    dm = ImageTextDataModule(
        train=StreamConfig(urls=str(shards), shuffle_buffer=0),
        batch_size=8,
        num_workers=0,
        preprocess=model.preprocess,
    )
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(tmp / "real.ckpt")
    return {"tmp": tmp, "shards": shards, "ckpt": tmp / "real.ckpt", "model": model, "dm": dm}


@pytest.fixture
def evil(real: dict[str, Any], tmp_path: Path) -> tuple[Path, Path]:
    """A real checkpoint with a payload in it (its tensors all load; only the pickle is bad)."""
    marker = tmp_path / "pwned"
    obj = torch.load(real["ckpt"], map_location="cpu", weights_only=True)
    obj["hyper_parameters"] = {"note": Payload(marker)}
    torch.save(obj, tmp_path / "evil.ckpt")
    return tmp_path / "evil.ckpt", marker


@pytest.fixture
def legacy(real: dict[str, Any], tmp_path: Path) -> Path:
    """A trusted old-style checkpoint: hyper-parameters as an ``argparse.Namespace``."""
    obj = torch.load(real["ckpt"], map_location="cpu", weights_only=True)
    obj["hyper_parameters"] = argparse.Namespace(lr=1e-3, run="old")
    torch.save(obj, tmp_path / "legacy.ckpt")
    return tmp_path / "legacy.ckpt"


def _refusal(path: Path, global_name: str) -> str:
    return rf"{path.name}: refused to load.*{global_name}.*convert it once"


def _loaders(real: dict[str, Any]) -> dict[str, Any]:
    """Every in-process reader of a checkpoint, each taking the path."""
    return {
        "init_from": lambda p: make_model(init_from=str(p)).configure_model(),
        "load_checkpoint": lambda p: load_checkpoint(make_model(), str(p)),
        "rewarm": lambda p: Rewarm(from_checkpoint=str(p), warmup_steps=2),
        "tower_from_checkpoint": lambda p: tower_from_checkpoint(str(p)),
        "tower_init_from": lambda p: TimmVisionTower(
            **{**TINY_VISION["init_args"], "init_from": str(p)}
        ),
        "resume_io": lambda p: AtomicCheckpointIO().load_checkpoint(p),
        "strategy_guard": lambda p: check_pickle(p),
    }


LOADERS = list(_loaders({}))


@pytest.mark.parametrize("reader", LOADERS)
def test_malicious_pickle_is_refused_before_it_runs(reader, real, evil):
    path, marker = evil
    with pytest.raises(UnsafeCheckpointError, match=_refusal(path, "builtins.exec")):
        _loaders(real)[reader](path)
    assert not marker.exists()


def test_the_payload_does_run_without_the_guard(evil):
    """The test's payload is real: torch's unsafe load creates the marker."""
    path, marker = evil
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_merge_and_eval_clis_refuse_it(real, evil, tmp_path, capsys):
    path, marker = evil
    args = ["--ckpt", str(path), str(real["ckpt"]), "--out", str(tmp_path / "m.ckpt")]
    assert merge_main(args) == 2
    assert "refused to load" in capsys.readouterr().err
    from mmpt.eval.cli import main as eval_main

    config = _config(real, tmp_path)
    args = ["retrieval", "-c", str(config), "--ckpt", str(path), "--data", str(real["shards"])]
    assert eval_main([*args, "--device", "cpu", "--num-workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "refused to load" in err and "builtins.exec" in err and "convert it once" in err
    assert not marker.exists() and not (tmp_path / "m.ckpt").exists()


def _config(real: dict[str, Any], tmp_path: Path) -> Path:
    config = {
        "trainer": {"accelerator": "cpu", "logger": False},
        "model": {
            "class_path": "mmpt.models.contrastive.ContrastiveModule",
            "init_args": {"vision": TINY_VISION, "text": TINY_TEXT},
        },
        "data": {
            "class_path": "mmpt.datamodules.image_text.ImageTextDataModule",
            "init_args": {"train": {"urls": str(real["shards"])}, "num_workers": 0},
        },
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _last_lr(path: Path) -> float:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj["optimizer_states"][0]["param_groups"][0]["lr"]


def test_no_escape_hatch_a_trusted_legacy_file_is_converted(
    real, legacy, tmp_path, monkeypatch, capsys
):
    """Nothing unpickles without the allow-list (no flag, no variable, not the Trainer's
    ``weights_only=False``); the conversion the refusal names then loads everywhere."""
    want = real["model"].state_dict()
    monkeypatch.setenv("MMPT_UNSAFE_LOAD", "1")  # the removed escape hatch's variable: ignored
    for reader in LOADERS:
        with pytest.raises(UnsafeCheckpointError, match=_refusal(legacy, "argparse.Namespace")):
            _loaders(real)[reader](legacy)
    with pytest.raises(UnsafeCheckpointError, match=_refusal(legacy, "argparse.Namespace")):
        AtomicCheckpointIO().load_checkpoint(legacy, weights_only=False)
    out = tmp_path / "merged.ckpt"
    with pytest.raises(SystemExit):  # the removed flag is an unknown argument
        merge_main(["--ckpt", str(legacy), str(real["ckpt"]), "--out", str(out), "--unsafe-load"])
    assert not out.exists()
    capsys.readouterr()
    # the user's own code, trusting the file: its state dict alone, then mmpt reads it
    converted = tmp_path / "converted.pt"
    torch.save(torch.load(legacy, map_location="cpu", weights_only=False)["state_dict"], converted)
    model = make_model()
    load_checkpoint(model, str(converted))
    torch.testing.assert_close(model.state_dict(), want, rtol=0, atol=0)
    model = make_model(init_from=str(converted))
    model.configure_model()
    torch.testing.assert_close(model.state_dict(), want, rtol=0, atol=0)
    assert merge_main(["--ckpt", str(converted), str(converted), "--out", str(out)]) == 0


def test_real_checkpoints_load_everywhere(real, tmp_path, capsys):
    ckpt, want = real["ckpt"], real["model"].state_dict()
    model = make_model(init_from=str(ckpt))
    model.configure_model()
    torch.testing.assert_close(model.state_dict(), want, rtol=0, atol=0)
    model = make_model()
    load_checkpoint(model, str(ckpt))
    torch.testing.assert_close(model.state_dict(), want, rtol=0, atol=0)
    assert Rewarm(from_checkpoint=str(ckpt), warmup_steps=2).old_lr == _last_lr(ckpt)
    tower = tower_from_checkpoint(str(ckpt))
    torch.testing.assert_close(tower.state_dict(), real["model"].vision.state_dict())
    assert merge_main(["--ckpt", str(ckpt), str(ckpt), "--out", str(tmp_path / "m.ckpt")]) == 0
    check_pickle(ckpt)
    resumed = make_model(optimizer=functools.partial(torch.optim.AdamW, lr=1e-3))
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(resumed, datamodule=real["dm"], ckpt_path=str(ckpt))  # --ckpt_path resume
    assert trainer.global_step == 3


def test_the_allow_list_admits_path_values(real, tmp_path):
    """Plain data a Lightning module may save beyond torch's list (paths in hyper-parameters)."""
    from mmpt.safe_load import load_torch_file

    obj = torch.load(real["ckpt"], map_location="cpu", weights_only=True)
    obj["hyper_parameters"] = {"lr": 1e-3, "data": Path("/data/shards")}
    torch.save(obj, tmp_path / "hparams.ckpt")
    with pytest.raises(Exception, match="PosixPath"):
        torch.load(tmp_path / "hparams.ckpt", weights_only=True)  # torch's own list refuses
    loaded = load_torch_file(tmp_path / "hparams.ckpt")
    assert loaded["hyper_parameters"] == {"lr": 1e-3, "data": Path("/data/shards")}
    check_pickle(tmp_path / "hparams.ckpt")


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_the_strategy_guard_refuses_every_pickle_protocol(real, tmp_path, protocol):
    """Protocol 4+ pickles (FRAME, STACK_GLOBAL) are refused too, never let through unscanned."""
    marker = tmp_path / "pwned"
    obj = torch.load(real["ckpt"], map_location="cpu", weights_only=True)
    obj["hyper_parameters"] = {"note": Payload(marker)}
    path = tmp_path / f"evil{protocol}.ckpt"
    torch.save(obj, path, pickle_protocol=protocol)
    with pytest.raises(UnsafeCheckpointError):
        check_pickle(path)
    assert not marker.exists()

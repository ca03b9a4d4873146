"""An adapted run (LoRA with dropout) stopped mid-epoch and resumed with ``--ckpt_path`` ends
bit-identical to the uninterrupted run; ``init_from`` loads base weights before adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mmpt.cli import main
from mmpt.safe_load import load_tensors
from tests.helpers import write_shards
from tests.test_cli import tiny_fit_config, write_yaml

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*IterableDataset. has .__len__. defined"),
    pytest.mark.filterwarnings("ignore:LightningCLI's args parameter"),
]
ADAPTERS = [
    {"kind": "lora", "targets": ["vision.*.qkv"], "r": 2, "alpha": 4, "dropout": 0.2},
    {"kind": "lora", "targets": ["text.*.mlp.c_fc"], "r": 2, "alpha": 4, "dropout": 0.2},
]


def _config(shards: Path, run: Path, steps: int, init_from: str | None = None) -> dict[str, Any]:
    cfg = tiny_fit_config(shards, run)
    trainer = cfg["trainer"]
    trainer.update(max_steps=steps, limit_val_batches=0)
    trainer.pop("val_check_interval")
    trainer["callbacks"] = [trainer["callbacks"][0]]  # the checkpoint only
    trainer["callbacks"][0]["init_args"]["every_n_train_steps"] = 1
    model = cfg["model"]["init_args"]
    model["adapters"] = ADAPTERS
    model["optimizer"] = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2}}
    # the cut run stops at max_steps 2: a schedule over the run length would differ from 4's
    model["lr_schedule"] = {"class_path": "mmpt.models.schedules.Constant"}
    if init_from is not None:
        model["init_from"] = init_from
    cfg["data"]["init_args"].update(val=None)
    cfg["data"]["init_args"]["train"]["shuffle_buffer"] = 16
    return cfg


def _fit(tmp: Path, name: str, steps: int, shards: Path, *extra: str, **kw: Any) -> dict:
    run = tmp / name
    cfg = write_yaml(tmp / f"{name}.yaml", _config(shards, run, steps, **kw))
    assert main(["fit", "-c", str(cfg), *extra]) == 0
    return load_tensors(str(run / "checkpoints" / "last.ckpt"))


@pytest.mark.slow  # three short fits: ~30 s of CPU
def test_resume_mid_epoch_with_adapters_is_exact(tmp_path: Path) -> None:
    shards = write_shards(tmp_path / "shards", n=40, per_shard=5)  # 5 batches an epoch
    whole = _fit(tmp_path, "whole", 4, shards)
    _fit(tmp_path, "cut", 2, shards)
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    resumed = _fit(tmp_path, "cut", 4, shards, "--ckpt_path", str(last))
    assert whole["global_step"] == resumed["global_step"] == 4
    a, b = whole["state_dict"], resumed["state_dict"]
    assert a.keys() == b.keys() and any("lora_A" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]

    # init_from a plain (adapter-less) checkpoint: its weights become the adapted model's base
    plain = tmp_path / "plain.ckpt"
    base = {k.replace(".base_layer", ""): v for k, v in a.items() if "lora_" not in k}
    torch.save({"state_dict": base}, plain)
    started = _fit(tmp_path, "from_plain", 1, shards, init_from=str(plain))["state_dict"]
    frozen = [k for k in started if "lora_" not in k and "logit_scale" not in k]
    assert frozen and all(
        torch.equal(started[k], base[k.replace(".base_layer", "")]) for k in frozen
    )

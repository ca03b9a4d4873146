"""Adapters under DDP and FSDP2: a 2-step fit of the tiny VLM with LoRA on its LLM on two CPU
(gloo) processes; the saved checkpoint loads into the adapted model, the LoRA weights moved
and every base weight is the one it started from."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mmpt.cli import build_cli
from mmpt.models.module import load_checkpoint
from tests.test_configs import CONFIGS, ROOT
from tests.test_distributed_fit import QWEN2_LAYER, SIGLIP_LAYER

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
FSDP2 = {
    "class_path": "mmpt.strategies.FSDP2",
    "init_args": {"layers": [QWEN2_LAYER, SIGLIP_LAYER]},
}
ADAPTERS = [{"kind": "lora", "targets": ["llm.*.q_proj", "llm.*.v_proj"], "r": 4}]


@pytest.mark.slow  # two 2-process fits of the tiny VLM
@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy", ["ddp", FSDP2], ids=["ddp", "fsdp2"])
def test_two_process_fit_trains_only_the_adapters(tmp_path: Path, strategy: object) -> None:
    from mmpt.synth import make_synthetic

    make_synthetic("image-text", tmp_path / "data/shapes", train_samples=64, image_size=32,
                   samples_per_shard=8)  # fmt: skip
    ckpt_dir = tmp_path / "ckpt"
    over = {
        "trainer": {
            "accelerator": "cpu", "devices": 2, "strategy": strategy, "max_steps": 2,
            "limit_val_batches": 0, "val_check_interval": None, "enable_progress_bar": False,
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(ckpt_dir), "save_last": True,
                                         "save_top_k": 0, "every_n_train_steps": 2}}],
        },
        "model": {"init_args": {"adapters": ADAPTERS, "trainable": []}},
        "data": {"init_args": {"batch_size": 2, "num_workers": 0,
                               "train": {"urls": "data/shapes/train", "resampled": True,
                                         "epoch_samples": 32}}},
    }  # fmt: skip
    (tmp_path / "over.yaml").write_text(yaml.safe_dump(over))
    base = str(CONFIGS / "quickstart" / "vila_stage1.yaml")
    cmd = [sys.executable, "-m", "mmpt.cli", "fit", "-c", base, "-c", "over.yaml"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=580)
    assert run.returncode == 0, run.stderr[-4000:]

    args = ["-c", base, "-c", str(tmp_path / "over.yaml"), "--data.init_args.num_workers", "0"]
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the config's tokenizer path is relative
    try:
        model = build_cli(args, run=False).model
    finally:
        os.chdir(cwd)
    model.configure_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_checkpoint(model, str(ckpt_dir / "last.ckpt"))
    after = model.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved and all("lora_" in k for k in moved), moved[:5]
    assert any("lora_B" in k for k in moved)

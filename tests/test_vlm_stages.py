"""Stage 1 -> stage 2 -> stage 3 -> HF export through the real `mmpt` commands and configs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

import mmpt
from mmpt.cli import main
from mmpt.synth import make_synthetic

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "quickstart"
FAST = [
    "--trainer.max_steps=3",
    "--trainer.val_check_interval=3",
    "--trainer.limit_val_batches=1",
    "--trainer.log_every_n_steps=1",
    "--data.init_args.num_workers=0",
    "--data.init_args.buffer_size=16",
]


def state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_three_stages_chain_and_export(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    # small versions of the quickstart's synthetic sets, where the configs expect them
    make_synthetic("image-text", "data/shapes", train_samples=96, image_size=32)
    make_synthetic("interleaved", "data/interleaved", train_samples=24, image_size=32)
    make_synthetic("text", "data/text", train_samples=24)
    stage = {i: str(CONFIGS / f"vila_stage{i}.yaml") for i in (1, 2, 3)}
    caplog.set_level(logging.INFO, logger="mmpt.models")

    assert main(["fit", "-c", stage[1], *FAST]) == 0
    s1 = state(Path("runs/vila_tiny/last/checkpoints/last.ckpt"))

    assert main(["fit", "-c", stage[2], *FAST, "--data.init_args.train.epoch_samples=24"]) == 0
    loaded = [r.getMessage() for r in caplog.records if "init_from" in r.getMessage()]
    assert loaded and f"loaded {len(s1)} tensors, 0 missing, 0 unexpected" in loaded[-1]
    s2 = state(Path("runs/vila_tiny_stage2/last/checkpoints/last.ckpt"))
    # stage 2 started from stage 1: its frozen vision tower is stage 1's, bit for bit
    vision = [k for k in s1 if k.startswith("vision.")]
    assert vision and all(torch.equal(s1[k], s2[k]) for k in vision)
    assert not torch.equal(s1["connector.proj.0.weight"], s2["connector.proj.0.weight"])

    assert main(["fit", "-c", stage[3], *FAST, "--data.init_args.train.epoch_samples=24"]) == 0
    s3 = Path("runs/vila_tiny_stage3/last/checkpoints/last.ckpt")
    metrics = Path("runs/vila_tiny_stage3/version_0/metrics.csv").read_text()
    assert "train/loss" in metrics and "val/loss" in metrics

    # the export runs on the CPU even when the training config asks for 8 GPUs
    Path("gpus.yaml").write_text("trainer: {accelerator: gpu, devices: 8, strategy: ddp}\n")
    export = ["export", "-c", stage[3], "-c", "gpus.yaml", "--ckpt", str(s3), "--out", "hf"]
    assert main(export) == 0
    # the quickstart's SigLIP tower + mlp2x_gelu is a transformers LLaVA, with its chat template
    config = json.loads(Path("hf/config.json").read_text())
    assert config["model_type"] == "llava" and config["image_token_index"] > 0
    assert {"model.safetensors", "tokenizer.json", "processor_config.json"} <= {
        p.name for p in Path("hf").iterdir()
    }
    back = mmpt.load("hf")
    assert back.data_template == "chatml" and back.llm.image_token == "<image>"
    # and mmpt's own format on request
    assert main([*export[:-1], "own", "--format", "mmpt"]) == 0
    config = json.loads(Path("own/mmpt_vlm.json").read_text())
    assert config["llm"]["image_token"] == "<image>" and config["template"] == "chatml"
    assert (Path("own") / "connector.safetensors").is_file()


def test_export_of_a_missing_checkpoint_is_a_clean_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_synthetic("image-text", "data/shapes", train_samples=8, image_size=32)
    cfg = str(CONFIGS / "vila_stage1.yaml")
    assert main(["export", "-c", cfg, "--ckpt", "nope.ckpt", "--out", "hf"]) == 2
    assert "no checkpoint at 'nope.ckpt'" in capsys.readouterr().err


def test_fusion_is_chosen_in_yaml(tmp_path, monkeypatch):
    """The quickstart with gated cross-attention instead of token injection, from flags only."""
    monkeypatch.chdir(tmp_path)
    make_synthetic("image-text", "data/shapes", train_samples=48, image_size=32)
    fusion = [
        "--model.init_args.fusion={every: 1}",
        "--model.init_args.trainable=[connector.*, fusion.*]",
    ]
    assert main(["fit", "-c", str(CONFIGS / "vila_stage1.yaml"), *FAST, *fusion]) == 0
    s = state(Path("runs/vila_tiny/last/checkpoints/last.ckpt"))
    gates = [k for k in s if k.startswith("fusion.") and k.endswith("attn_gate")]
    assert len(gates) == 2 and any(float(s[k].abs().sum()) > 0 for k in gates)

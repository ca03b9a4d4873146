"""Every recipe in configs/ parses as written and instantiates through the mmpt CLI once its
towers, data and trainer are swapped for tiny CPU ones; the CLIP ViT-B/16 recipe's numbers."""

from __future__ import annotations

import copy
import importlib
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from mmpt.cli import build_cli, main
from mmpt.synth.vocab import write_synth_tokenizer
from tests.helpers import (
    TINY_BERT_WORDS,
    TINY_LLM_CONFIG,
    TINY_TEXT,
    TINY_VIDEO,
    TINY_VISION,
    write_tiny_bert,
)

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL_CONFIGS = sorted(CONFIGS.rglob("*.yaml"))
IDS = [str(p.relative_to(CONFIGS)) for p in ALL_CONFIGS]


def import_class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def tiny_llm(tokenizer: Path) -> dict[str, Any]:
    return {
        "class_path": "mmpt.models.llm.CausalLM",
        "init_args": {"config": TINY_LLM_CONFIG, "tokenizer": str(tokenizer)},
    }


def tiny_variant(cfg: dict[str, Any], shards: Path) -> dict[str, Any]:
    """The recipe with tiny towers, the test shards and a one-CPU fp32 trainer."""
    cfg = copy.deepcopy(cfg)
    model = cfg["model"]["init_args"]
    if "vision" in model:
        video = model["vision"]["class_path"].endswith("VideoViTTower")
        model["vision"] = TINY_VIDEO if video else TINY_VISION
    if "text" in model:
        if model["text"]["class_path"].endswith("HFTextTower"):
            bert = write_tiny_bert(shards.parent / "bert", TINY_BERT_WORDS)
            model["text"] = {
                "class_path": "mmpt.models.encoders.HFTextTower",
                "init_args": {"path": str(bert), "embed_dim": 16, "context_length": 12},
            }
        else:
            model["text"] = TINY_TEXT
    if "fusion_layers" in model:  # the tiny towers have 2 blocks
        model["fusion_layers"] = 1
    if "llm" in model:
        model["llm"] = tiny_llm(write_synth_tokenizer(shards.parent / "tokenizer"))
        model.pop("init_from", None)
        if "resolution" in model:
            model["resolution"] = {
                "class_path": "mmpt.datamodules.resolution.FixedResolution",
                "init_args": {"image_size": 32, "patch_size": 8},
            }
    data = cfg["data"]["init_args"]
    data.pop("synthetic", None)
    for split in ("train", "val"):
        if data.get(split):
            urls = data[split]["urls"]
            data[split]["urls"] = (
                [str(shards)] * len(urls) if isinstance(urls, list) else str(shards)
            )
    cfg["trainer"].update(
        accelerator="cpu", devices=1, num_nodes=1, strategy="auto", precision="32-true"
    )
    return cfg


def test_there_are_configs() -> None:
    assert CONFIGS / "quickstart" / "clip_tiny.yaml" in ALL_CONFIGS
    assert CONFIGS / "clip_vit_b16.yaml" in ALL_CONFIGS


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=IDS)
def test_config_parses_as_written(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Every class_path imports and every init_args key is accepted (no instantiation)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "-c", str(path), "--print_config"])
    assert exc.value.code == 0, capsys.readouterr().err
    printed = yaml.safe_load(capsys.readouterr().out)
    written = yaml.safe_load(path.read_text())
    assert printed["model"]["class_path"] == written["model"]["class_path"]
    assert printed["data"]["class_path"] == written["data"]["class_path"]


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=IDS)
def test_config_instantiates_with_tiny_overrides(
    path: Path, shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    written = yaml.safe_load(path.read_text())
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(yaml.safe_dump(tiny_variant(written, shards)))

    cli = build_cli(["-c", str(tiny)], run=False)
    model, dm = cli.model, cli.datamodule
    assert type(model) is import_class(written["model"]["class_path"])
    assert type(dm) is import_class(written["data"]["class_path"])
    assert type(model.vision) is import_class(
        tiny_variant(written, shards)["model"]["init_args"]["vision"]["class_path"]
    )
    text_model = model.text if hasattr(model, "text") else model.llm
    tiny_model = tiny_variant(written, shards)["model"]["init_args"]
    expected = (
        tiny_model["text"]["class_path"] if "text" in tiny_model else "mmpt.models.llm.CausalLM"
    )
    assert type(text_model) is import_class(expected)

    # The model's preprocessing reached the datamodule (link_arguments), not a default.
    assert dm.preprocess is not None
    assert dm.preprocess.tokenizer is text_model.tokenizer
    assert dm.preprocess.image == model.vision.image_preprocess
    assert dm.preprocess.image.size == TINY_VISION["init_args"]["image_size"]

    # Everything else in the recipe is kept.
    data = written["data"]["init_args"]
    assert dm.batch_size == data["batch_size"]
    assert dm.num_workers == data["num_workers"]
    assert dm.train_cfg.resampled == data["train"].get("resampled", False)
    assert (dm.val_cfg is None) == (data.get("val") is None)
    opt = model.optimizer_factory([torch.nn.Parameter(torch.zeros(2, 2))])
    written_opt = written["model"]["init_args"]["optimizer"]
    assert type(opt) is import_class(written_opt["class_path"])
    assert opt.defaults["lr"] == written_opt["init_args"]["lr"]
    schedule = written["model"]["init_args"]["lr_schedule"]
    assert type(model.lr_schedule) is import_class(schedule["class_path"])
    callbacks = {type(c) for c in cli.trainer.callbacks}
    for cb in written["trainer"].get("callbacks", []):
        assert import_class(cb["class_path"]) in callbacks

    dm.setup("fit")  # the swapped sources resolve
    sources = written["data"]["init_args"]["train"]["urls"]
    assert len(dm.train_stream.urls) == 8 * (len(sources) if isinstance(sources, list) else 1)


def test_clip_vit_b16_is_open_clips_recipe(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """open_clip's ViT-B/16 numbers: global batch 4096, AdamW lr 5e-4, wd 0.2, betas (0.9, 0.98),
    eps 1e-6, 2000 warmup steps then cosine, bf16 mixed precision."""
    written = yaml.safe_load((CONFIGS / "clip_vit_b16.yaml").read_text())
    trainer, model, data = written["trainer"], written["model"]["init_args"], written["data"]
    assert trainer["precision"] == "bf16-mixed"
    assert trainer["strategy"] == "ddp"
    assert model["vision"]["init_args"]["model_name"] == "ViT-B-16"
    assert model["text"]["init_args"]["model_name"] == "ViT-B-16"
    per_gpu = data["init_args"]["batch_size"]
    assert per_gpu * trainer["devices"] * trainer["num_nodes"] == 4096

    # The numbers as the optimizer and schedule actually receive them.
    monkeypatch.chdir(tmp_path)
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(yaml.safe_dump(tiny_variant(written, shards)))
    cli = build_cli(["-c", str(tiny)], run=False)
    opt = cli.model.optimizer_factory([torch.nn.Parameter(torch.zeros(2, 2))])
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["lr"] == pytest.approx(5e-4)
    assert opt.defaults["weight_decay"] == pytest.approx(0.2)
    assert opt.defaults["betas"] == pytest.approx((0.9, 0.98))
    assert opt.defaults["eps"] == pytest.approx(1e-6)
    schedule = cli.model.lr_schedule
    assert type(schedule).__name__ == "WarmupCosine"
    assert schedule.warmup_for(100_000) == 2000
    assert schedule.factor(1999, 100_000) == pytest.approx(1.0)
    assert schedule.factor(99_999, 100_000) < 1e-3  # decays towards 0
    assert cli.datamodule.batch_size == 512
    assert isinstance(cli.model.loss, import_class("mmpt.models.losses.ClipLoss"))

"""Every recipe in configs/ parses as written and instantiates through the mmpt CLI once its
towers, data and trainer are swapped for tiny CPU ones; the CLIP ViT-B/16 recipe's numbers."""

from __future__ import annotations

import copy
import dataclasses
import importlib
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from mmpt.cli import build_cli, main
from mmpt.schedule_cli import merge
from mmpt.synth.vocab import write_synth_tokenizer
from tests.helpers import (
    TINY_BERT_WORDS,
    TINY_LLM_CONFIG,
    TINY_LOG_MEL,
    TINY_TEXT,
    TINY_VIDEO,
    TINY_VISION,
    TINY_WAV2VEC2,
    write_tiny_bert,
)

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ROOT = CONFIGS.parent
OVERLAY = "# overlay for: "


def overlay_base(path: Path) -> Path | None:
    """The recipe an overlay file is layered on (its first line names it), else None."""
    first = path.read_text().splitlines()[0]
    return ROOT / first[len(OVERLAY) :].strip() if first.startswith(OVERLAY) else None


def load_recipe(path: Path) -> dict[str, Any]:
    """The recipe as written; an overlay composed on its base."""
    written = yaml.safe_load(path.read_text())
    base = overlay_base(path)
    return merge(load_recipe(base), written) if base is not None else written


def config_args(path: Path) -> list[str]:
    """``-c`` arguments of a recipe: the base first for an overlay."""
    base = overlay_base(path)
    return [*(config_args(base) if base is not None else []), "-c", str(path)]


# configs/eval/ holds benchmark suites and configs/curation/ scoring prompts, not recipes
# (tests/test_vlm_eval.py and tests/test_curation_vlm.py load them)
ALL_CONFIGS = sorted(
    p for p in CONFIGS.rglob("*.yaml") if p.parent not in (CONFIGS / "eval", CONFIGS / "curation")
)
IDS = [str(p.relative_to(CONFIGS)) for p in ALL_CONFIGS]


def import_class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def tiny_llm(tokenizer: Path) -> dict[str, Any]:
    return {
        "class_path": "mmpt.models.llm.CausalLM",
        "init_args": {"config": TINY_LLM_CONFIG, "tokenizer": str(tokenizer)},
    }


def tiles_of(cfg: dict[str, Any]) -> bool:
    """Whether the recipe's image tower takes multispectral tiles."""
    model = cfg["model"]["init_args"]
    tower = model.get("vision") or model.get("encoder") or {}
    return bool(tower.get("init_args", {}).get("bands"))


def audio_of(cfg: dict[str, Any]) -> bool:
    """Whether the recipe reads audio (an audio tower, or speech samples for an LLM)."""
    model = cfg["model"]["init_args"]
    encoder = model.get("encoder", {}).get("class_path", "")
    speech = cfg["data"]["init_args"].get("speech_input") is not None
    return "audio" in model or encoder.endswith("Wav2Vec2Tower") or speech


def grounding_of(cfg: dict[str, Any]) -> bool:
    """Whether the recipe reads grounding shards (boxes and phrases)."""
    return cfg["data"]["class_path"].endswith("GroundingDataModule")


def tiny_audio(written: dict[str, Any], embed_dim: int) -> dict[str, Any]:
    """A tiny tower of the written audio tower's class (wav2vec 2.0 keeps its head flag)."""
    if written["class_path"].endswith("LogMelTower"):
        tower = copy.deepcopy(TINY_LOG_MEL)
        tower["init_args"]["embed_dim"] = embed_dim
        return tower
    head = written.get("init_args", {}).get("pretraining_head", False)
    config = {**TINY_WAV2VEC2, "feat_extract_norm": "layer", "do_stable_layer_norm": True}
    args = {"config": config, "pretraining_head": head, "embed_dim": embed_dim}
    return {"class_path": "mmpt.models.encoders.Wav2Vec2Tower", "init_args": args}


def tiny_tower(written: dict[str, Any], embed_dim: int, tiles: Path) -> dict[str, Any]:
    """TINY_VISION with the written tower's bands, band groups and scale (stats from tiles)."""
    tower = copy.deepcopy(TINY_VISION)
    args = written.get("init_args", {})
    tower["init_args"]["embed_dim"] = embed_dim
    for key in ("bands", "band_groups", "scale"):
        if args.get(key) is not None:
            tower["init_args"][key] = args[key]
    dynamic = (args.get("model_kwargs") or {}).get("dynamic_img_size")  # DINO's local crops
    if dynamic or str(args.get("model_name", "")).startswith("resnet"):  # so does a ResNet
        tower["init_args"]["model_kwargs"]["dynamic_img_size"] = True
    if args.get("bands"):
        tower["init_args"]["stats_from"] = str(tiles / "train")
    return tower


def tiny_variant(
    cfg: dict[str, Any],
    shards: Path,
    tiles: Path | None = None,
    tones: Path | None = None,
    grounding: Path | None = None,
) -> dict[str, Any]:
    """The recipe with tiny towers, the test shards and a one-CPU fp32 trainer.

    Recipes with a multispectral tower read ``tiles`` (synthetic land-cover shards); audio
    recipes read ``tones`` (synthetic audio-text shards); grounding recipes ``grounding``.
    """
    cfg = copy.deepcopy(cfg)
    if grounding_of(cfg):
        assert grounding is not None, "a grounding recipe needs the grounding shards"
        shards = grounding / "train"
    if tiles_of(cfg):
        assert tiles is not None, "a multispectral recipe needs the tile shards"
        shards = tiles / "train"
    if audio_of(cfg):
        assert tones is not None, "an audio recipe needs the audio shards"
        shards = tones / "train"
    model = cfg["model"]["init_args"]
    if "audio" in model:
        model["audio"] = tiny_audio(model["audio"], 16 if "text" in model else 0)
    if "vision" in model:
        video = model["vision"]["class_path"].endswith("VideoViTTower")
        if video:
            model["vision"] = TINY_VIDEO
        else:
            model["vision"] = tiny_tower(model["vision"], 16, shards.parent)
    if model.get("encoder", {}).get("class_path", "").endswith("Wav2Vec2Tower"):
        model["encoder"] = tiny_audio(model["encoder"], 0)
    elif "encoder" in model:  # MAE, SatMAE++, MoCo v3, DINO: no projection head
        model["encoder"] = tiny_tower(model["encoder"], 0, shards.parent)
        if "decoder_dim" in model:
            model.update(decoder_dim=16, decoder_depth=1, decoder_heads=2)
        for view in ("view", "global_view", "local_view"):  # default views at the tiny size
            model.pop(view, None)
        tiny_heads = {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "mlp_dim": 32}
        model.update({k: v for k, v in tiny_heads.items() if k in model})
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
    model.pop("init_from", None)  # continual recipes start from a run that is not here
    if isinstance(model.get("vocab"), str):  # a CTC recipe's vocab.json is not here
        model["vocab"] = {"tokens": ["<pad>", "<unk>", "|", *"abcdefghijklmnopqrstuvwxyz"]}
    if "mask_feature_length" in model:  # channel masks wider than the tiny tower
        model["mask_feature_length"] = 4
    schedule = model.get("lr_schedule", {}).get("init_args", {})
    schedule.pop("from_checkpoint", None)
    data = cfg["data"]["init_args"]
    data.pop("synthetic", None)
    streams = [data.get("train"), data.get("val"), *(data.get("eval_sets") or {}).values()]
    replay = (data.get("train") or {}).get("replay")
    for stream in [*streams, replay]:
        if stream:
            urls = stream["urls"]
            stream["urls"] = [str(shards)] * len(urls) if isinstance(urls, list) else str(shards)
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
        main(["fit", *config_args(path), "--print_config"])
    assert exc.value.code == 0, capsys.readouterr().err
    printed = yaml.safe_load(capsys.readouterr().out)
    written = load_recipe(path)
    assert printed["model"]["class_path"] == written["model"]["class_path"]
    assert printed["data"]["class_path"] == written["data"]["class_path"]


@pytest.fixture(scope="module")
def tiles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic 13-band land-cover tiles: 40 training tiles in 8 shards of 5."""
    from mmpt.synth import make_synthetic

    out = tmp_path_factory.mktemp("tiles")
    make_synthetic(
        "multispectral", out, train_samples=40, val_samples=7, test_samples=7,
        image_size=16, samples_per_shard=5,
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def tones(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic audio-text clips: 40 training clips in 8 shards of 5."""
    from mmpt.synth import make_synthetic

    out = tmp_path_factory.mktemp("tones")
    make_synthetic("audio-text", out, train_samples=40, val_samples=5, samples_per_shard=5)
    return out


@pytest.fixture(scope="module")
def grounding(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic grounding shards: 40 training images in 8 shards of 5."""
    from mmpt.synth import make_synthetic

    out = tmp_path_factory.mktemp("grounding")
    make_synthetic("grounding", out, train_samples=40, val_samples=5, samples_per_shard=5)
    return out


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=IDS)
def test_config_instantiates_with_tiny_overrides(
    path: Path,
    shards: Path,
    tiles: Path,
    tones: Path,
    grounding: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    written = load_recipe(path)
    tiny = tmp_path / "tiny.yaml"
    tiny_cfg = tiny_variant(written, shards, tiles, tones, grounding)
    tiny.write_text(yaml.safe_dump(tiny_cfg))

    cli = build_cli(["-c", str(tiny)], run=False)
    model, dm = cli.model, cli.datamodule
    assert type(model) is import_class(written["model"]["class_path"])
    assert type(dm) is import_class(written["data"]["class_path"])
    tiny_model = tiny_cfg["model"]["init_args"]
    tower = getattr(model, model.image_tower_attr, None)
    if tower is not None:
        assert type(tower) is import_class(tiny_model[model.image_tower_attr]["class_path"])
    text_model = getattr(model, "text", None) or getattr(model, "llm", None)
    if text_model is not None:
        llm = "mmpt.models.llm.CausalLM"
        expected = tiny_model["text"]["class_path"] if "text" in tiny_model else llm
        assert type(text_model) is import_class(expected)

    # The model's preprocessing reached the datamodule (link_arguments), not a default.
    assert dm.preprocess is not None
    own = getattr(model.preprocess, "tokenizer", None)  # a CTC model's vocabulary
    assert dm.preprocess.tokenizer is (text_model.tokenizer if text_model is not None else own)
    if tower is not None:  # SatMAE++ reads tiles at its top scale, the tower takes scale 1
        assert dm.preprocess.image == model.preprocess.image
        scale = max(tiny_model.get("scales") or [1])
        assert dm.preprocess.image == dataclasses.replace(
            tower.image_preprocess, size=tower.image_preprocess.size * scale
        )
        assert tower.image_preprocess.size == TINY_VISION["init_args"]["image_size"]
    audio_tower = getattr(model, "audio", None) or getattr(model, "encoder", None)
    if hasattr(audio_tower, "audio_preprocess"):
        assert dm.preprocess.audio == model.preprocess.audio is not None
    if tiles_of(written):  # bands and scale as written, statistics read from the shards
        written_tower = written["model"]["init_args"][model.image_tower_attr]["init_args"]
        assert dm.preprocess.image.scale == written_tower["scale"]
        assert dm.preprocess.image.channels == len(dm.preprocess.image.bands) == 13

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
    if tiles_of(written) or audio_of(written):  # a real batch goes through the model
        dm.batch_size, dm.num_workers = 4, 0  # the recipe's batch is larger than the test set
        dm.train_stream = dm.stream(dm.train_cfg, train=True, field="data.train")
        batch = dm.normalize(next(iter(dm.train_dataloader())))
        out = model.training_step(batch, 0) if hasattr(model, "encoder") else model(batch)
        assert out is not None
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


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=IDS)
def test_outputs_follow_default_root_dir(path: Path) -> None:
    """No recipe pins a checkpoint dirpath or a logger save_dir: --trainer.default_root_dir
    moves everything, and each run gets its own version_N (two runs never share last.ckpt)."""
    trainer = yaml.safe_load(path.read_text()).get("trainer") or {}
    for cb in trainer.get("callbacks") or []:
        assert "dirpath" not in (cb.get("init_args") or {}), cb
    loggers = trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if isinstance(logger, dict):
            assert "save_dir" not in (logger.get("init_args") or {}), logger
            assert "version" not in (logger.get("init_args") or {}), logger


def test_citations_point_into_the_repository() -> None:
    """Configs and code cite docs/recipes.md (its sections exist), never a file outside."""
    import re

    recipes = (ROOT / "docs" / "recipes.md").read_text()
    headings = [ln.lstrip("# ") for ln in recipes.splitlines() if ln.startswith("## ")]
    files = [*CONFIGS.rglob("*.yaml")]
    for folder in ("mmpt", "models", "datamodules", "scripts"):
        files += (ROOT / folder).rglob("*.py")
    cited = 0
    for f in files:
        text = f.read_text()
        assert "REFERENCE.md" not in text, f
        for section in re.findall(r'docs/recipes\.md,?\s+"([^"]+)"', text.replace("\n#", "")):
            section = " ".join(section.split())
            assert any(h.startswith(section) for h in headings), (f, section)
            cited += 1
    assert cited >= 5

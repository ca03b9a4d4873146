"""model.init_from from the ecosystem's formats: open_clip, timm, Hugging Face CLIP/SigLIP.

Each source is a tiny model made and saved by its own library; it loads into mmpt's towers with
no tower weight missing and gives the source model's features. A checkpoint of another family
is refused, naming both, unless ``init_from_strict: false``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import open_clip
import pytest
import timm
import torch
from safetensors.torch import save_file

from mmpt.models.contrastive import ContrastiveModule
from mmpt.models.encoders import HFVisionTower, OpenCLIPTextTower, TimmVisionTower
from mmpt.models.init_from import load_init_from
from mmpt.models.llm import CausalLM
from mmpt.models.vlm import VLMModule
from mmpt.synth.vocab import write_synth_tokenizer
from tests.helpers import TINY_LLM_CONFIG, TINY_TEXT, TINY_VISION

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

OPEN_CLIP_NAME = "mmpt-test-tiny-clip"
OPEN_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
HF_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
HF_VISION.update(num_attention_heads=2, image_size=32, patch_size=8)
HF_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
HF_TEXT.update(num_attention_heads=2, vocab_size=100, max_position_embeddings=16)


def text_tower(embed_dim: int = 16) -> OpenCLIPTextTower:
    return OpenCLIPTextTower(**{**TINY_TEXT["init_args"], "embed_dim": embed_dim})


# --- open_clip ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def open_clip_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("open_clip")
    (tmp / f"{OPEN_CLIP_NAME}.json").write_text(json.dumps(OPEN_CLIP_CFG))
    open_clip.add_model_config(tmp / f"{OPEN_CLIP_NAME}.json")
    torch.manual_seed(3)
    source = open_clip.create_model(OPEN_CLIP_NAME).eval()
    with torch.no_grad():
        source.logit_scale.fill_(2.5)
    state = source.state_dict()
    torch.save(state, tmp / "open_clip_pytorch_model.bin")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp / "open_clip_model.safetensors")
    return {"source": source, "bin": tmp / "open_clip_pytorch_model.bin", "dir": tmp}


@pytest.mark.parametrize("name", ["open_clip_pytorch_model.bin", "open_clip_model.safetensors"])
def test_open_clip_checkpoint_into_open_clip_towers(open_clip_files, name, caplog):
    from mmpt.models.encoders import OpenCLIPVisionTower

    torch.manual_seed(0)
    model = ContrastiveModule(
        OpenCLIPVisionTower(model_name=OPEN_CLIP_NAME),
        OpenCLIPTextTower(model_name=OPEN_CLIP_NAME),
        init_from=str(open_clip_files["dir"] / name),
    ).eval()
    with caplog.at_level(logging.INFO, logger="mmpt.models"):
        model.configure_model()
    assert "(open_clip, open_clip CLIP): loaded" in caplog.text
    assert "0 missing, 0 unexpected" in caplog.text
    source = open_clip_files["source"]
    images = torch.randn(2, 3, 32, 32)
    tokens = torch.randint(0, 49408, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model.vision(images), source.encode_image(images))
        torch.testing.assert_close(model.text(tokens), source.encode_text(tokens))
    assert float(model.loss.logit_scale) == pytest.approx(2.5)


# --- timm -----------------------------------------------------------------------------------


def timm_source() -> torch.nn.Module:
    torch.manual_seed(4)
    kw = TINY_VISION["init_args"]["model_kwargs"]
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=16, img_size=32, **kw
    ).eval()


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_timm_checkpoint_into_a_timm_tower(tmp_path, name, caplog):
    source = timm_source()
    if name.endswith(".safetensors"):
        save_file(source.state_dict(), tmp_path / name)  # as timm's push_to_hub writes it
    else:
        torch.save(source.state_dict(), tmp_path / name)
    torch.manual_seed(0)
    model = ContrastiveModule(
        TimmVisionTower(**TINY_VISION["init_args"]), text_tower(), init_from=str(tmp_path)
    ).eval()
    with caplog.at_level(logging.INFO, logger="mmpt.models"):
        (report,) = load_init_from(model, [str(tmp_path)])
    assert report.format == "timm" and report.missing == [] and report.unexpected == []
    assert len(report.loaded) == len(source.state_dict())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.vision(images), source(images))


def test_timm_checkpoint_at_another_resolution_is_adapted(tmp_path):
    source = timm_source()
    save_file(source.state_dict(), tmp_path / "model.safetensors")
    args = {**TINY_VISION["init_args"], "image_size": 48}
    model = ContrastiveModule(TimmVisionTower(**args), text_tower())
    (report,) = load_init_from(model, [str(tmp_path / "model.safetensors")])
    assert "vision.model.pos_embed" in report.loaded
    assert "4x4 -> 6x6" in report.adapted["vision.model.pos_embed"]


# --- Hugging Face CLIP / SigLIP -------------------------------------------------------------


def hf_source(kind: str, folder: Path) -> torch.nn.Module:
    """A tiny transformers model saved with save_pretrained (full or vision-only)."""
    from transformers import (
        CLIPConfig,
        CLIPModel,
        SiglipConfig,
        SiglipModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    torch.manual_seed(5)
    if kind == "clip":
        model = CLIPModel(CLIPConfig(text_config=HF_TEXT, vision_config=HF_VISION))
    elif kind == "siglip":
        model = SiglipModel(SiglipConfig(text_config=HF_TEXT, vision_config=HF_VISION))
    else:
        model = SiglipVisionModel(SiglipVisionConfig(**HF_VISION))
    model.save_pretrained(folder)
    return model.eval()


def hf_tower(kind: str) -> HFVisionTower:
    model_type = "clip_vision_model" if kind == "clip" else "siglip_vision_model"
    return HFVisionTower(config={"model_type": model_type, **HF_VISION})


def source_features(source: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    vision = getattr(source, "vision_model", source)
    return vision(pixel_values=images).pooler_output


@pytest.mark.parametrize("kind", ["clip", "siglip", "siglip_vision"])
def test_hf_folder_into_hf_vision_tower(tmp_path, kind, caplog):
    source = hf_source(kind, tmp_path / kind)
    torch.manual_seed(0)
    model = ContrastiveModule(hf_tower(kind), text_tower(32), init_from=str(tmp_path / kind))
    with caplog.at_level(logging.INFO, logger="mmpt.models"):
        model.configure_model()
    vision_keys = [k for k in model.state_dict() if k.startswith("vision.")]
    assert f"loaded {len(vision_keys)} tensors, 0 missing" in caplog.text
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().vision(images), source_features(source, images))
    if kind != "siglip_vision":  # the text model of a full folder is reported, not loaded
        assert any(
            r.levelno == logging.WARNING and "text_model." in r.message for r in caplog.records
        )


def test_hf_siglip_folder_into_a_vlm_vision_tower(tmp_path):
    source = hf_source("siglip", tmp_path / "siglip")
    torch.manual_seed(0)
    llm = CausalLM(
        config=TINY_LLM_CONFIG, tokenizer=str(write_synth_tokenizer(tmp_path / "tokenizer"))
    )
    vlm = VLMModule(llm, hf_tower("siglip"), init_from=str(tmp_path / "siglip")).eval()
    vlm.configure_model()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vlm.vision(images), source_features(source, images))


# --- another family -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vlm_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VLM checkpoint whose image tower has the CLIP model's names and shapes."""
    tmp = tmp_path_factory.mktemp("vlm")
    torch.manual_seed(1)
    llm = CausalLM(config=TINY_LLM_CONFIG, tokenizer=str(write_synth_tokenizer(tmp / "tok")))
    vlm = VLMModule(llm, TimmVisionTower(**TINY_VISION["init_args"]))
    ckpt = {"state_dict": vlm.state_dict(), "pytorch-lightning_version": "2.6.6"}
    vlm.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp / "vlm.ckpt")
    return tmp / "vlm.ckpt"


def test_a_vlm_checkpoint_into_clip_is_refused_naming_both_families(vlm_ckpt):
    model = ContrastiveModule(
        TimmVisionTower(**TINY_VISION["init_args"]), text_tower(), init_from=str(vlm_ckpt)
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"holds a VLM model, this is a contrastive model"):
        model.configure_model()
    for key, value in model.state_dict().items():  # nothing was loaded
        assert torch.equal(value, before[key]), key


def test_init_from_strict_false_loads_the_matching_part_with_a_warning(vlm_ckpt, caplog):
    model = ContrastiveModule(
        TimmVisionTower(**TINY_VISION["init_args"]),
        text_tower(),
        init_from=str(vlm_ckpt),
        init_from_strict=False,
    )
    with caplog.at_level(logging.INFO, logger="mmpt.models"):
        model.configure_model()
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert any("holds a VLM model, this is a contrastive model" in w for w in warnings)
    assert any("missing" in w and "text.text." in w for w in warnings)
    state = torch.load(vlm_ckpt, weights_only=True)["state_dict"]
    assert torch.equal(model.vision.model.pos_embed, state["vision.model.pos_embed"])


def test_a_list_counts_its_files_together(vlm_ckpt, tmp_path):
    """BLSP-style: the text tower from one file, the image tower from another."""
    clip = ContrastiveModule(TimmVisionTower(**TINY_VISION["init_args"]), text_tower())
    text_only = {k: v for k, v in clip.state_dict().items() if k.startswith(("text.", "loss."))}
    torch.save(text_only, tmp_path / "text.pt")
    model = ContrastiveModule(TimmVisionTower(**TINY_VISION["init_args"]), text_tower())
    reports = load_init_from(model, [str(vlm_ckpt), str(tmp_path / "text.pt")])
    assert reports[0].family == "VLM" and reports[1].format == "state dict"
    assert all(r.missing == [] for r in reports)


def test_hf_clip_folder_into_hf_vision_and_text_towers(tmp_path):
    """A full CLIP folder fills an HF image tower and an HF text tower holding a CLIP text model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    from mmpt.models.encoders.hf_text import HFTextTower

    source = hf_source("clip", tmp_path / "clip")
    words = ["[PAD]", "[UNK]", *(f"w{i}" for i in range(10))]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    text_dir = tmp_path / "clip_text"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]")
    tokenizer.save_pretrained(text_dir)
    torch.manual_seed(9)
    CLIPTextModel(CLIPTextConfig(**HF_TEXT)).save_pretrained(text_dir)  # another init
    model = ContrastiveModule(
        hf_tower("clip"),
        HFTextTower(str(text_dir), embed_dim=32, context_length=8),
        init_from=str(tmp_path / "clip"),
    ).eval()
    (report,) = load_init_from(model, [str(tmp_path / "clip")])
    assert report.missing == []
    assert sorted(report.unexpected) == [
        "logit_scale",
        "text_projection.weight",
        "visual_projection.weight",
    ]
    ids = torch.randint(2, 12, (2, 8))
    with torch.no_grad():
        got = model.text.model(input_ids=ids).last_hidden_state
        torch.testing.assert_close(got, source.text_model(input_ids=ids).last_hidden_state)


def test_mmpt_fit_prints_a_refused_init_from_as_one_line(vlm_ckpt, tmp_path, capsys):
    import yaml

    from mmpt.cli import main
    from tests.helpers import write_shards

    shards = write_shards(tmp_path / "shards", n=8, per_shard=8)
    config = {
        "trainer": {"accelerator": "cpu", "max_steps": 1, "logger": False},
        "model": {
            "class_path": "mmpt.models.contrastive.ContrastiveModule",
            "init_args": {"vision": TINY_VISION, "text": TINY_TEXT, "init_from": str(vlm_ckpt)},
        },
        "data": {
            "class_path": "mmpt.datamodules.image_text.ImageTextDataModule",
            "init_args": {"train": {"urls": str(shards)}, "num_workers": 0, "batch_size": 4},
        },
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    root = ["--trainer.default_root_dir", str(tmp_path / "run")]
    assert main(["fit", "-c", str(tmp_path / "cfg.yaml"), *root]) == 2
    err = capsys.readouterr().err
    assert "error: model.init_from=" in err and "VLM model, this is a contrastive" in err
    assert "Traceback" not in err

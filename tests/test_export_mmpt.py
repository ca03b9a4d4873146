"""mmpt's own export (mmpt-vlm/3): every VLM variant rebuilds exactly; bad folders fail clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import mmpt
from mmpt.datamodules.packing import pack_row
from mmpt.datamodules.resolution import AnyResTiles, NativeResolution
from mmpt.models.connectors import AvgPoolMLP, MLPDownsample, PerceiverResampler
from mmpt.models.encoders import HFVisionTower, OpenCLIPVisionTower
from mmpt.models.llm import CausalLM
from mmpt.models.vlm import FusionConfig, VLMModule
from mmpt.models.vlm_load import export_state_dict
from mmpt.synth import make_synthetic
from tests.test_speech_lm import batch_of, items, speech_lm
from tests.test_vlm_module import TINY_LLM_CONFIG, collate, samples, tiny_vlm
from tests.test_vlm_module import shapes as shapes  # noqa: F401 - the module fixture

HF_SIGLIP = {
    "model_type": "siglip_vision_model",
    "image_size": 32,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "patch_size": 8,
}
OC_CFG = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16}


@pytest.fixture(scope="module")
def tones(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tones")
    make_synthetic("audio-text", out, train_samples=8, val_samples=2)
    return out


def perturb(model: VLMModule) -> VLMModule:
    """Move every weight off its initialisation (a rebuild that loads nothing then differs)."""
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def tower_vlm(shapes: Path, tower: str, **kw) -> VLMModule:
    torch.manual_seed(0)
    llm = CausalLM(config=TINY_LLM_CONFIG, tokenizer=str(shapes / "tokenizer"))
    if tower == "hf":
        vision = HFVisionTower(config=HF_SIGLIP)
    else:
        vision = OpenCLIPVisionTower(embed_dim=16, vision_cfg=OC_CFG)
    return VLMModule(llm, vision, **kw)


def round_trip(model: VLMModule, batch, tmp_path: Path, template: str | None = "plain") -> float:
    """Max |logit difference| between ``model`` and its export loaded with ``mmpt.load``."""
    out = model.export_mmpt(tmp_path / "export", template=template)
    again = mmpt.load(out)
    assert type(again) is VLMModule and again.data_template == template
    ids = list(range(3, 60))  # the same tokenizer: same ids, same text (spaces included)
    tok, tok_again = model.llm.tokenizer, again.llm.tokenizer
    assert tok_again.decode(ids) == tok.decode(ids) and len(tok_again) == len(tok)
    with torch.no_grad():
        want, got = model(batch).logits, again(batch).logits
    assert want.shape == got.shape
    return float((want - got).abs().max())


IMAGE_VARIANTS = {
    "timm_mlp2x_fixed": lambda s: tiny_vlm(s),
    "hf_siglip_downsample": lambda s: tower_vlm(s, "hf", connector=MLPDownsample),
    "open_clip_avgpool": lambda s: tower_vlm(
        s, "open_clip", connector=lambda a, b: AvgPoolMLP(a, b, num_tokens=4)
    ),
    "perceiver": lambda s: tiny_vlm(
        s, connector=lambda a, b: PerceiverResampler(a, b, num_latents=6, depth=1, heads=2)
    ),
    "fusion": lambda s: tiny_vlm(s, fusion=FusionConfig(every=1, heads=2, ff_mult=2)),
    "anyres_row_end": lambda s: tiny_vlm(s, resolution=AnyResTiles(32, 8, 4)),
    "native": lambda s: tiny_vlm(s, resolution=NativeResolution(patch_size=8, max_num_patches=24)),
}


@pytest.mark.parametrize("variant", list(IMAGE_VARIANTS))
def test_image_variants_round_trip_exactly(shapes, tmp_path, variant):  # noqa: F811
    model = perturb(IMAGE_VARIANTS[variant](shapes))
    batch = collate(model, [pack_row(samples(model, shapes, n=2), 96, model.preprocess.pad_id)])
    assert batch.images
    assert round_trip(model, batch, tmp_path) <= 1e-6
    if variant == "fusion":
        assert (
            not (tmp_path / "export" / "llm" / "model.safetensors")
            .read_bytes()
            .count(b"gated_cross_attn")
        ), "the llm/ folder must stay a plain causal LM"


def test_speech_and_text_only_round_trip_exactly(tones, tmp_path):
    model = perturb(speech_lm(tones))
    rows, dm = items(model, tones, n=2)
    batch = batch_of(model, rows, dm)
    assert batch.audio is not None
    assert round_trip(model, batch, tmp_path / "speech") <= 1e-6
    text = perturb(speech_lm(tones, audio=False))
    rows, dm = items(text, tones, n=2, speech_input="transcript")
    assert round_trip(text, batch_of(text, rows, dm), tmp_path / "text", template=None) <= 1e-6


def test_layout_and_state_dict(shapes, tmp_path):  # noqa: F811
    model = perturb(tiny_vlm(shapes, resolution=AnyResTiles(32, 8, 4)))
    out = model.export_mmpt(tmp_path / "e", template="chatml")
    config = json.loads((out / "mmpt_vlm.json").read_text())
    assert config["format"] == "mmpt-vlm/3" and config["template"] == "chatml"
    assert config["llm"]["image_token"] == "<image>" and config["modalities"] == ["image"]
    assert not (out / "config.json").exists() and (out / "llm" / "config.json").is_file()
    state = export_state_dict(out)
    own = model.state_dict()
    assert "connector.image_newline" in state
    for k, v in state.items():
        assert torch.equal(own[k], v), k
    # everything but a tied output head is there
    assert set(own) - set(state) <= {"llm.model.lm_head.weight"}


def test_the_trained_attention_comes_back(shapes, tmp_path):  # noqa: F811
    model = tiny_vlm(shapes, llm={"attn_backend": "sdpa"})
    impl = model.llm.model.config._attn_implementation
    assert impl == "mmpt_packed_sdpa"
    again = mmpt.load(model.export_mmpt(tmp_path / "e"))
    assert again.llm.model.config._attn_implementation == impl
    eager = mmpt.load(tmp_path / "e", attn_implementation="eager")
    assert eager.llm.model.config._attn_implementation == "eager"


def test_bad_folders_give_clear_errors(shapes, tmp_path):  # noqa: F811
    model = tiny_vlm(shapes)
    out = model.export_mmpt(tmp_path / "ok")
    v2 = tmp_path / "v2"
    shutil.copytree(out, v2)
    config = json.loads((v2 / "mmpt_vlm.json").read_text())
    (v2 / "mmpt_vlm.json").write_text(json.dumps({**config, "format": "mmpt-vlm/2"}))
    with pytest.raises(ValueError, match=r"format 'mmpt-vlm/2'; this mmpt loads 'mmpt-vlm/3'"):
        mmpt.load(v2)
    (out / "connector.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="connector.safetensors is missing"):
        mmpt.load(out)
    foreign = tmp_path / "qwen"
    model.llm.save_pretrained(foreign)
    with pytest.raises(ValueError, match=r"transformers folder \(model_type 'qwen2'\)"):
        mmpt.load(foreign)
    with pytest.raises(ValueError, match="not an mmpt export"):
        mmpt.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        mmpt.load(tmp_path / "nowhere")


def test_llava_folders_go_to_the_llava_reader(tmp_path, monkeypatch):
    import sys
    import types

    seen = []
    fake = types.ModuleType("mmpt.export.hf_llava_load")
    fake.vlm_from_llava = lambda path, attn: seen.append((Path(path), attn)) or "llava model"
    monkeypatch.setitem(sys.modules, "mmpt.export.hf_llava_load", fake)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    assert mmpt.load(tmp_path) == "llava model" and seen == [(tmp_path, "packed")]
    assert mmpt.load(tmp_path, "sdpa") == "llava model" and seen[-1] == (tmp_path, "sdpa")
    # LLaVA-NeXT folders are not read: refused naming what loads, never half-read
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_next"}))
    with pytest.raises(ValueError, match="model_type 'llava_next'"):
        mmpt.load(tmp_path)


def test_import_mmpt_stays_light():
    import subprocess
    import sys

    code = "import sys, mmpt; assert callable(mmpt.load); print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", "import mmpt, sys; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "False"
    assert subprocess.run([sys.executable, "-c", code], check=True).returncode == 0

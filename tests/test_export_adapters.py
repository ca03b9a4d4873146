"""``mmpt export`` of adapted models: merged by default (the target library's model gives the
adapted model's outputs), or ``--no-merge``: the base plus a peft folder that ``PeftModel``
loads onto it, with the same outputs again."""

from __future__ import annotations

import argparse
import copy
import io
from pathlib import Path

import open_clip
import pytest
import timm
import torch
from PIL import Image
from torch import nn
from transformers import AutoProcessor, LlavaForConditionalGeneration

from mmpt.export_cli import _llava, _open_clip, _timm, _write
from mmpt.models.adapters import AdapterSpec, adapter_layers, merge_adapters
from mmpt.models.contrastive import ContrastiveModule
from mmpt.models.encoders import HFVisionTower
from mmpt.models.llm import CausalLM
from mmpt.models.vlm import VLMModule
from mmpt.synth.vocab import write_synth_tokenizer
from tests import test_export_llava as llava_tests
from tests.helpers import TINY_LLM_CONFIG
from tests.test_export_open_clip import TEXTS, open_clip_vit, text_tower


def _args(out: Path, no_merge: bool) -> argparse.Namespace:
    return argparse.Namespace(out=str(out), no_merge=no_merge, template="chatml", name=None)


def _adapted(model: nn.Module, specs: list[AdapterSpec]) -> nn.Module:
    """``model`` with ``specs`` added and their weights moved off init (B = 0 is a no-op)."""
    model.adapter_specs = specs
    model.configure_model()
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "ia3_l" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synth_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_llava_merged_and_peft_folder_give_the_adapted_logits(tok, tmp_path, kind):
    torch.manual_seed(0)
    config = {**TINY_LLM_CONFIG, "tie_word_embeddings": True}  # HF's init: logits near 1
    llm = CausalLM(config=config, tokenizer=str(tok))
    vision = HFVisionTower(config=llava_tests.VISION["siglip"], feature_layer=-2)
    targets = ["llm.*.q_proj", "llm.*.v_proj", "llm.*.down_proj", "vision.*.fc1"]
    model = _adapted(VLMModule(llm, vision), [AdapterSpec(targets=targets, kind=kind, r=4)])
    image = llava_tests.png(32, 32)
    batch = llava_tests.mmpt_batch(model, image, "chatml")
    with torch.no_grad():
        adapted = model(batch).logits
    unmerged = copy.deepcopy(model)
    _write(model, _llava, "llava", _args(tmp_path / "merged", no_merge=False))
    assert not adapter_layers(model)
    with torch.no_grad():
        torch.testing.assert_close(model(batch).logits, adapted, atol=1e-5, rtol=0)

    processor = AutoProcessor.from_pretrained(str(tmp_path / "merged"))
    text = processor.apply_chat_template(llava_tests.hf_messages())
    inputs = processor(images=Image.open(io.BytesIO(image)), text=text, return_tensors="pt")
    merged_hf = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        merged_logits = merged_hf(**inputs).logits
    assert (merged_logits - adapted).abs().max() < 1e-4  # mmpt vs transformers, as unadapted

    _write(unmerged, _llava, "llava", _args(tmp_path / "base", no_merge=True))
    from peft import PeftModel

    base = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "base")).eval()
    with torch.no_grad():
        plain = base(**inputs).logits
        peft_logits = PeftModel.from_pretrained(base, str(tmp_path / "base" / "adapter"))(
            **inputs
        ).logits
    torch.testing.assert_close(peft_logits, merged_logits, atol=1e-5, rtol=0)
    assert (plain - merged_logits).abs().max() > 1e-3  # the adapter changes the logits


def _clip_embeddings(clip: nn.Module, images: torch.Tensor, tokens: torch.Tensor):
    with torch.no_grad():
        return clip.encode_image(images, normalize=True), clip.encode_text(tokens, normalize=True)


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_open_clip_merged_and_peft_folder_give_the_adapted_embeddings(tmp_path, kind):
    torch.manual_seed(0)
    spec = AdapterSpec(targets=["vision.*.mlp.c_fc", "text.*.mlp.c_proj"], kind=kind, r=4)
    if kind == "ia3":
        spec.feedforward = ["text.*.mlp.c_proj"]
    model = _adapted(ContrastiveModule(vision=open_clip_vit(), text=text_tower()), [spec])
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = model.text.tokenizer(TEXTS)
    with torch.no_grad():
        adapted = model.encode_image(images), model.encode_text(tokens)
    unmerged = copy.deepcopy(model)
    _write(model, _open_clip, "open_clip", _args(tmp_path / "merged", no_merge=False))
    merged = open_clip.create_model(f"local-dir:{tmp_path / 'merged'}").eval()
    for ours, theirs in zip(adapted, _clip_embeddings(merged, images, tokens), strict=True):
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)

    _write(unmerged, _open_clip, "open_clip", _args(tmp_path / "base", no_merge=True))
    from peft import PeftModel

    base = open_clip.create_model(f"local-dir:{tmp_path / 'base'}").eval()
    plain = _clip_embeddings(base, images, tokens)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "base" / "adapter")).eval()
    loaded = _clip_embeddings(peft_model.base_model.model, images, tokens)
    for ours, theirs, before in zip(adapted, loaded, plain, strict=True):
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
        assert (before - ours).abs().max() > 1e-3


def test_other_formats_export_merged_and_refuse_no_merge(tmp_path):
    from tests.test_mae import _mae

    model = _adapted(_mae(), [AdapterSpec(targets=["encoder.*.qkv"], r=2)])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        adapted = model.encoder.model.forward_features(images)
    with pytest.raises(ValueError, match="--no-merge: format timm"):
        _write(copy.deepcopy(model), _timm, "timm", _args(tmp_path / "t", no_merge=True))
    with pytest.raises(ValueError, match="no adapters"):
        _write(_mae(), _timm, "timm", _args(tmp_path / "t", no_merge=True))
    out = _write(model, _timm, "timm", _args(tmp_path / "timm", no_merge=False))
    vit = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(images), adapted, atol=1e-5, rtol=0)
    merge_adapters(model)  # nothing left: a no-op

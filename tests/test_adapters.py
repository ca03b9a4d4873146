"""peft adapters on every module family: only the adapter parameters train, the rest is frozen
bit for bit; target patterns are checked; merging folds the adapter into plain modules."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mmpt.batch import ImageTextBatch
from mmpt.models.adapters import (
    AdapterSpec,
    adapter_layers,
    adapter_parameter_names,
    merge_adapters,
)
from mmpt.synth import make_synthetic
from tests import test_contrastive_module, test_mae, test_video_text_module, test_wav2vec2_pretrain
from tests import test_vlm_module as vlm_tests
from tests.test_vlm_module import PackedBatcher


def _quiet(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    with warnings.catch_warnings():  # self.log without a Trainer warns and does nothing
        warnings.simplefilter("ignore")
        return fn()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    make_synthetic("image-text", out, train_samples=24, image_size=32)
    return out


def _contrastive(specs: list[AdapterSpec]):
    model = test_contrastive_module.make_model(adapters=specs)
    tokens = model.preprocess.tokenizer(["a red square", "a blue disc", "a green cross"])
    batch = ImageTextBatch(torch.randn(3, 3, 32, 32), tokens, torch.arange(3))
    return model, lambda: model.training_step(batch, 0)


def _video_text(specs: list[AdapterSpec]):
    model = test_video_text_module.make_model(adapters=specs)
    batch = test_video_text_module.make_batch(model)
    return model, lambda: model.training_step(batch, 0)


def _mae(specs: list[AdapterSpec]):
    model = test_mae._mae(adapters=specs)
    images = torch.randn(2, 3, 32, 32)
    return model, lambda: model.training_step(images, 0)


def _speech(specs: list[AdapterSpec]):
    np.random.seed(0)  # span masks and negatives are drawn with numpy
    model = test_wav2vec2_pretrain.tiny_module(adapters=specs)
    batch = test_wav2vec2_pretrain.sine_batch(n=2)

    def loss() -> torch.Tensor:
        outputs, mask = model(batch.audio, batch.audio_lengths)
        return outputs.loss / mask.sum()

    return model, loss


def _vlm(shapes: Path, specs: list[AdapterSpec]):
    model = vlm_tests.tiny_vlm(shapes, adapters=specs)
    items = vlm_tests.samples(model, shapes, n=4)
    rows = list(PackedBatcher(96, model.preprocess.pad_id, rows=2)(iter(items)))[0]
    batch = vlm_tests.collate(model, rows)
    return model, lambda: model(batch).loss


FAMILIES = {
    "contrastive": (_contrastive, ["vision.*.qkv", "text.*.mlp.c_proj"]),
    "video_text": (_video_text, ["vision.*.qkv", "text.*.c_fc"]),
    "mae": (_mae, ["encoder.*.attn.qkv", "decoder.*.fc1"]),
    "speech": (_speech, ["encoder.*.attention.q_proj", "encoder.*.attention.v_proj"]),
}


def _step_changes_only_adapters(model: nn.Module, loss_fn: Callable[[], torch.Tensor]) -> set[str]:
    model.configure_model()
    model.train()
    adapters = adapter_parameter_names(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and trainable == adapters
    for name, p in model.named_parameters():  # B = 0 at init: make A get gradients too
        if "lora_B" in name:
            nn.init.normal_(p, std=0.02)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _quiet(loss_fn).backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    frozen = set(before) - adapters
    assert not changed & frozen, sorted(changed & frozen)[:5]
    assert changed == adapters, sorted(adapters - changed)[:5]  # every adapter weight moved
    return changed


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_step_changes_only_the_lora_parameters(family: str) -> None:
    build, targets = FAMILIES[family]
    model, loss_fn = build([AdapterSpec(targets=targets, r=2, alpha=4)])
    changed = _step_changes_only_adapters(model, loss_fn)
    assert changed and all("lora_" in n for n in changed)


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3"])
def test_vlm_llm_adapters_of_every_kind_train_alone(shapes: Path, kind: str) -> None:
    spec = AdapterSpec(targets=["llm.*.q_proj", "llm.*.v_proj", "llm.*.down_proj"], kind=kind)
    if kind == "ia3":
        spec.feedforward = ["llm.*.down_proj"]
    model, loss_fn = _vlm(shapes, [spec])
    _step_changes_only_adapters(model, loss_fn)
    assert len(adapter_layers(model)) == 6  # 3 projections x 2 layers


def test_trainable_patterns_add_to_the_adapters() -> None:
    model, _ = _contrastive([AdapterSpec(targets=["vision.*.qkv"])])
    model.trainable_patterns = ["loss.*"]
    model.configure_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == adapter_parameter_names(model) | {"loss.logit_scale"}


def test_unknown_target_lists_near_matches() -> None:
    with pytest.raises(ValueError, match=r"adapters.*'vision\.\*\.qvk'.*vision\.model\.blocks"):
        _contrastive([AdapterSpec(targets=["vision.*.qvk"])])[0].configure_model()
    with pytest.raises(ValueError, match="nn.MultiheadAttention"):
        _contrastive([AdapterSpec(targets=["text.*.attn.out_proj"])])[0].configure_model()
    with pytest.raises(ValueError, match="feedforward modules not among the targets"):
        spec = AdapterSpec(targets=["vision.*.qkv"], kind="ia3", feedforward=["vision.*.fc2"])
        _contrastive([spec])[0].configure_model()


def test_merge_gives_plain_modules_with_the_adapted_outputs() -> None:
    model, _ = _contrastive([AdapterSpec(targets=["vision.*.qkv", "vision.*.fc1"], kind="dora")])
    model.configure_model()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    model.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        adapted = model.vision(images)
        merge_adapters(model)
        merged = model.vision(images)
    assert not adapter_layers(model) and "blocks.0.attn.qkv.weight" in str(
        model.state_dict().keys()
    )
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)
    fresh = test_contrastive_module.make_model()
    with torch.no_grad():
        assert (fresh.vision(images) - merged).abs().max() > 1e-3  # the adapter did something


def test_merge_adapters_callback_folds_lora_into_the_base_and_restarts() -> None:
    from types import SimpleNamespace

    from mmpt.models.adapters import MergeAdapters

    model, _ = _contrastive([AdapterSpec(targets=["vision.*.qkv"], r=2)])
    model.configure_model()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    model.eval()
    images = torch.randn(2, 3, 32, 32)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    opt.state[next(p for p in model.parameters() if p.requires_grad)] = {"step": 1}
    base = model.vision.model.blocks[0].attn.qkv.base_layer.weight.detach().clone()
    with torch.no_grad():
        before = model.vision(images)
        callback = MergeAdapters()
        callback.setup(None, model, "fit")
        callback.on_train_epoch_end(SimpleNamespace(current_epoch=0, optimizers=[opt]), model)
        after = model.vision(images)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    assert not torch.equal(model.vision.model.blocks[0].attn.qkv.base_layer.weight, base)
    assert all(not p.detach().any() for n, p in model.named_parameters() if "lora_B" in n)
    assert not opt.state
    dora, _ = _contrastive([AdapterSpec(targets=["vision.*.qkv"], kind="dora")])
    with pytest.raises(ValueError, match="kind lora only"):
        MergeAdapters().setup(None, dora, "fit")

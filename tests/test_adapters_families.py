"""``adapters:`` on the module families of the later waves (UniVL, FIBER, MTP, SatMAE++, MoCo v3,
DINO, CTC, wav2vec-S): an optimizer step changes only the LoRA weights, and every MMPTModule
subclass takes ``adapters``."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from mmpt.batch import AudioTextBatch
from mmpt.models.adapters import AdapterSpec, adapter_parameter_names
from mmpt.models.module import MMPTModule
from tests import test_ctc, test_fiber, test_mtp, test_satmae_pp, test_self_distill, test_univl
from tests import test_wav2vec2_pretrain as w2v
from tests.helpers import write_tiny_bert

Build = Callable[[list[AdapterSpec], Path], tuple[nn.Module, Callable[[], torch.Tensor]]]


@pytest.fixture(scope="module")
def berts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny BERT folders for UniVL's and FIBER's vocabularies (``univl/``, ``fiber/``)."""
    root = tmp_path_factory.mktemp("berts")
    write_tiny_bert(root / "univl", test_univl.WORDS)
    write_tiny_bert(root / "fiber", test_fiber.WORDS)
    return root


def _univl(specs: list[AdapterSpec], berts: Path):
    model = test_univl.make_model(str(berts / "univl"), adapters=specs)
    batch = test_univl.make_batch(model)
    return model, lambda: model.training_step(batch, 0)


def _fiber(specs: list[AdapterSpec], berts: Path):
    model = test_fiber.make_model(str(berts / "fiber"), adapters=specs)
    batch = test_fiber.make_batch(model)
    return model, lambda: model.training_step(batch, 0)


def _fiber_grounding(specs: list[AdapterSpec], berts: Path):
    from mmpt.models.encoders import HFTextTower, TimmVisionTower
    from mmpt.models.fiber_grounding import FiberGroundingModule

    torch.manual_seed(0)
    text = HFTextTower(str(berts / "fiber"), 16, context_length=12)
    model = FiberGroundingModule(
        TimmVisionTower(**test_fiber.VIT), text, fusion_layers=1, adapters=specs
    )
    images, tokens = torch.randn(2, 3, 32, 32), text.tokenizer(test_fiber.CAPTIONS[:2])

    def loss() -> torch.Tensor:
        boxes, logits = model(images, tokens)
        return boxes.square().mean() + logits.square().mean()

    return model, loss


def _mtp(specs: list[AdapterSpec], berts: Path):
    torch.manual_seed(0)
    model = test_mtp.make_model(("semseg",), adapters=specs)
    batch = test_mtp.make_batch(["semseg", "semseg"])
    return model, lambda: model.training_step(batch, 0)


def _satmae_pp(specs: list[AdapterSpec], berts: Path):
    model = test_satmae_pp._satmae(groups=None, adapters=specs)
    images = torch.randn(2, 13, 64, 64)
    return model, lambda: model.training_step(images, 0)


def _moco(specs: list[AdapterSpec], berts: Path):
    model = test_self_distill._moco(adapters=specs)
    images = torch.randn(4, 13, 32, 32)
    return model, lambda: model.training_step(images, 0)


def _dino(specs: list[AdapterSpec], berts: Path):
    model = test_self_distill._dino(adapters=specs)
    images = torch.randn(4, 13, 32, 32)
    return model, lambda: model.training_step(images, 0)


def _speech_batch(model: nn.Module) -> AudioTextBatch:
    """Two sine clips labelled ``ma ka`` and ``sam`` (-1 pads the shorter label)."""
    batch = w2v.sine_batch(n=2)
    ids = [model.vocab.encode(t)[0] for t in ("ma ka", "sam")]
    width = max(map(len, ids))
    batch.text_tokens = torch.tensor([i + [-1] * (width - len(i)) for i in ids])
    batch.text_to_audio = torch.arange(2)
    return batch


def _ctc(specs: list[AdapterSpec], berts: Path):
    model = test_ctc.tiny_module(adapters=specs, layerdrop=0.0)  # both layers always run
    batch = _speech_batch(model)
    return model, lambda: model.training_step(batch, 0)


def _wav2vec_s(specs: list[AdapterSpec], berts: Path):
    from mmpt.models.encoders.wav2vec2 import Wav2Vec2Tower
    from mmpt.models.wav2vec_s import WavSModule

    torch.manual_seed(0)
    config = {**w2v.hf_config("layer"), "layerdrop": 0.0}  # both layers always run
    tower = Wav2Vec2Tower(config=config, pretraining_head=True)
    model = WavSModule(
        tower, {"tokens": test_ctc.VOCAB}, mask_length=4, num_negatives=20, adapters=specs
    )
    batch = _speech_batch(model)
    return model, lambda: model.training_step(batch, 0)


SPEECH = ["encoder.*.attention.q_proj", "encoder.*.attention.v_proj"]
FAMILIES: dict[str, tuple[Build, list[str]]] = {
    "univl": (_univl, ["text.*.query", "text.*.value"]),
    "fiber": (_fiber, ["vision.*.qkv", "text.*.query"]),
    "fiber_grounding": (_fiber_grounding, ["vision.*.qkv", "text.*.query"]),
    "mtp": (_mtp, ["vision.*.qkv"]),
    "satmae_pp": (_satmae_pp, ["encoder.*.attn.qkv", "decoder.*.fc1"]),
    "moco": (_moco, ["encoder.*.attn.qkv"]),
    "dino": (_dino, ["encoder.*.attn.qkv"]),
    "ctc": (_ctc, SPEECH),
    "wav2vec_s": (_wav2vec_s, SPEECH),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_step_changes_only_the_lora_weights(family: str, berts: Path) -> None:
    build, targets = FAMILIES[family]
    model, loss_fn = build([AdapterSpec(targets=targets, r=2, alpha=4)], berts)
    model.configure_model()  # adds the adapters and freezes the rest (and, DINO/MoCo, the teacher)
    model.train()
    # a momentum teacher is a frozen copy of the adapted student: its LoRA never takes a step
    lora = {n for n in adapter_parameter_names(model) if not n.startswith("teacher.")}
    assert lora and all("lora_" in n for n in lora)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == lora
    for name, p in model.named_parameters():  # B = 0 at init: make A get gradients too
        if "lora_B" in name and p.requires_grad:
            nn.init.normal_(p, std=0.02)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with warnings.catch_warnings():  # self.log without a Trainer warns and does nothing
        warnings.simplefilter("ignore")
        loss_fn().backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == lora, (sorted(changed - lora)[:5], sorted(lora - changed)[:5])
    if hasattr(model, "teacher"):  # the teacher follows the adapted student
        model.teacher.update(model.student(), 0.5)
        moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert {n for n in moved - lora if n.startswith("teacher.")} and all(
            "lora_" in n for n in moved
        )


def _subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub, *_subclasses(sub)}
    return out


def test_every_module_family_takes_adapters() -> None:
    import mmpt.models as pkg

    for info in pkgutil.iter_modules(pkg.__path__, f"{pkg.__name__}."):
        importlib.import_module(info.name)
    families = {c for c in _subclasses(MMPTModule) if c.__module__.startswith("mmpt.models.")}
    assert len(families) >= 15, sorted(c.__name__ for c in families)
    missing = [c.__name__ for c in families if "adapters" not in inspect.signature(c).parameters]
    assert not missing, f"{missing} take no `adapters` argument: pass it to super().__init__"

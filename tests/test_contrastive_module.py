"""ContrastiveModule trained by a real Lightning Trainer on tiny CPU towers: it learns (CLIP and
SigLIP losses), freezes by pattern, initialises from a checkpoint, clamps its temperature, keeps
norms/biases/scales out of weight decay and follows the warmup + cosine schedule."""

from __future__ import annotations

import functools
import io
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from PIL import Image

from mmpt.datamodules.image_text import ImageTextDataModule
from mmpt.datamodules.loader import make_loader
from mmpt.datamodules.streams import StreamConfig
from mmpt.models.contrastive import ContrastiveModule
from mmpt.models.encoders import OpenCLIPTextTower, TimmVisionTower
from mmpt.models.losses import ClipLoss, SigLipLoss
from mmpt.models.schedules import Constant, WarmupCosine
from mmpt.shards import ShardWriter
from tests.helpers import TINY_TEXT, TINY_VISION, write_shards

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*IterableDataset. has .__len__. defined"),
    pytest.mark.filterwarnings("ignore:Total length of .list. across ranks is zero"),
]

COLORS = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (35, 70, 240),
    "yellow": (240, 225, 30),
    "magenta": (225, 40, 225),
    "cyan": (30, 220, 230),
    "white": (250, 250, 250),
    "black": (5, 5, 5),
}


def colour_shards(out: Path) -> Path:
    """Eight learnable pairs: a plain colour image and 'a <colour> square'."""
    with ShardWriter(out, samples_per_shard=8, modalities=["image", "text"]) as w:
        for i, (name, rgb) in enumerate(COLORS.items()):
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), rgb).save(buf, format="PNG")
            w.write({"__key__": f"{i:03d}", "png": buf.getvalue(), "txt": f"a {name} square"})
    return out


def make_model(seed: int = 0, **kw: Any) -> ContrastiveModule:
    torch.manual_seed(seed)
    vision = TimmVisionTower(**TINY_VISION["init_args"])
    text = OpenCLIPTextTower(**TINY_TEXT["init_args"])
    return ContrastiveModule(vision, text, **kw)


def make_dm(model: ContrastiveModule, shards: Path, batch_size: int = 8) -> ImageTextDataModule:
    return ImageTextDataModule(
        train=StreamConfig(urls=str(shards), shuffle_buffer=0),
        batch_size=batch_size,
        num_workers=0,
        preprocess=model.preprocess,
    )


def fit(model: ContrastiveModule, shards: Path, steps: int, **kw: Any) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kw,
    )
    trainer.fit(model, datamodule=make_dm(model, shards))
    assert trainer.global_step == steps
    return trainer


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class LRRecorder(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


PEAK_LR, WEIGHT_DECAY, STEPS = 1e-3, 0.1, 4


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 4-step fit (warmup 2, cosine to 0.1 x peak) shared by the read-only tests below."""
    tmp = tmp_path_factory.mktemp("contrastive")
    shards = write_shards(tmp / "shards", n=40, per_shard=5)
    model = make_model(
        optimizer=functools.partial(torch.optim.AdamW, lr=PEAK_LR, weight_decay=WEIGHT_DECAY),
        lr_schedule=WarmupCosine(warmup_steps=2, min_ratio=0.1),
    )
    before = snapshot(model)
    recorder = LRRecorder()
    trainer = fit(model, shards, STEPS, callbacks=[recorder])
    return {
        "tmp": tmp,
        "shards": shards,
        "model": model,
        "trainer": trainer,
        "before": before,
        "lrs": recorder.lrs,
    }


# --- learning -------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_cls", [ClipLoss, SigLipLoss], ids=["clip", "siglip"])
def test_overfits_eight_pairs(loss_cls: type, tmp_path: Path) -> None:
    shards = colour_shards(tmp_path / "colours")
    L.seed_everything(0)
    model = make_model(
        loss=loss_cls(),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        lr_schedule=Constant(),
    )
    dm = make_dm(model, shards)
    stream = dm.stream(StreamConfig(urls=str(shards), shuffle_buffer=0), train=False, field="val")
    batch = dm.normalize(next(iter(make_loader(stream, 0))))
    assert len(batch) == 8

    def loss_and_accuracy() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            img, txt = model(batch)
            loss = model._pair_loss(img, txt, batch, gather=False).item()
            acc = ((img @ txt.T).argmax(dim=1) == torch.arange(8)).float().mean().item()
        model.train()
        return loss, acc

    loss0, acc0 = loss_and_accuracy()
    fit(model, shards, steps=16)
    loss1, acc1 = loss_and_accuracy()
    assert math.isfinite(loss1)
    assert loss1 < 0.5 * loss0, (loss0, loss1)
    assert acc1 >= 0.5 > acc0  # from chance (1/8) to most pairs retrieved


# --- freezing, trainable lists, init_from ---------------------------------------------------


def test_freeze_vision_trains_only_text(shards: Path) -> None:
    model = make_model(freeze=["vision.*"])
    before = snapshot(model)
    trainer = fit(model, shards, steps=2)
    after = model.state_dict()
    vision = [k for k in before if k.startswith("vision.")]
    text = [k for k, p in model.named_parameters() if k.startswith("text.")]
    assert vision and text
    assert all(torch.equal(before[k], after[k]) for k in vision)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.startswith("vision."))
    changed = [k for k in text if not torch.equal(before[k], after[k])]
    assert len(changed) > len(text) // 2
    assert not torch.equal(before["loss.logit_scale"], after["loss.logit_scale"])
    optimised = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not any(id(p) in optimised for p in model.vision.parameters())


@pytest.mark.parametrize(
    "kw", [{"freeze": ["visoin.*"]}, {"trainable": ["text.*", "heads.*"]}], ids=str
)
def test_pattern_matching_nothing_raises(kw: dict[str, list[str]]) -> None:
    model = make_model(**kw)
    bad = [p for p in (*kw.get("freeze", []), *kw.get("trainable", [])) if "text" not in p]
    with pytest.raises(ValueError, match=f"pattern '{bad[0]}'"):
        model.configure_model()


def test_trainable_list_trains_only_what_it_names() -> None:
    model = make_model(trainable=["text.*", "loss.*"], freeze=["text.text.token_embedding.*"])
    model.configure_model()
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    names = {n for n, _ in model.named_parameters()}
    expected = {n for n in names if n.startswith(("text.", "loss."))}
    assert trains == expected - {"text.text.token_embedding.weight"}


def test_init_from_a_checkpoint_reproduces_weights(run: dict[str, Any]) -> None:
    ckpt = run["tmp"] / "trained.ckpt"
    run["trainer"].save_checkpoint(ckpt)
    trained = run["model"].state_dict()

    fresh = make_model(seed=1, init_from=str(ckpt))
    assert not torch.equal(
        fresh.state_dict()["vision.model.head.weight"], trained["vision.model.head.weight"]
    )
    fresh.configure_model()
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, trained[k], rtol=0, atol=0, msg=k)

    plain = run["tmp"] / "weights.pt"  # a bare state dict works too
    torch.save(run["model"].text.state_dict(), plain)
    with pytest.raises(ValueError, match="no parameter matches"):  # names lack the text. prefix
        make_model(init_from=str(plain)).configure_model()


def test_init_from_missing_file_names_the_flag(tmp_path: Path) -> None:
    model = make_model(init_from=str(tmp_path / "missing.ckpt"))
    with pytest.raises(FileNotFoundError, match=r"model\.init_from.*missing\.ckpt"):
        model.configure_model()


# --- temperature, weight decay groups, schedule ---------------------------------------------


@pytest.mark.parametrize("loss_cls", [ClipLoss, SigLipLoss], ids=["clip", "siglip"])
def test_logit_scale_is_clamped_after_every_step(loss_cls: type, shards: Path) -> None:
    """Start far above ln(100) with a huge LR (Adam moves each weight by about lr a step):
    without the clamp the scale would still be above ln(100) after two steps."""
    loss = loss_cls(init_logit_scale=math.log(100) + 3.0)
    model = make_model(
        loss=loss, optimizer=functools.partial(torch.optim.Adam, lr=1.0), lr_schedule=Constant()
    )
    fit(model, shards, steps=2)
    scale = float(model.loss.logit_scale.detach())
    assert math.isfinite(scale)
    assert 0.0 <= scale <= math.log(100) + 1e-6


def test_no_decay_group_holds_scales_biases_and_norms(run: dict[str, Any]) -> None:
    model, trainer = run["model"], run["trainer"]
    names = {id(p): n for n, p in model.named_parameters()}
    decay_group, no_decay_group = trainer.optimizers[0].param_groups
    decay = [names[id(p)] for p in decay_group["params"]]
    no_decay = [names[id(p)] for p in no_decay_group["params"]]
    assert decay_group["weight_decay"] == WEIGHT_DECAY and no_decay_group["weight_decay"] == 0.0
    assert sorted(decay + no_decay) == sorted(names.values())  # every parameter exactly once

    assert "loss.logit_scale" in no_decay
    biases = [n for n in names.values() if n.endswith(".bias")]
    norms = [n for n in names.values() if ".norm" in n or ".ln_" in n or "ln_final" in n]
    assert biases and norms and "vision.model.norm.weight" in norms
    assert set(biases) | set(norms) <= set(no_decay)
    assert "vision.model.head.weight" in decay and "text.text.text_projection" in decay
    assert all(dict(model.named_parameters())[n].ndim >= 2 for n in decay)
    assert not any("bias" in n or "norm" in n or "ln_" in n for n in decay)
    # position embeddings and the class token are embeddings, not weight matrices
    assert {"vision.model.pos_embed", "vision.model.cls_token"} <= set(no_decay)


def test_trainer_follows_the_schedule(run: dict[str, Any]) -> None:
    """LR seen at each step = peak x factor(step, total), total = the Trainer's max_steps."""
    sched = WarmupCosine(warmup_steps=2, min_ratio=0.1)
    expected = [PEAK_LR * sched.factor(s, STEPS) for s in range(STEPS)]
    assert run["lrs"] == pytest.approx(expected)
    assert run["lrs"] == pytest.approx([5e-4, 1e-3, 1e-3, 5.5e-4])


def test_warmup_cosine_factors_match_the_formula() -> None:
    s = WarmupCosine(warmup_steps=10, min_ratio=0.1)
    total = 110
    assert s.factor(0, total) == pytest.approx(0.1)  # (step + 1) / warmup
    assert s.factor(4, total) == pytest.approx(0.5)
    assert s.factor(9, total) == pytest.approx(1.0)
    assert s.factor(10, total) == pytest.approx(1.0)  # cosine starts at the peak
    for step in (35, 60, 85, 109):
        progress = (step - 10) / (total - 10)
        cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        assert s.factor(step, total) == pytest.approx(cosine)
    assert s.factor(60, total) == pytest.approx(0.55)  # half way: mean of peak and floor
    assert s.factor(110, total) == pytest.approx(0.1)
    assert s.factor(500, total) == pytest.approx(0.1)  # past the end: stays at the floor

    ratio = WarmupCosine(warmup_ratio=0.1)
    assert ratio.warmup_for(200) == 20
    assert ratio.factor(19, 200) == pytest.approx(1.0) and ratio.factor(0, 200) == 0.05
    assert WarmupCosine().factor(0, 100) == pytest.approx(1.0)  # no warmup
    assert Constant(warmup_steps=4).factor(1, 100) == 0.5
    assert Constant(warmup_steps=4).factor(50, 100) == 1.0


def test_a_fixed_logit_scale_stays_fixed_without_trainable_patterns():
    from mmpt.models.losses import ClipLoss
    from mmpt.models.module import apply_trainable

    loss = ClipLoss(learnable_scale=False)
    apply_trainable(loss, None, [])
    assert not loss.logit_scale.requires_grad
    apply_trainable(loss, ["logit_scale"], [])
    assert loss.logit_scale.requires_grad

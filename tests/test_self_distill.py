"""MoCo v3 and DINO: EMA teacher, losses against direct formulas, band-aware views, training."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from mmpt.models.dino import DINOModule
from mmpt.models.ema_teacher import EMATeacher, cosine_momentum
from mmpt.models.encoders.from_checkpoint import tower_from_checkpoint
from mmpt.models.encoders.timm_vit import TimmVisionTower
from mmpt.models.losses.self_distill import dino_loss, moco_v3_loss, update_center
from mmpt.models.moco import MoCoV3Module
from mmpt.models.ssl_augment import BandAugment
from mmpt.models.ssl_heads import DINOHead


def _tower(bands: bool = True, dynamic: bool = False, name: str = "vit") -> TimmVisionTower:
    stats = {"bands": "s2_l1c", "mean": [0.1] * 13, "std": [0.05] * 13} if bands else {}
    if name == "resnet":
        small = {"layers": [1, 1, 1, 1]}
        return TimmVisionTower("resnet18", image_size=32, embed_dim=0, model_kwargs=small, **stats)
    kwargs = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    if dynamic:
        kwargs["dynamic_img_size"] = True
    return TimmVisionTower(
        "vit_tiny_patch16_224", image_size=32, embed_dim=0, model_kwargs=kwargs, **stats
    )


def _moco(**kwargs: object) -> MoCoV3Module:
    torch.manual_seed(0)
    return MoCoV3Module(_tower(), dim=16, mlp_dim=32, **kwargs)


def _dino(**kwargs: object) -> DINOModule:
    torch.manual_seed(0)
    head = {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16}
    return DINOModule(_tower(dynamic=True), local_crops=2, **head, **kwargs)


def test_cosine_momentum_schedule() -> None:
    assert cosine_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert cosine_momentum(100, 100, 0.99) == pytest.approx(1.0)
    assert cosine_momentum(25, 100, 0.996) == pytest.approx(
        1 - (1 - 0.996) * (math.cos(math.pi / 4) + 1) / 2
    )
    with pytest.raises(ValueError):
        cosine_momentum(0, 10, 1.5)


def test_ema_teacher_update_formula() -> None:
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    teacher = EMATeacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    old = [p.clone() for p in teacher.module.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student(torch.randn(8, 4))  # moves the batch-norm statistics
    teacher.update(student, 0.9)
    for t, o, s in zip(teacher.module.parameters(), old, student.parameters(), strict=True):
        assert torch.allclose(t, 0.9 * o + 0.1 * s, atol=1e-7)
    for t, s in zip(teacher.module.buffers(), student.buffers(), strict=True):
        assert torch.equal(t, s)
    teacher.update(student, 0.0)
    for t, s in zip(teacher.module.parameters(), student.parameters(), strict=True):
        assert torch.equal(t, s)


def test_moco_v3_loss_equals_direct_formula() -> None:
    g = torch.Generator().manual_seed(0)
    q1, q2, k1, k2 = (torch.randn(5, 8, generator=g, dtype=torch.float64) for _ in range(4))
    t = 0.2

    def direct(q: torch.Tensor, k: torch.Tensor) -> float:
        q = q / q.norm(dim=1, keepdim=True)
        k = k / k.norm(dim=1, keepdim=True)
        total = 0.0
        for i in range(q.shape[0]):
            logits = [float(q[i] @ k[j]) / t for j in range(k.shape[0])]
            total += -logits[i] + math.log(sum(math.exp(x) for x in logits))
        return total / q.shape[0] * 2 * t

    expected = direct(q1, k2) + direct(q2, k1)
    got = moco_v3_loss(q1, q2, k1, k2, t)
    assert abs(float(got) - expected) < 1e-6


def test_dino_loss_and_center_equal_direct_formulas() -> None:
    g = torch.Generator().manual_seed(0)
    b, k, crops = 3, 6, 4  # 2 global + 2 local
    student = torch.randn(crops * b, k, generator=g, dtype=torch.float64)
    teacher = torch.randn(2 * b, k, generator=g, dtype=torch.float64)
    center = torch.randn(1, k, generator=g, dtype=torch.float64)
    ts, tt = 0.1, 0.04
    total, terms = 0.0, 0
    for i in range(2):
        for v in range(crops):
            if v == i:
                continue
            for n in range(b):
                t = teacher[i * b + n]
                s = student[v * b + n]
                p_t = torch.exp((t - center[0]) / tt) / torch.exp((t - center[0]) / tt).sum()
                log_p_s = s / ts - torch.log(torch.exp(s / ts).sum())
                total += float(-(p_t * log_p_s).sum()) / b
            terms += 1
    got = dino_loss(student, teacher, center, ts, tt)
    assert terms == 6
    assert abs(float(got) - total / terms) < 1e-6
    c = center.clone()
    update_center(c, teacher, 0.9)
    assert torch.allclose(c, 0.9 * center + 0.1 * teacher.mean(0, keepdim=True), atol=1e-12)


def test_dino_head_last_layer_is_weight_normed() -> None:
    head = DINOHead(8, out_dim=10, hidden=16, bottleneck=4)
    w = head.last_layer.weight
    assert torch.allclose(w.norm(dim=1), torch.ones(10), atol=1e-6)
    assert not head.last_layer.parametrizations.weight.original0.requires_grad
    out = head(torch.randn(3, 8))
    assert out.shape == (3, 10) and out.abs().max() <= 1 + 1e-5  # cosines
    free = DINOHead(8, out_dim=10, hidden=16, bottleneck=4, norm_last_layer=False)
    assert free.last_layer.parametrizations.weight.original0.requires_grad


def test_band_augment_identity_flip_and_per_band_jitter() -> None:
    x = torch.randn(4, 13, 16, 16)
    mean, std = [0.2] * 13, [0.1] * 13
    plain = BandAugment(16, scale=(1, 1), ratio=(1, 1), flip=False, brightness=0, contrast=0)
    assert torch.allclose(plain(x, mean, std), x, atol=1e-5)
    torch.manual_seed(0)
    flips = BandAugment(16, scale=(1, 1), ratio=(1, 1), brightness=0, contrast=0)(x, mean, std)
    for img, out in zip(x, flips, strict=True):
        assert any(
            torch.allclose(out, img.flip(d), atol=1e-5)
            if d
            else torch.allclose(out, img, atol=1e-5)
            for d in ((), (-1,), (-2,), (-1, -2))
        )
    bright = BandAugment(16, scale=(1, 1), ratio=(1, 1), flip=False, contrast=0, jitter_prob=1)
    y = bright(x, mean, std)
    xs, ys = (t.flatten(2) * 0.1 + 0.2 for t in (x, y))  # scaled units: one factor per band
    factor = (xs * ys).sum(-1, keepdim=True) / (xs * xs).sum(-1, keepdim=True)
    assert torch.allclose(ys, factor * xs, atol=1e-5)
    assert factor[..., 0].std(dim=1).min() > 0  # the bands get different factors
    assert ((factor - 1).abs() <= 0.4 + 1e-5).all()
    contrast = BandAugment(16, scale=(1, 1), ratio=(1, 1), flip=False, brightness=0, jitter_prob=1)
    z = contrast(x, mean, std) * 0.1 + 0.2
    assert torch.allclose(z.mean(dim=(2, 3)), (x * 0.1 + 0.2).mean(dim=(2, 3)), atol=1e-5)
    crops = BandAugment(8, scale=(0.2, 0.5), blur_prob=1.0)(x, mean, std)
    assert crops.shape == (4, 13, 8, 8) and torch.isfinite(crops).all()


def test_band_augment_smooth_spectral_gain() -> None:
    """Every view gets its own gain exp(a + b z + c (z^2 - 1/3)) over the band order, a, b, c
    within the ranges; 13 per-band factors of one view fit that curve exactly."""
    x = torch.randn(64, 13, 8, 8).abs() + 0.5  # positive scaled values (mean 0, std 1)
    view = BandAugment(8, scale=(1, 1), ratio=(1, 1), flip=False, brightness=0, contrast=0,
                       spectral_gain=(0.3, 0.2, 0.1))  # fmt: skip
    torch.manual_seed(0)
    y = view(x, [0.0] * 13, [1.0] * 13)
    log_g = (y / x).log()[:, :, 0, 0]  # (B, C): one factor per band and view
    assert torch.allclose((y / x).log(), log_g[..., None, None].expand_as(y), atol=1e-4)
    z = torch.linspace(-1, 1, 13)
    basis = torch.stack([torch.ones(13), z, z**2 - 1 / 3], 1)  # (C, 3)
    coef = torch.linalg.lstsq(basis.expand(64, 13, 3), log_g[..., None]).solution[..., 0]
    assert torch.allclose(coef @ basis.T, log_g, atol=1e-4)  # smooth: on the quadratic exactly
    for j, r in enumerate((0.3, 0.2, 0.1)):
        assert coef[:, j].abs().max() <= r + 1e-4 and coef[:, j].abs().max() > r / 2
    assert coef[:, 0].std() > 0.1  # views differ (not one gain for the batch)
    with pytest.raises(ValueError, match="spectral_gain"):
        BandAugment(8, spectral_gain=(0.3, -0.1, 0.0))


def _fit(model: L.LightningModule, tmp_path: Path, steps: int = 2) -> L.Trainer:
    images = torch.randn(8, 13, 32, 32)
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(model, DataLoader(images, batch_size=4, drop_last=True))
    return trainer


def test_moco_teacher_follows_the_momentum_schedule(tmp_path: Path) -> None:
    model = _moco(base_momentum=0.5)
    before = [p.clone() for p in model.teacher.module.parameters()]
    _fit(model, tmp_path, steps=1)  # one step of one: momentum(0) = base
    pairs = zip(
        model.teacher.module.parameters(), before, model.student().parameters(), strict=True
    )
    for t, o, s in pairs:
        assert torch.allclose(t, 0.5 * o + 0.5 * s, atol=1e-6)
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert model.predictor is not None and model.temperature == 0.2


def test_moco_on_a_resnet_and_rgb() -> None:
    torch.manual_seed(0)
    model = MoCoV3Module(_tower(bands=False, name="resnet"), dim=8, mlp_dim=16)
    loss = model(torch.randn(4, 3, 32, 32))
    loss.backward()
    assert loss > 0 and model.encoder.model.conv1.weight.grad is not None


def test_dino_trains_freezes_last_layer_and_records_the_teacher(tmp_path: Path) -> None:
    model = _dino(freeze_last_layer_steps=5)
    last = model.head.last_layer.parametrizations.weight.original1.clone()
    mlp = model.head.mlp[0].weight.clone()
    trainer = _fit(model, tmp_path, steps=2)
    assert torch.equal(model.head.last_layer.parametrizations.weight.original1, last)
    assert not torch.equal(model.head.mlp[0].weight, mlp)
    assert model.center.abs().sum() > 0  # the centre moved
    ckpt = tmp_path / "dino.ckpt"
    trainer.save_checkpoint(ckpt)
    tower = tower_from_checkpoint(str(ckpt))  # the teacher's encoder, as DINO evaluates
    x = torch.randn(2, 13, 32, 32)
    with torch.no_grad():
        assert torch.allclose(tower.pooled_features(x), model.features(x), atol=1e-6)
        assert not torch.allclose(tower.pooled_features(x), model.encoder.pooled_features(x))


def test_dino_on_a_resnet_with_local_crops() -> None:
    torch.manual_seed(0)
    model = DINOModule(
        _tower(name="resnet"), local_crops=2, out_dim=32, hidden_dim=16, bottleneck_dim=8
    )
    assert model.local_view.size == 13  # 3/7 of 32 px
    loss = model(torch.randn(4, 13, 32, 32))
    loss.backward()
    assert torch.isfinite(loss)


def test_fixed_size_vit_refuses_local_crops() -> None:
    with pytest.raises(ValueError, match="dynamic_img_size"):
        DINOModule(_tower(), local_crops=2, out_dim=16, hidden_dim=16, bottleneck_dim=8)
    with pytest.raises(ValueError, match="multiple of the patch"):
        DINOModule(
            _tower(dynamic=True), local_view=BandAugment(12), out_dim=16, hidden_dim=16,
            bottleneck_dim=8,
        )  # fmt: skip


def test_validation_returns_knn_features() -> None:
    model = _moco().eval()
    from mmpt.batch import ImageBatch

    batch = ImageBatch(
        images=torch.randn(4, 13, 32, 32), labels=torch.tensor([0, 1, 0, 1]), keys=list("abcd")
    )
    with torch.no_grad():
        out = model.validation_step(batch, 0)
    assert out["image_emb"].shape == (4, 32) and torch.equal(out["labels"], batch.labels)

"""SatMAE++: multi-scale targets, upsampling decoder, per-scale loss, single-scale parity."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from mmpt.models.encoders.from_checkpoint import tower_from_checkpoint
from mmpt.models.encoders.timm_vit import TimmVisionTower
from mmpt.models.mae import MAEModule
from mmpt.models.satmae_pp import MultiScaleUpsampler, SatMAEPPModule, multiscale_targets


def _tower(groups: str | None = "satmae") -> TimmVisionTower:
    kwargs = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
    stats = {"mean": [0.0] * 13, "std": [1.0] * 13}
    return TimmVisionTower(
        "vit_tiny_patch16_224", image_size=16, embed_dim=0, model_kwargs=kwargs,
        bands="s2_l1c", band_groups=groups, **stats,
    )  # fmt: skip


def _satmae(groups: str | None = "satmae", **kwargs: object) -> SatMAEPPModule:
    torch.manual_seed(0)
    dec = {"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2}
    return SatMAEPPModule(_tower(groups), **dec, **kwargs)


def _triangle_rows(n_in: int, n_out: int) -> torch.Tensor:
    """Antialiased bilinear shrink weights: triangle of half-width n_in / n_out, renormalised."""
    s = n_in / n_out
    centres = (torch.arange(n_out, dtype=torch.float64) + 0.5) * s
    d = (torch.arange(n_in, dtype=torch.float64)[None] + 0.5 - centres[:, None]).abs() / s
    w = (1 - d).clamp_min(0)
    return w / w.sum(1, keepdim=True)


def test_multiscale_targets_equal_a_hand_computed_downsample() -> None:
    # the 2x shrink's weights worked by hand: taps 1/8, 3/8, 3/8, 1/8, cut at the border
    w84 = _triangle_rows(8, 4)
    assert torch.allclose(w84[0, :3], torch.tensor([3, 3, 1], dtype=torch.float64) / 7)
    assert torch.allclose(w84[1, :5], torch.tensor([0, 1, 3, 3, 1], dtype=torch.float64) / 8)
    images = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    t1, t2, t4 = multiscale_targets(images, 2, [1, 2, 4])
    assert t4 is images
    assert torch.allclose(t2, w84 @ images @ w84.T, atol=1e-12)
    w82 = _triangle_rows(8, 2)
    assert torch.allclose(t1, w82 @ images @ w82.T, atol=1e-12)
    assert t1.shape == (2, 3, 2, 2) and t2.shape == (2, 3, 4, 4)


def test_upsampler_shapes() -> None:
    up = MultiScaleUpsampler(channels=10, levels=2, ratio=4)
    outs = up(torch.randn(2, 10, 8, 8))
    assert [tuple(o.shape) for o in outs] == [(2, 10, 16, 16), (2, 10, 32, 32)]


def test_per_scale_loss_on_a_hand_case() -> None:
    """Upsampler outputs zeroed: the L1 terms are mean |target| at 2x and 4x, and the 1x term
    is the band-group MAE loss of the 1x image; the total weighs them as configured."""
    model = _satmae(scale_weights=[0.6, 0.3, 0.1])
    for block in model.upsampler.blocks:
        torch.nn.init.zeros_(block.out.weight)
        torch.nn.init.zeros_(block.out.bias)
    images = torch.randn(2, 13, 64, 64)
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    losses, _, _ = model.scale_losses(images, gen())
    idx = [c for g in model.band_groups for c in g]
    assert len(idx) == 10  # SatMAE drops B1, B9, B10
    small = F.interpolate(images, size=(16, 16), mode="bilinear", antialias=True)
    mid = F.interpolate(images, size=(32, 32), mode="bilinear", antialias=True)
    assert torch.allclose(losses[0], MAEModule.forward(model, small, gen())[0], atol=1e-6)
    assert torch.allclose(losses[1], mid[:, idx].abs().mean(), atol=1e-6)
    assert torch.allclose(losses[2], images[:, idx].abs().mean(), atol=1e-6)
    total = model(images, gen())[0]
    expected = 0.6 * losses[0] + 0.3 * losses[1] + 0.1 * losses[2]
    assert torch.allclose(total, expected, atol=1e-6)


def test_gradients_reach_encoder_decoder_and_upsampler() -> None:
    model = _satmae(groups=None)
    model(torch.randn(2, 13, 64, 64))[0].backward()
    for part in (model.encoder, model.decoder, model.upsampler):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), part


def test_single_scale_equals_mae() -> None:
    """scales [1], weight 1: the same weights and the same loss as MAEModule, bit for bit."""
    single = _satmae(groups=None, scales=[1], scale_weights=[1.0])
    torch.manual_seed(0)
    mae = MAEModule(_tower(None), decoder_dim=16, decoder_depth=1, decoder_heads=2)
    assert single.state_dict().keys() == mae.state_dict().keys()
    for k, v in mae.state_dict().items():
        assert torch.equal(single.state_dict()[k], v), k
    images = torch.randn(3, 13, 16, 16)
    a = single(images, torch.Generator().manual_seed(1))[0]
    b = mae(images, torch.Generator().manual_seed(1))[0]
    assert torch.equal(a, b)
    assert single.preprocess.image.size == mae.preprocess.image.size == 16


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="doubling"):
        _satmae(scales=[1, 3])
    with pytest.raises(ValueError, match="one weight per scale"):
        _satmae(scales=[1, 2], scale_weights=[1.0])
    with pytest.raises(ValueError, match="64 px tiles"):
        _satmae().scale_losses(torch.randn(1, 13, 48, 48))


def test_reads_top_scale_and_records_the_tower_at_scale_one(tmp_path: Path) -> None:
    model = _satmae(log_reconstructions=2)
    assert model.preprocess.image.size == 64
    assert model.encoder.image_preprocess.size == 16
    images = torch.randn(4, 13, 64, 64)
    trainer = L.Trainer(
        max_steps=2, limit_val_batches=1, num_sanity_val_steps=0, accelerator="cpu",
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, DataLoader(images, batch_size=2), DataLoader(images, batch_size=2))
    assert (tmp_path / "reconstructions" / "epoch000.png").is_file()
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    tower = tower_from_checkpoint(str(ckpt))
    assert tower.image_preprocess.size == 16
    small = F.interpolate(images, size=(16, 16), mode="bilinear", antialias=True)
    with torch.no_grad():
        assert torch.allclose(tower.pooled_features(small), model.encoder.pooled_features(small))

"""MAE: masking, patchify, loss, encoder, training, multispectral and band-group input, figures."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger
from PIL import Image
from torch.utils.data import DataLoader

from mmpt.batch import ImageTextBatch
from mmpt.models.encoders.timm_vit import TimmVisionTower
from mmpt.models.mae import (
    MAEModule,
    mae_loss,
    patchify,
    random_masking,
    unpatchify,
)
from mmpt.models.mae_figure import display_tiles
from mmpt.preprocess import ImagePreprocess


def _tower(in_chans: int = 3) -> TimmVisionTower:
    kwargs = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "in_chans": in_chans}
    stats = {} if in_chans == 3 else {"mean": [0.0] * in_chans, "std": [1.0] * in_chans}
    return TimmVisionTower(
        "vit_tiny_patch16_224", image_size=32, embed_dim=0, model_kwargs=kwargs, **stats
    )


def _mae(in_chans: int = 3, **kwargs: object) -> MAEModule:
    torch.manual_seed(0)
    return MAEModule(_tower(in_chans), decoder_dim=16, decoder_depth=1, decoder_heads=2, **kwargs)


@pytest.mark.parametrize("ratio", [0.75, 0.7, 0.5])
def test_random_masking_fraction_and_restore(ratio: float) -> None:
    b, n, d = 5, 37, 4
    x = torch.randn(b, n, d)
    gen = torch.Generator().manual_seed(1)
    visible, mask, ids_restore = random_masking(x, ratio, gen)
    keep = int(n * (1 - ratio))
    assert visible.shape == (b, keep, d)
    assert torch.equal(mask.sum(1), torch.full((b,), float(n - keep)))
    # gather back (visible + placeholders) equals the original at visible positions
    full = torch.cat([visible, torch.zeros(b, n - keep, d)], dim=1)
    restored = full.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, d))
    vis = (mask == 0).unsqueeze(-1)
    assert torch.equal(restored * vis, x * vis)
    assert torch.all(restored[mask.bool()] == 0)
    # the shuffle itself round-trips: ids_restore is the inverse permutation
    ids_shuffle = ids_restore.argsort(1)
    shuffled = x.gather(1, ids_shuffle.unsqueeze(-1).expand(-1, -1, d))
    assert torch.equal(shuffled[:, :keep], visible)
    back = shuffled.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, d))
    assert torch.equal(back, x)


@pytest.mark.parametrize("channels", [3, 13])
def test_patchify_round_trip(channels: int) -> None:
    imgs = torch.randn(2, channels, 16, 24)
    patches = patchify(imgs, 8)
    assert patches.shape == (2, 6, 64 * channels)
    assert torch.equal(patches[0, 1].view(8, 8, channels), imgs[0, :, :8, 8:16].permute(1, 2, 0))
    assert torch.equal(unpatchify(patches, 8, (2, 3)), imgs)
    square = torch.randn(2, channels, 16, 16)
    assert torch.equal(unpatchify(patchify(square, 4), 4), square)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_matches_direct_formula(norm_pix: bool) -> None:
    torch.manual_seed(0)
    b, n, dim = 3, 6, 12
    pred, target = torch.randn(b, n, dim), torch.randn(b, n, dim) * 3 + 1
    mask = (torch.rand(b, n) < 0.6).float()
    mask[0, 0] = 1.0
    total, count = 0.0, 0
    for i in range(b):
        for j in range(n):
            if mask[i, j] == 0:
                continue
            t = target[i, j]
            if norm_pix:
                mean = sum(t.tolist()) / dim
                var = sum((v - mean) ** 2 for v in t.tolist()) / (dim - 1)
                t = (t - mean) / (var + 1e-6) ** 0.5
            total += sum(e * e for e in (pred[i, j] - t).tolist()) / dim
            count += 1
    loss = mae_loss(pred, target, mask, norm_pix=norm_pix)
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    # predictions of visible patches do not matter
    changed = torch.where(mask.bool().unsqueeze(-1), pred, torch.randn_like(pred) * 100)
    assert torch.equal(mae_loss(changed, target, mask, norm_pix=norm_pix), loss)


def test_loss_dtype_follows_the_input() -> None:
    """fp64 in -> fp64 out (exact to fp64 rounding); half precision is compared in fp32."""
    torch.manual_seed(0)
    pred, target = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 5, 8).double()
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 1, 0, 1]], dtype=torch.float64)
    loss = mae_loss(pred, target, mask, norm_pix=True)
    assert loss.dtype == torch.float64
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    direct = ((pred - (target - mean) / (var + 1e-6).sqrt()) ** 2).mean(-1)
    expected = (direct * mask).sum() / mask.sum()
    assert abs(loss.item() - expected.item()) < 1e-14  # fp32 math would be off by ~1e-7
    half = mae_loss(pred.bfloat16(), target.float(), mask.bool(), norm_pix=False)
    assert half.dtype == torch.float32


def test_decoder_layer_norms_use_mae_eps() -> None:
    """facebookresearch/mae builds the decoder with partial(nn.LayerNorm, eps=1e-6)."""
    norms = [m for m in _mae().decoder.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 3  # two per block (1 block) and the final one
    assert {m.eps for m in norms} == {1e-6}


def test_encoder_sees_only_visible_tokens() -> None:
    model = _mae(mask_ratio=0.75)
    lengths: list[int] = []
    for block in model.encoder.model.blocks:
        block.register_forward_hook(lambda m, i, o: lengths.append(o.shape[1]))
    n = model.encoder.model.patch_embed.num_patches  # 16
    loss, pred, mask = model(torch.randn(2, 3, 32, 32))
    assert lengths == [1 + int(n * 0.25)] * 2
    assert pred.shape == (2, n, 8 * 8 * 3) and mask.shape == (2, n)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_training_step_accepts_batch_and_tensor_and_keys_map_to_vision() -> None:
    model = _mae()
    images = torch.randn(2, 3, 32, 32)
    batch = ImageTextBatch(images, torch.zeros(2, 4, dtype=torch.long), torch.arange(2))
    assert torch.isfinite(model.training_step(batch, 0))
    assert torch.isfinite(model.training_step(images, 0))
    assert torch.isfinite(model.validation_step(images, 0))
    with pytest.raises(ValueError, match="float"):
        model.training_step(images.to(torch.uint8), 0)
    vision = _tower()
    mapped = {
        "vision." + k[len("encoder.") :]: v
        for k, v in model.state_dict().items()
        if k.startswith("encoder.")
    }
    own = {f"vision.{k}": v for k, v in vision.state_dict().items()}
    assert mapped.keys() == own.keys()
    assert all(mapped[k].shape == own[k].shape for k in own)


def test_few_steps_lower_the_loss() -> None:
    model = _mae()
    # smooth images: their masked patches are predictable from position and context
    coarse = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    images = torch.nn.functional.interpolate(coarse, size=32, mode="bilinear")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        gen = torch.Generator().manual_seed(0)  # same mask every step: a fixed problem
        loss = model(images, gen)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_multispectral_encoder_and_reconstruct() -> None:
    model = _mae(in_chans=13, mask_ratio=0.7)
    images = torch.randn(2, 13, 32, 32)
    loss, pred, mask = model(images)
    assert pred.shape == (2, 16, 8 * 8 * 13) and torch.isfinite(loss)
    assert torch.equal(mask.sum(1), torch.full((2,), 16.0 - int(16 * 0.3)))
    rec, mask_images = model.reconstruct(images, torch.Generator().manual_seed(0))
    assert rec.shape == images.shape and mask_images.shape == (2, 1, 32, 32)
    visible = (mask_images == 0).expand_as(images)
    assert torch.allclose(rec[visible], images[visible], atol=1e-5)  # mean 0, std 1
    assert 0 < mask_images.mean() < 1


def test_rejects_non_vit() -> None:
    tower = _tower()
    tower.model = torch.nn.Linear(2, 2)  # stands in for any non-ViT timm model
    with pytest.raises(TypeError, match="VisionTransformer"):
        MAEModule(tower)


# --- band groups (SatMAE) -------------------------------------------------------------------

GROUP_MEAN = [0.1 * i for i in range(13)]
GROUP_STD = [1.0 + 0.05 * i for i in range(13)]


def _group_mae(**kwargs: object) -> MAEModule:
    torch.manual_seed(0)
    tower = TimmVisionTower(
        "vit_tiny_patch16_224",
        image_size=32,
        embed_dim=0,
        model_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
        bands="s2_l1c",
        band_groups="satmae",
        mean=GROUP_MEAN,
        std=GROUP_STD,
        scale=1e-4,
    )
    return MAEModule(tower, decoder_dim=16, decoder_depth=1, decoder_heads=2, **kwargs)


def _smooth(n: int, channels: int, seed: int = 0) -> torch.Tensor:
    coarse = torch.randn(n, channels, 4, 4, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=32, mode="bilinear")


@pytest.mark.parametrize("norm_pix", [False, True])
def test_grouped_loss_matches_direct_formula(norm_pix: bool) -> None:
    model = _group_mae(norm_pix_loss=norm_pix)
    groups = model.band_groups
    assert groups == ((1, 2, 3, 7), (4, 5, 6, 8), (11, 12))
    assert len(model.decoder.heads) == 3 and not hasattr(model.decoder, "head")
    images = torch.randn(2, 13, 32, 32) * 2 + 0.5
    loss, pred, mask = model(images, torch.Generator().manual_seed(3))
    assert [p.shape for p in pred] == [(2, 16, 64 * len(g)) for g in groups]
    # the mask is one random-shuffle mask over all 3 * 16 tokens, as for plain MAE
    want_mask = random_masking(torch.zeros(2, 48, 1), 0.75, torch.Generator().manual_seed(3))[1]
    assert torch.equal(mask, want_mask)
    total, count = 0.0, 0
    for g, group in enumerate(groups):
        for b in range(2):
            for r in range(4):
                for c in range(4):
                    if mask[b, g * 16 + r * 4 + c] == 0:
                        continue
                    block = images[b, list(group), 8 * r : 8 * r + 8, 8 * c : 8 * c + 8]
                    t = block.permute(1, 2, 0).reshape(-1).double()  # (row, column, channel)
                    if norm_pix:
                        t = (t - t.mean()) / (t.var(unbiased=True) + 1e-6).sqrt()
                    total += (pred[g][b, r * 4 + c].double() - t).pow(2).mean().item()
                    count += 1
    assert count == 2 * 36
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_grouped_masking_keeps_exact_token_count() -> None:
    model = _group_mae(mask_ratio=0.6)
    lengths: list[int] = []
    for block in model.encoder.model.blocks:
        block.register_forward_hook(lambda m, i, o: lengths.append(o.shape[1]))
    _, _, mask = model(torch.randn(3, 13, 32, 32))
    keep = int(3 * 16 * (1 - 0.6))
    assert lengths == [1 + keep] * 2
    assert torch.equal(mask.sum(1), torch.full((3,), 48.0 - keep))


def test_grouped_mae_trains() -> None:
    model = _group_mae()
    images = _smooth(2, 13)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(images, torch.Generator().manual_seed(0))[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_grouped_reconstruct_and_preprocess() -> None:
    model = _group_mae()
    assert model.preprocess.image is model.encoder.image_preprocess
    assert model.preprocess.tokenizer is None
    images = torch.randn(2, 13, 32, 32)
    rec, mask_images = model.reconstruct(images, torch.Generator().manual_seed(0))
    assert rec.shape == images.shape and mask_images.shape == images.shape
    mean, std = (
        torch.tensor(GROUP_MEAN).view(1, -1, 1, 1),
        torch.tensor(GROUP_STD).view(1, -1, 1, 1),
    )
    pixels = images * std + mean
    ungrouped = [0, 9, 10]  # B1, B9, B10
    assert torch.allclose(rec[:, ungrouped], pixels[:, ungrouped], atol=1e-5)
    assert not mask_images[:, ungrouped].any()
    for group in model.band_groups:
        m = mask_images[:, list(group)]
        assert torch.equal(m, m[:, :1].expand_as(m))  # one mask per group
        assert 0 < m.mean() < 1
    visible = mask_images == 0
    assert torch.allclose(rec[visible], pixels[visible], atol=1e-5)
    assert not torch.allclose(rec[~visible], pixels[~visible], atol=1e-2)
    # groups are masked independently
    assert not torch.equal(mask_images[:, 1], mask_images[:, 4])


def test_display_tiles_stretch_and_rgb_clip() -> None:
    model = _group_mae()
    pre = model.encoder.image_preprocess
    original = torch.rand(2, 13, 32, 32) * torch.tensor([1.0, 10.0]).view(2, 1, 1, 1)
    masked, recon, orig = display_tiles([original * 0, original * 2, original], pre)
    assert orig.shape == (2, 32, 32, 3)
    # B4, B3, B2 shown as RGB; one 2-98 percentile stretch per image over those three bands
    shown = original[:, [3, 2, 1]].permute(0, 2, 3, 1)
    for i in range(2):
        lo, hi = torch.quantile(shown[i].flatten(), torch.tensor([0.02, 0.98]))
        torch.testing.assert_close(orig[i], ((shown[i] - lo) / (hi - lo)).clamp(0, 1))
        torch.testing.assert_close(recon[i], ((2 * shown[i] - lo) / (hi - lo)).clamp(0, 1))
    assert torch.equal(masked, torch.zeros_like(masked))
    rgb = ImagePreprocess(size=32)
    (tile,) = display_tiles([torch.tensor([-0.5, 0.3, 1.5]).view(1, 3, 1, 1)], rgb)
    assert tile.flatten().tolist() == pytest.approx([0.0, 0.3, 1.0])


class _FakeBoard(Logger):
    """Stands in for TensorBoard: records ``experiment.add_image`` calls."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[tuple[str, torch.Tensor, int, str]] = []

    name, version, save_dir = "fake", 0, None

    @property
    def experiment(self) -> _FakeBoard:
        return self

    def add_image(self, tag: str, image: torch.Tensor, step: int, dataformats: str) -> None:
        self.images.append((tag, image, step, dataformats))

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        pass

    def log_hyperparams(self, params: object) -> None:
        pass


@pytest.mark.parametrize("board", [False, True])
def test_fit_writes_reconstruction_png(tmp_path: Path, board: bool) -> None:
    model = _group_mae(log_reconstructions=3)
    data = DataLoader(_smooth(4, 13), batch_size=2)  # 2 images in the first val batch
    logger = _FakeBoard() if board else False
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=1,
        accelerator="cpu",
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, data, data)
    png = tmp_path / "reconstructions" / "epoch000.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 100  # tiles drawn, not a blank canvas
    assert model._recon_images.shape == (2, 13, 32, 32)
    if board:
        ((tag, image, step, fmt),) = logger.images  # once: nothing during the sanity check
        assert (tag, step, fmt) == ("val/reconstructions", 2, "HWC")
        assert image.ndim == 3 and image.shape[-1] == 3 and image.dtype == torch.uint8

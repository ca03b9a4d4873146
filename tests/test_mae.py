"""MAE: masking, patchify, loss, visible-only encoder, training and multispectral input."""

from __future__ import annotations

import pytest
import torch

from mmpt.batch import ImageTextBatch
from mmpt.models.encoders.timm_vit import TimmVisionTower
from mmpt.models.mae import MAEModule, mae_loss, patchify, random_masking, unpatchify


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

"""VideoViTTower: the image model per frame at init, frames interacting once trained, any T."""

import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from mmpt.models.encoders import VideoViTTower

TINY_KW = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
ATOL = 1e-5


def tiny_video(embed_dim: int = 16, model_kwargs: dict | None = None, **kw) -> VideoViTTower:
    return VideoViTTower(
        "vit_tiny_patch16_224",
        embed_dim=embed_dim,
        image_size=32,
        model_kwargs={**TINY_KW, **(model_kwargs or {})},
        **kw,
    ).eval()


def clip(b: int = 2, t: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, t, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def per_frame(image_model: torch.nn.Module, videos: torch.Tensor) -> torch.Tensor:
    """(B, T, out) outputs of ``image_model`` run on each frame separately."""
    return torch.stack([image_model(videos[:, i]) for i in range(videos.shape[1])], dim=1)


def perturb_temporal(tower: VideoViTTower, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tower.named_parameters():
            if "temporal" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize(
    "model_kwargs",
    [
        {},
        {"reg_tokens": 2, "no_embed_class": True},
        {"class_token": False, "global_pool": "avg"},
    ],
    ids=["cls", "cls+registers", "no-prefix-avg"],
)
def test_identity_at_init(model_kwargs):
    tower = tiny_video(model_kwargs=model_kwargs)
    videos = clip()
    m = tower.model
    tokens = tower.frame_tokens(videos)
    expected_tokens = torch.stack([m.forward_features(videos[:, i]) for i in range(4)], dim=1)
    assert tokens.shape == (2, 4, m.num_prefix_tokens + 16, 32)
    torch.testing.assert_close(tokens, expected_tokens, atol=ATOL, rtol=0)
    torch.testing.assert_close(tower(videos), per_frame(m, videos).mean(1), atol=ATOL, rtol=0)


def test_identity_with_pretrained_safetensors_from_timm(tmp_path):
    src = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=16, **TINY_KW).eval()
    save_file(src.state_dict(), tmp_path / "model.safetensors")
    tower = tiny_video(pretrained=str(tmp_path))
    for name, p in src.state_dict().items():
        assert torch.equal(tower.model.state_dict()[name], p), name
    videos = clip(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(tower(videos), per_frame(src, videos).mean(1), atol=ATOL, rtol=0)
        # A single image (B, C, H, W) is a one-frame clip: exactly the image model.
        torch.testing.assert_close(tower(videos[:, 0]), src(videos[:, 0]), atol=ATOL, rtol=0)


def test_frames_interact_only_through_temporal_parts():
    tower = tiny_video()
    videos = clip()
    changed = videos.clone()
    changed[:, 1] = torch.randn_like(changed[:, 1])
    with torch.no_grad():
        # At init frame 0 does not see frame 1 ...
        torch.testing.assert_close(
            tower.frame_tokens(changed)[:, 0], tower.frame_tokens(videos)[:, 0], atol=0, rtol=0
        )
        perturb_temporal(tower)
        # ... after training the temporal parts it does.
        assert not torch.allclose(
            tower.frame_tokens(changed)[:, 0], tower.frame_tokens(videos)[:, 0], atol=1e-3
        )
        # The temporal position embedding makes frame order matter.
        flipped = tower.frame_tokens(videos.flip(1)).flip(1)
        assert not torch.allclose(flipped, tower.frame_tokens(videos), atol=1e-3)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_reach_temporal_params(checkpointing):
    tower = tiny_video().train()
    tower.set_grad_checkpointing(checkpointing)
    tower(clip(t=3)).sum().backward()
    grads = {n: p.grad for n, p in tower.named_parameters()}
    assert all(g is not None for g in grads.values())
    # Zero-initialised parts get a gradient at step 0 (the rest of the temporal branch is
    # behind the zero projection until it moves).
    for i in range(2):
        assert grads[f"temporal.{i}.attn.proj.weight"].abs().sum() > 0
    assert grads["temporal_pos_embed"][:3].abs().sum() > 0
    assert torch.equal(grads["temporal_pos_embed"][3:], torch.zeros(13, 32))

    perturb_temporal(tower)
    tower.zero_grad()
    tower(clip(t=3)).sum().backward()
    temporal = [n for n, _ in tower.named_parameters() if "temporal" in n]
    assert temporal and all(grads_nonzero(tower, n) for n in temporal)


def grads_nonzero(tower: VideoViTTower, name: str) -> bool:
    return bool(tower.get_parameter(name).grad.abs().sum() > 0)


def test_any_frame_count_with_the_same_weights():
    tower = tiny_video(num_frames=4, max_frames=16)
    perturb_temporal(tower)
    with torch.no_grad():
        assert tower(clip(t=4)).shape == (2, 16)
        assert tower(clip(t=16)).shape == (2, 16)
        assert tower(clip(b=1, t=1)).shape == (1, 16)
    with pytest.raises(ValueError, match="max_frames=16"):
        tower(clip(b=1, t=17))
    with pytest.raises(ValueError, match=r"\(B, T, C, H, W\)"):
        tower(torch.randn(3, 32, 32))


def test_shapes_attributes_and_parameter_names():
    tower = tiny_video(embed_dim=24, num_frames=8)
    assert tower.output_dim == 24 and tower.num_frames == 8 and tower.max_frames == 16
    pp = tower.image_preprocess
    assert (pp.size, pp.channels) == (32, 3) and len(pp.mean) == 3
    assert tower.temporal_pos_embed.shape == (16, 32)
    names = [n for n, _ in tower.named_parameters()]
    temporal = [n for n in names if "temporal" in n]
    assert "temporal_pos_embed" in temporal and "temporal.1.attn.proj.weight" in temporal
    # Everything else is the timm image model, named as in TimmVisionTower.
    assert all(n.startswith("model.") for n in names if "temporal" not in n)

    headless = tiny_video(embed_dim=0)
    assert headless.output_dim == 32
    assert headless(clip(b=1, t=2)).shape == (1, 32)


def test_describe_rebuilds_the_architecture():
    tower = tiny_video(num_frames=2, max_frames=8)
    perturb_temporal(tower)
    desc = json.loads(json.dumps(tower.describe()))
    assert desc["class_path"] == "mmpt.models.encoders.VideoViTTower"
    args = desc["init_args"]
    assert args["pretrained"] is None and (args["num_frames"], args["max_frames"]) == (2, 8)
    rebuilt = VideoViTTower(**args).eval()
    rebuilt.load_state_dict(tower.state_dict())
    videos = clip(t=2)
    with torch.no_grad():
        assert torch.equal(rebuilt(videos), tower(videos))


def test_runs_under_bf16_autocast():
    tower = tiny_video()
    perturb_temporal(tower)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = tower(clip())
    assert out.shape == (2, 16) and out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()


def test_rejects_bad_configs():
    with pytest.raises(ValueError, match="num_frames=20"):
        tiny_video(num_frames=20)
    with pytest.raises(ValueError, match="patch_drop_rate"):
        tiny_video(model_kwargs={"patch_drop_rate": 0.5})
    with pytest.raises(ValueError, match="VisionTransformer"):
        VideoViTTower(
            "eva02_tiny_patch14_224",
            embed_dim=8,
            image_size=32,
            model_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2},
        )

"""VideoTextModule on tiny CPU towers: EgoNCE training step (tags used, grads on both towers),
other contrastive losses, and validation/test retrieval metrics logged at the epoch end."""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from mmpt.batch import VideoTextBatch
from mmpt.models.contrastive import first_text_per_item
from mmpt.models.encoders import OpenCLIPTextTower, VideoViTTower
from mmpt.models.losses import ClipLoss, EgoNCELoss
from mmpt.models.video_text import VideoTextModule
from tests.helpers import TINY_TEXT

TINY_VIDEO = {
    "model_name": "vit_tiny_patch16_224",
    "image_size": 32,
    "num_frames": 2,
    "embed_dim": 16,
    "model_kwargs": {"patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2},
}


def make_model(seed: int = 0, **kw: Any) -> VideoTextModule:
    torch.manual_seed(seed)
    return VideoTextModule(
        VideoViTTower(**TINY_VIDEO), OpenCLIPTextTower(**TINY_TEXT["init_args"]), **kw
    )


def make_batch(
    model: VideoTextModule,
    n: int = 4,
    nouns: torch.Tensor | None = None,
    verbs: torch.Tensor | None = None,
) -> VideoTextBatch:
    """``n`` random normalised clips of 2 frames, one narration each."""
    g = torch.Generator().manual_seed(1)
    texts = [f"#C C moves object {i}" for i in range(n)]
    return VideoTextBatch(
        videos=torch.randn(n, 2, 3, 32, 32, generator=g),
        text_tokens=model.preprocess.tokenizer(texts),
        text_to_video=torch.arange(n),
        nouns=torch.zeros(n, 3) if nouns is None else nouns,
        verbs=torch.zeros(n, 2) if verbs is None else verbs,
        keys=[f"{i:03d}" for i in range(n)],
        video_uids=[f"v{i // 2}" for i in range(n)],
    )


def train_loss(model: VideoTextModule, batch: VideoTextBatch) -> torch.Tensor:
    with warnings.catch_warnings():  # self.log without a Trainer warns and does nothing
        warnings.simplefilter("ignore")
        return model.training_step(batch, 0)


def test_training_step_gives_grads_to_both_towers() -> None:
    model = make_model()
    assert isinstance(model.loss, EgoNCELoss)
    loss = train_loss(model, make_batch(model))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for tower in (model.vision, model.text):
        grads = [p.grad for p in tower.parameters() if p.grad is not None]
        assert grads and any(bool(g.abs().sum() > 0) for g in grads)


def test_egonce_tags_make_extra_positives() -> None:
    model = make_model()
    plain = make_batch(model)
    # clips 0 and 2 share noun 1 and verb 0: an extra positive pair; 1 shares only a noun
    nouns = torch.tensor([[0, 1, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.float32)
    verbs = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 0]], dtype=torch.float32)
    tagged = make_batch(model, nouns=nouns, verbs=verbs)
    with torch.no_grad():
        a, b = train_loss(model, plain), train_loss(model, tagged)
        # the same as the loss itself on the embeddings
        vid, txt = model(tagged)
        direct = EgoNCELoss()(vid, txt, nouns, verbs, gather=False)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(b, direct)


def test_clip_loss_ignores_tags() -> None:
    model = make_model(loss=ClipLoss())
    nouns = torch.ones(4, 3)
    with torch.no_grad():
        a = train_loss(model, make_batch(model))
        b = train_loss(model, make_batch(model, nouns=nouns, verbs=torch.ones(4, 2)))
    torch.testing.assert_close(a, b)


def test_first_text_per_item() -> None:
    t2v = torch.tensor([1, 0, 1, 2, 0])
    assert first_text_per_item(t2v, 3).tolist() == [1, 0, 3]
    with pytest.raises(ValueError, match="at least one caption"):
        first_text_per_item(t2v, 4)


# --- validation and test: retrieval over the whole split ----------------------------------


def id_batch(ids: list[int], narrations: list[int]) -> VideoTextBatch:
    """Clips whose first pixel holds their id; narrations (of clip ``narrations[k]``) too."""
    videos = torch.zeros(len(ids), 2, 3, 32, 32)
    videos[:, 0, 0, 0, 0] = torch.tensor(ids, dtype=torch.float32)
    tokens = torch.zeros(len(narrations), 4, dtype=torch.long)
    tokens[:, 0] = torch.tensor([ids[k] for k in narrations])
    return VideoTextBatch(
        videos=videos,
        text_tokens=tokens,
        text_to_video=torch.tensor(narrations),
        nouns=torch.zeros(len(ids), 3),
        verbs=torch.zeros(len(ids), 2),
    )


def one_hot_encoders(model: VideoTextModule, monkeypatch: pytest.MonkeyPatch) -> None:
    """Embed clip id k and narration id k both as the k-th unit vector: perfect matches."""

    def video(videos: torch.Tensor) -> torch.Tensor:
        return F.one_hot(videos[:, 0, 0, 0, 0].long(), 8).float()

    def text(tokens: torch.Tensor) -> torch.Tensor:
        return F.one_hot(tokens[:, 0], 8).float()

    monkeypatch.setattr(model, "encode_video", video)
    monkeypatch.setattr(model, "encode_text", text)


def batches_loader(batches: list[VideoTextBatch]) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)


def trainer() -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


@pytest.mark.filterwarnings("ignore:.*does not have many workers")
def test_validation_and_test_log_retrieval(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model()
    one_hot_encoders(model, monkeypatch)
    # 5 clips in 2 batches; clips 1 and 4 have two narrations each
    batches = [
        id_batch([0, 1, 2], [0, 1, 1, 2]),
        id_batch([3, 4], [0, 1, 1]),
    ]
    loader = batches_loader(batches)
    val = trainer().validate(model, dataloaders=loader, verbose=False)[0]
    for direction in ("t2v", "v2t"):
        assert val[f"val/retrieval/{direction}/R@1"] == 1.0
        assert val[f"val/retrieval/{direction}/median_rank"] == 1.0
    assert "val/loss" in val
    test = trainer().test(model, dataloaders=loader, verbose=False)[0]
    assert test["test/retrieval/t2v/R@1"] == 1.0

    # batch 2 narrations say clips [3, 4, 4]; reassigning the first two swaps them: 2 misses
    batches[1].text_to_video = torch.tensor([1, 0, 1])
    val = trainer().validate(model, dataloaders=loader, verbose=False)[0]
    assert val["val/retrieval/t2v/R@1"] == pytest.approx(5 / 7)


@pytest.mark.filterwarnings("ignore:.*does not have many workers")
def test_fit_logs_loss_counters_and_retrieval() -> None:
    model = make_model()
    train = [make_batch(model), make_batch(model)]
    train[0].skipped, train[0].clamped, train[1].clamped, train[1].no_neighbour = 1, 2, 3, 4
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
    )
    before = [p.detach().clone() for p in model.text.parameters()]
    trainer.fit(model, batches_loader(train), batches_loader([make_batch(model, n=3)]))
    logged = trainer.callback_metrics
    assert torch.isfinite(logged["train/loss"])
    assert (logged["data/skipped"], logged["data/clamped"], logged["data/no_neighbour"]) == (
        1.0,
        5.0,
        4.0,
    )
    assert 0.0 <= float(logged["val/retrieval/t2v/R@1"]) <= 1.0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.text.parameters(), strict=True))

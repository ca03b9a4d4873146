"""``grad_cache`` on the LightningModules: Lightning's automatic optimization (accumulation,
clipping) and activation checkpointing keep the full-batch result; drop-path replays in
VideoTextModule's EgoNCE step; the quickstart recipe builds with it."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from mmpt.batch import VideoTextBatch
from mmpt.cli import build_cli
from mmpt.models import contrastive
from mmpt.models.encoders import OpenCLIPTextTower, VideoViTTower
from mmpt.models.grad_cache import GradCache, cached_embeddings
from mmpt.models.schedules import Constant
from mmpt.models.video_text import VideoTextModule
from mmpt.strategies import ActivationCheckpointing
from tests import test_egovlpv2 as egovlpv2_tests
from tests.helpers import TINY_TEXT, write_shards, write_tiny_bert
from tests.test_configs import load_recipe, overlay_base, tiny_variant
from tests.test_contrastive_module import fit, make_model, snapshot
from tests.test_video_text_module import TINY_VIDEO

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*IterableDataset. has .__len__. defined"),
    pytest.mark.filterwarnings("ignore:Total length of .list. across ranks is zero"),
]


@pytest.mark.slow  # two Lightning fits: about 15 s on an idle 2-core machine, 50 s when shared
def test_fit_with_grad_cache_equals_full_batch_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two optimizer steps of 2 accumulated batches of 8, clipped: chunks of 3 change nothing.

    The cached run also recomputes the ViT blocks in backward (ActivationCheckpointing).
    """
    calls = []

    def counted(*args, **kw):
        calls.append(args[2])  # the chunk size
        return cached_embeddings(*args, **kw)

    monkeypatch.setattr(contrastive, "cached_embeddings", counted)
    shards = write_shards(tmp_path / "shards", n=32, per_shard=8)
    opt = functools.partial(torch.optim.AdamW, lr=1e-3)
    kw = {"accumulate_grad_batches": 2, "gradient_clip_val": 0.05}
    runs = {}
    for chunk in (None, 3):
        model = make_model(
            optimizer=opt,
            lr_schedule=Constant(),
            grad_cache=GradCache(chunk) if chunk else None,
        )
        before = snapshot(model)
        cbs = [ActivationCheckpointing(["timm.models.vision_transformer.Block"])] if chunk else []
        fit(model, shards, steps=2, callbacks=cbs, **kw)
        runs[chunk] = snapshot(model)
    assert calls == [3] * 4  # 4 batches of the cached run went through gradient caching
    moved = [k for k in before if not torch.equal(before[k], runs[None][k])]
    assert len(moved) > 10
    for k in before:
        torch.testing.assert_close(runs[3][k], runs[None][k], rtol=1e-5, atol=1e-5, msg=k)


def video_model(**kw) -> VideoTextModule:
    """Tiny video tower with drop-path and dropout, so the replay has random draws to match."""
    torch.manual_seed(0)
    video = dict(TINY_VIDEO)
    video["model_kwargs"] = video["model_kwargs"] | {"drop_path_rate": 0.3, "proj_drop_rate": 0.2}
    return VideoTextModule(
        VideoViTTower(**video), OpenCLIPTextTower(**TINY_TEXT["init_args"]), **kw
    )


def video_batch(model: VideoTextModule, n: int = 5) -> VideoTextBatch:
    g = torch.Generator().manual_seed(1)
    return VideoTextBatch(
        videos=torch.randn(n, 2, 3, 32, 32, generator=g),
        text_tokens=model.preprocess.tokenizer([f"#C C moves object {i}" for i in range(n)]),
        text_to_video=torch.arange(n),
        nouns=(torch.rand(n, 3, generator=g) < 0.5).float(),
        verbs=(torch.rand(n, 2, generator=g) < 0.5).float(),
        keys=[f"{i:03d}" for i in range(n)],
        video_uids=[f"v{i // 2}" for i in range(n)],
    )


def grads(model: VideoTextModule, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    loss.backward()
    out = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out | {"loss": loss.detach()}


def test_video_text_egonce_step_replays_drop_path() -> None:
    model = video_model(grad_cache=GradCache(2)).train()
    batch = video_batch(model)
    torch.manual_seed(3)
    with warnings.catch_warnings():  # self.log without a Trainer warns and does nothing
        warnings.simplefilter("ignore")
        got = grads(model, model.training_step(batch, 0))
    torch.manual_seed(3)  # reference: the same chunks of 2, embedded with graphs
    parts = [
        (model.encode_media_rows(batch, rows), model.encode_text(batch.text_tokens[rows]))
        for rows in (slice(0, 2), slice(2, 4), slice(4, 5))
    ]
    vid, txt = (torch.cat(k) for k in zip(*parts, strict=True))
    want = grads(model, model._pair_loss(vid, txt, batch))
    assert got.keys() == want.keys() and len(got) > 20
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    torch.manual_seed(4)  # a different draw changes the gradients: the replay is what matches
    other = grads(model, model._pair_loss(*model.train_embeddings(batch), batch))
    name = "vision.model.blocks.0.mlp.fc1.weight"
    assert not torch.allclose(other[name], want[name], rtol=1e-5, atol=1e-6)


def test_gradcache_recipe_instantiates(tmp_path: Path) -> None:
    """The grad-cache overlay on the tiny CLIP builds (tiny towers) with its chunk and batch."""
    path = ROOT / "configs/quickstart/clip_tiny_gradcache.yaml"
    assert overlay_base(path) == ROOT / "configs/quickstart/clip_tiny.yaml"
    shards = write_shards(tmp_path / "shards", n=8, per_shard=8)
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(yaml.safe_dump(tiny_variant(load_recipe(path), shards)))
    cli = build_cli(["-c", str(tiny)], run=False)
    assert cli.model.grad_cache == GradCache(chunk_size=64)
    assert cli.datamodule.batch_size == 512
    with pytest.raises(ValueError, match="chunk_size"):
        GradCache(chunk_size=0)


@pytest.mark.slow  # about 25 s on an idle 2-core machine, 90 s when shared
def test_egovlpv2_cached_dual_pass_equals_full_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EgoVLPv2 with grad_cache: the same EgoNCE + VTM + MLM loss and gradients (chunks of 3)."""
    calls = []

    def counted(*args, **kw):
        calls.append(args[2])
        return cached_embeddings(*args, **kw)

    monkeypatch.setattr(contrastive, "cached_embeddings", counted)
    bert = str(write_tiny_bert(tmp_path / "bert", egovlpv2_tests.WORDS))
    results = []
    for cache in (None, GradCache(3)):
        model = egovlpv2_tests.make_model(bert, grad_cache=cache)
        egovlpv2_tests.open_gates(model)
        batch = egovlpv2_tests.make_batch(model)
        torch.manual_seed(5)  # hard negatives and MLM masks draw the same
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results.append(grads(model, model.training_step(batch, 0)))
    full, cached = results
    assert calls == [3]
    assert full.keys() == cached.keys() and len(full) > 30
    for k in full:  # gradients up to ~7 (open gates): 1e-5 of each tensor's largest entry
        diff = (cached[k] - full[k]).abs().max().item()
        assert diff <= 1e-5 * full[k].abs().max().item() + 1e-6, (k, diff)


@pytest.mark.slow  # two CPU processes through the CLI: minutes on a shared machine
def test_fsdp2_fit_with_grad_cache_on_two_cpu_processes(tmp_path: Path) -> None:
    """The grad-cache overlay takes 2 FSDP2 steps (activation checkpointing on) on 2 gloo ranks."""
    over = {
        "trainer": {
            "accelerator": "cpu", "devices": 2, "max_steps": 2, "precision": "32-true",
            "limit_val_batches": 0, "check_val_every_n_epoch": None, "val_check_interval": None,
            "enable_progress_bar": False, "logger": False, "enable_checkpointing": False,
            "callbacks": [],
            "strategy": {"class_path": "mmpt.strategies.FSDP2", "init_args": {
                "layers": ["timm.models.vision_transformer.Block"],
                "activation_checkpointing": True}},
        },
        "model": {"init_args": {"grad_cache": {"chunk_size": 3}}},
        "data": {"init_args": {"batch_size": 8, "num_workers": 0, "train": {
            "urls": "data/shapes/train", "resampled": True, "epoch_samples": 64},
            "synthetic": {"kind": "image-text", "out": "data/shapes", "train_samples": 96,
                          "image_size": 64}}},
    }  # fmt: skip
    (tmp_path / "over.yaml").write_text(yaml.safe_dump(over))
    configs = ["clip_tiny.yaml", "clip_tiny_gradcache.yaml"]
    cmd = [sys.executable, "-m", "mmpt.cli", "fit"]
    for name in configs:
        cmd += ["-c", str(ROOT / "configs" / "quickstart" / name)]
    cmd += ["-c", "over.yaml"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert re.search(r"FSDP2: [1-9]\d* layers sharded as units over 2 processes", log)
    assert "`max_steps=2` reached" in log

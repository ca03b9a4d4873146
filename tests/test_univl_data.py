"""UniVL data: the video-caption synthetic set, feature shards (ASR segments, candidates, a
corrupt .npy as a counted skip), raw clips through a per-frame tower, and `mmpt eval univl`."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds

from mmpt.batch import VideoFeatureBatch, VideoTextBatch
from mmpt.datamodules.streams import StreamConfig
from mmpt.datamodules.video_features import (
    VideoFeatureDataModule,
    read_features,
    segment_window,
)
from mmpt.models.encoders import HFTextTower, TimmVisionTower
from mmpt.models.encoders.tokenizers import HFTokenizer
from mmpt.models.univl import UniVLModule
from mmpt.preprocess import Preprocess
from mmpt.shards import ShardWriter, load_index
from mmpt.synth import make_synthetic
from mmpt.synth.video_caption import caption_words, npy_bytes


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 training clips (whole videos with segments) and 6 validation clips, 16-d features."""
    out = tmp_path_factory.mktemp("video_caption")
    make_synthetic("video-caption", out, train_samples=12, val_samples=6, feature_dim=16)
    return out


def datamodule(synth: Path, train: Path, val: bool = True, **kw: Any) -> VideoFeatureDataModule:
    pre = Preprocess(image=None, tokenizer=HFTokenizer(str(synth / "tokenizer"), 10))
    cfg = StreamConfig(urls=str(train), shuffle_buffer=0, shuffle_shards=False)
    kw = {"batch_size": 2, "num_workers": 0, "preprocess": pre} | kw
    return VideoFeatureDataModule(train=cfg, val=cfg if val else None, **kw)


def epoch(dm: VideoFeatureDataModule, train: bool) -> list[VideoFeatureBatch]:
    dm.setup("fit")
    return list(dm.train_dataloader() if train else dm.val_dataloader())


def samples(folder: Path) -> list[dict[str, Any]]:
    urls = [str(folder / s.name) for s in load_index(folder).shards]
    return list(wds.WebDataset(urls, shardshuffle=False))


def test_synth_writes_videos_with_segments_and_captioned_clips(synth: Path) -> None:
    train, val = samples(synth / "train"), samples(synth / "val")
    clips = 0
    for s in train:
        info, feats = json.loads(s["json"]), np.load(io.BytesIO(s["feat.npy"]))
        assert feats.shape == (8 * len(info["segments"]), 16) and feats.dtype == np.float32
        assert info["feature_fps"] == 8.0 and 1 <= len(info["segments"]) <= 6  # last: cut
        clips += len(info["segments"])
    assert clips == 12 and len(val) == 6
    combos = {
        (i["color"], i["shape"], i["action"]) for i in map(json.loads, (s["json"] for s in val))
    }
    assert len(combos) == 6  # distinct held-out combinations
    info = json.loads(val[0]["json"])
    assert (
        info["captions"][0]
        == f"a {info['color']} {info['shape']} " + info["captions"][0].split(" ", 3)[3]
    )
    tokens = HFTokenizer(str(synth / "tokenizer"), 10)([c for i in (info,) for c in i["captions"]])
    assert (tokens != 1).all()  # no [UNK]: the vocabulary covers the captions
    assert caption_words()[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def test_train_reads_one_segment_and_its_neighbours_as_candidates(synth: Path) -> None:
    dm = datamodule(synth, synth / "train", val=False, segments=True, candidates=2)
    batches = epoch(dm, train=True)
    assert batches and all(isinstance(b, VideoFeatureBatch) for b in batches)
    b = batches[0]
    assert b.features.shape == (2, 8, 16) and b.frame_mask.all()
    assert b.text_to_video.tolist() == [0, 0, 1, 1] and len(b.captions) == 4


def test_eval_keeps_every_caption(synth: Path) -> None:
    dm = datamodule(synth, synth / "val", val_text_key="json:captions", val_batch_size=4)
    b = epoch(dm, train=False)[0]
    assert b.features.shape == (4, 8, 16) and b.text_to_video.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_corrupt_npy_is_a_counted_skip(synth: Path, tmp_path: Path) -> None:
    good = samples(synth / "val")[:3]
    rows = [{"__key__": f"k{i}", "feat.npy": s["feat.npy"], "json": json.loads(s["json"])}
            for i, s in enumerate(good)]  # fmt: skip
    rows[1]["feat.npy"] = b"\x93NUMPY not really an array"
    rows.append({"__key__": "k3", "feat.npy": npy_bytes(np.full((4, 16), np.nan, np.float32)),
                 "json": rows[0]["json"]})  # fmt: skip
    with ShardWriter(tmp_path / "bad", samples_per_shard=10, modalities=["video", "text"]) as w:
        for r in rows:
            w.write(r)
    got = epoch(datamodule(synth, tmp_path / "bad", val_batch_size=8), train=False)
    assert sum(b.skipped for b in got) == 2
    assert [k for b in got for k in b.keys] == ["k0", "k2"]


def test_read_features_and_segment_windows() -> None:
    with pytest.raises(ValueError, match="numeric"):
        read_features(npy_bytes(np.zeros(5, np.float32)))
    assert read_features(npy_bytes(np.ones((3, 2), np.float64))).dtype == np.float32
    assert segment_window({"start": 1.0, "end": 2.0}, 8.0, 40) == (8, 16)
    assert segment_window({"start": 0.1, "end": 0.1}, 1.0, 5) == (0, 1)  # at least one row
    assert segment_window({"start": 4.5, "end": 9.0}, 1.0, 6) == (4, 6)  # clipped at the end
    with pytest.raises(ValueError, match="after"):
        segment_window({"start": 7.0, "end": 8.0}, 1.0, 6)


def test_raw_clips_run_through_a_per_frame_tower(synth: Path) -> None:
    torch.manual_seed(0)
    text = HFTextTower(str(synth / "tokenizer"), embed_dim=16, context_length=10)
    vision = TimmVisionTower("vit_tiny_patch16_224", image_size=32, embed_dim=16,
                             model_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 2,
                                           "num_heads": 2})  # fmt: skip
    sizes = {"video_layers": 1, "cross_layers": 1, "decoder_layers": 1, "num_heads": 4}
    model = UniVLModule(text, vision=vision, max_frames=4, max_caption_len=10, mlm_head="small",
                        **sizes)  # fmt: skip
    assert model.preprocess.image == vision.image_preprocess
    batch = VideoTextBatch(
        videos=torch.randn(2, 3, 3, 32, 32),
        text_tokens=text.tokenizer(["a red circle grows", "the blue cross rises"]),
        text_to_video=torch.arange(2),
        nouns=torch.zeros(2, 0),
        verbs=torch.zeros(2, 0),
    )
    terms = model.losses(batch)
    sum(terms.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in vision.parameters())
    assert len(model.generate_captions(*model.video_inputs(batch))) == 2


def test_eval_runner_writes_captions_retrieval_and_rerank(synth: Path, tmp_path: Path) -> None:
    import argparse

    from mmpt.eval.univl_cli import run_univl

    torch.manual_seed(0)
    text = HFTextTower(str(synth / "tokenizer"), embed_dim=16, context_length=10)
    sizes = {"video_layers": 1, "cross_layers": 1, "decoder_layers": 1, "num_heads": 4}
    model = UniVLModule(text, video_dim=16, max_frames=8, max_caption_len=10, mlm_head="small",
                        **sizes)  # fmt: skip
    dm = datamodule(synth, synth / "val", val_text_key="json:captions")
    dm.preprocess = model.preprocess
    flags = {"max_new_tokens": 6, "num_beams": 2, "shuffled_baseline": True, "seed": 0}
    flags["no_meteor"] = True  # Java's start-up is slow; caption_metrics tests METEOR
    args = argparse.Namespace(data=None, batch_size=4, num_workers=0, rerank_k=3, ckpt="x.ckpt",
                              **flags)  # fmt: skip
    assert run_univl(args, model, dm, torch.device("cpu"), tmp_path) == 0
    report = json.loads((tmp_path / "univl.json").read_text())
    metrics = report["metrics"]
    keys = ["caption/CIDEr", "caption/BLEU-4", "caption/ROUGE-L", "shuffled/CIDEr", "t2v/R@1"]
    for key in [*keys, "t2v/median_rank", "rerank/t2v/R@1", "rerank/t2v/median_rank"]:
        assert key in metrics, key
    assert report["num_clips"] == 6 and report["num_captions"] == 12 and report["rerank_k"] == 3
    assert metrics["rerank/t2v/R@5"] >= metrics["rerank/t2v/R@1"]


def test_raw_clip_variant_reads_through_the_video_text_datamodule(tmp_path: Path) -> None:
    from mmpt.datamodules.video_text import VideoTextDataModule
    from mmpt.preprocess import ImagePreprocess

    out = tmp_path / "vc"
    make_synthetic("video-caption", out, train_samples=4, val_samples=2, feature_dim=8,
                   raw_clips=True, image_size=32, num_frames=4)  # fmt: skip
    clips = [json.loads(s["json"]) for s in samples(out / "clips" / "val")]
    feats = [json.loads(s["json"]) for s in samples(out / "val")]
    assert [c["captions"] for c in clips] == [f["captions"] for f in feats]  # the same clips
    pre = Preprocess(
        image=ImagePreprocess(size=32), tokenizer=HFTokenizer(str(out / "tokenizer"), 10)
    )
    cfg = StreamConfig(urls=str(out / "clips" / "train"), shuffle_buffer=0, shuffle_shards=False)
    dm = VideoTextDataModule(train=cfg, batch_size=2, num_workers=0, num_frames=4, backend="pyav",
                             scene_negatives=False, preprocess=pre)  # fmt: skip
    dm.setup("fit")
    batch = dm.normalize(next(iter(dm.train_dataloader())))
    assert batch.videos.shape == (2, 4, 3, 32, 32) and batch.text_tokens.shape == (2, 10)

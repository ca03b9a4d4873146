"""VideoTextDataModule on a tiny synthetic video-text set: batch layout, eval narrations, tags,
scene-aware partners, backend parity, counted skips and clamps, exact plain epochs."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import webdataset as wds

from mmpt.batch import VideoTextBatch
from mmpt.datamodules.streams import StreamConfig
from mmpt.datamodules.video_text import SceneBatcher, VideoClip, VideoTextDataModule, multi_hot
from mmpt.models.encoders.tokenizers import OpenCLIPTokenizer
from mmpt.preprocess import ImagePreprocess, Preprocess
from mmpt.shards import ShardWriter, load_index
from mmpt.synth import make_synthetic

MEAN, STD = (0.2, 0.4, 0.6), (0.5, 0.25, 0.125)
TOKENIZER = OpenCLIPTokenizer(16)
PRE = Preprocess(image=ImagePreprocess(size=32, mean=MEAN, std=STD), tokenizer=TOKENIZER)
B = 4


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 train clips (6 videos of 3-6 clips, 4 shards of 6) and 6 val clips, 64 px, 8 frames."""
    out = tmp_path_factory.mktemp("video_text")
    make_synthetic(
        "video-text",
        out,
        train_samples=24,
        image_size=64,
        num_frames=8,
        fps=8,
        val_samples=6,
        mcq_samples=1,
        samples_per_shard=6,
    )
    return out


def raw(folder: Path) -> dict[str, dict[str, Any]]:
    """Every sample of a shard folder by key: its bytes and parsed json."""
    urls = [str(folder / s.name) for s in load_index(folder).shards]
    return {
        s["__key__"]: {**s, "info": json.loads(s["json"])}
        for s in wds.WebDataset(urls, shardshuffle=False)
    }


def datamodule(train: Path, val: Path | None = None, **kw: Any) -> VideoTextDataModule:
    def cfg(urls: Path) -> StreamConfig:
        return StreamConfig(urls=str(urls), shuffle_buffer=0, shuffle_shards=False)

    kw = {"batch_size": B, "num_workers": 0, "backend": "pyav", "preprocess": PRE} | kw
    return VideoTextDataModule(train=cfg(train), val=cfg(val) if val else None, **kw)


def epoch(dm: VideoTextDataModule, train: bool = True) -> list[VideoTextBatch]:
    dm.setup("fit")
    return list(dm.train_dataloader() if train else dm.val_dataloader())


def test_train_batch_layout_and_normalize(synth: Path) -> None:
    batches = epoch(datamodule(synth / "train"))
    assert len(batches) == 24 // B
    b = batches[0]
    assert b.videos.shape == (2 * B, 4, 3, 32, 32) and b.videos.dtype == torch.uint8
    assert b.text_tokens.shape == (2 * B, 16) and b.text_tokens.dtype == torch.long
    assert torch.equal(b.text_to_video, torch.arange(2 * B))
    assert b.nouns.shape == (2 * B, 4) and b.verbs.shape == (2 * B, 8)
    assert b.nouns.dtype == torch.float32 and len(b.keys) == len(b.video_uids) == 2 * B
    raw_videos = b.videos.clone()
    out = datamodule(synth / "train").normalize(b)
    assert out.videos.dtype == torch.float32 and out.videos.shape == raw_videos.shape
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    want = (raw_videos[1, 2].float() / 255 - mean) / std
    torch.testing.assert_close(out.videos[1, 2], want)


def test_without_scene_negatives_batches_hold_b_rows(synth: Path) -> None:
    batches = epoch(datamodule(synth / "train", scene_negatives=False))
    assert [len(b) for b in batches] == [B] * 6 and all(b.no_neighbour == 0 for b in batches)


def test_eval_takes_eval_frames_and_every_narration(synth: Path) -> None:
    dm = datamodule(
        synth / "train", synth / "val", val_text_key="json:narrations", eval_num_frames=6
    )
    batches = epoch(dm, train=False)
    samples = raw(synth / "val")
    assert sum(len(b) for b in batches) == len(samples) == 6
    for b in batches:
        assert b.videos.shape[1:] == (6, 3, 32, 32)
        narrations = [n for k in b.keys for n in samples[k]["info"]["narrations"]]
        owners = [i for i, k in enumerate(b.keys) for _ in samples[k]["info"]["narrations"]]
        assert torch.equal(b.text_tokens, TOKENIZER(narrations))
        assert b.text_to_video.tolist() == owners and len(owners) == 2 * len(b)


def test_tags_are_multi_hot_of_the_json_ids(synth: Path) -> None:
    samples = raw(synth / "train")
    for b in epoch(datamodule(synth / "train")):
        for key, nouns, verbs in zip(b.keys, b.nouns, b.verbs, strict=True):
            info = samples[key]["info"]
            assert nouns.nonzero().flatten().tolist() == sorted(info["noun_ids"])
            assert verbs.nonzero().flatten().tolist() == sorted(info["verb_ids"])
    assert multi_hot([1, 3], 4, "noun").tolist() == [0, 1, 0, 1]
    assert multi_hot([7], 0, "noun").shape == (0,)  # no vocabulary: no tags
    with pytest.raises(ValueError, match="noun id 4 outside"):
        multi_hot([4], 4, "noun")


def test_partners_share_the_anchor_video(synth: Path) -> None:
    samples = raw(synth / "train")
    clips_per_video = Counter(s["info"]["video_uid"] for s in samples.values())
    for b in epoch(datamodule(synth / "train")):
        anchors, partners = b.video_uids[:B], b.video_uids[B:]
        mismatched = sum(a != p for a, p in zip(anchors, partners, strict=True))
        assert b.no_neighbour == mismatched
        for i, (a, p) in enumerate(zip(anchors, partners, strict=True)):
            assert b.keys[B + i] != b.keys[i]
            if clips_per_video[a] > 1:  # every synthetic video has 3-6 clips
                assert a == p


def clip(key: str, video: str, start: float | None) -> VideoClip:
    return VideoClip(torch.zeros(1), [key], torch.zeros(0), torch.zeros(0), key, video, start)


def test_scene_batcher_window_preference_and_fallback() -> None:
    random.seed(0)
    stream = [
        clip("a0", "A", 0.0),
        clip("b0", "B", 0.0),
        clip("a1", "A", 30.0),
        clip("a2", "A", 500.0),  # too far from every other A clip
        clip("c0", "C", None),
        clip("b1", "B", 10.0),
    ]
    batches = list(SceneBatcher(batch_size=2, window=60.0, cache_size=8)(iter(stream)))
    assert [[c.key for c in b[:2]] for b in batches] == [["a0", "b0"], ["a1", "a2"], ["c0", "b1"]]
    first, second, third = ([(c.key, c.role) for c in b[2:]] for b in batches)
    assert first == [("a1", "neighbour"), ("a2", "fallback")]  # b1 not read yet: fallback
    assert second[0] == ("a0", "neighbour") and second[1][1] == "fallback"
    assert third[0][1] == "fallback" and third[1] == ("b0", "neighbour")
    # cache of 1: the neighbour is evicted, so the anchor falls back to another video
    small = list(SceneBatcher(batch_size=1, window=60.0, cache_size=1)(iter(stream[:3])))
    assert [(b[1].key, b[1].role) for b in small[:1]] == [("b0", "fallback")]
    # exact resume: a batch uses up its anchors only (a1, a partner here, is an anchor later)
    scene = SceneBatcher(batch_size=2, window=60.0, cache_size=8)
    assert scene.taken_keys(batches[0]) == ["a0", "b0"]


def test_decord_and_pyav_give_equal_batches(synth: Path) -> None:
    out = {}
    for backend in ("decord", "pyav"):
        random.seed(0)
        out[backend] = epoch(datamodule(synth / "train", backend=backend))
    for a, b in zip(out["decord"], out["pyav"], strict=True):
        assert a.keys == b.keys and torch.equal(a.text_tokens, b.text_tokens)
        assert (a.videos.float() - b.videos.float()).abs().mean() < 2.0


def write(out: Path, samples: list[dict[str, Any]], meta: dict | None = None) -> Path:
    with ShardWriter(out, samples_per_shard=100, modalities=["video", "text"], meta=meta) as w:
        for s in samples:
            w.write(s)
    return out


def copy(sample: dict[str, Any], key: str, **info: Any) -> dict[str, Any]:
    return {"__key__": key, "mp4": sample["mp4"], "txt": "a clip", "json": sample["info"] | info}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_corrupt_video_and_bad_tags_are_skipped_and_counted(synth: Path, train: bool) -> None:
    good = list(raw(synth / "train").values())[:8]
    samples = [copy(s, f"k{i}") for i, s in enumerate(good)]
    samples[2]["mp4"] = b"\x00\x00\x00\x18ftypmp42 not really a video"
    samples[5]["json"] = samples[5]["json"] | {"noun_ids": [99]}
    meta = load_index(synth / "train").meta  # nouns and verbs: the tag vocabulary
    shards = write(synth.parent / f"bad_{train}", samples, meta)
    got = epoch(datamodule(shards, shards, scene_negatives=False), train=train)
    assert sum(b.skipped for b in got) == 2
    assert not {"k2", "k5"} & {k for b in got for k in b.keys}


def test_window_past_the_end_is_clamped_and_counted(synth: Path) -> None:
    good = list(raw(synth / "train").values())[:4]
    samples = [copy(s, f"w{i}", clip_start=0.25, clip_end=0.75) for i, s in enumerate(good)]
    samples[1]["json"] = samples[1]["json"] | {"clip_start": 100.0, "clip_end": 101.0}
    shards = write(synth.parent / "window", samples)
    got = epoch(datamodule(shards, shards, window=True), train=False)
    assert sum(b.clamped for b in got) == 1
    assert sum(b.clamped for b in epoch(datamodule(shards, shards), train=False)) == 0
    train = epoch(datamodule(shards, window=True, batch_size=2))
    assert sum(b.clamped for b in train) == 1  # counted on its anchor row only
    no_window = copy(good[0], "nw")
    del no_window["json"]["clip_start"], no_window["json"]["clip_end"]
    shards = write(synth.parent / "no_window", [samples[0], no_window])
    assert sum(b.skipped for b in epoch(datamodule(shards, shards, window=True), False)) == 1


def test_every_anchor_once_per_plain_epoch_with_two_workers(synth: Path) -> None:
    dm = datamodule(synth / "train", num_workers=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 24 // B
    batches = list(loader)
    assert len(batches) == len(loader) and all(len(b) == 2 * B for b in batches)
    anchors = Counter(k for b in batches for k in b.keys[:B])
    assert set(anchors.values()) == {1} and set(anchors) == set(raw(synth / "train"))

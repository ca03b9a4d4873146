"""Synthetic video-text shards: decodable clips, real motion, EgoClip json, EgoMCQ, determinism."""

from __future__ import annotations

import inspect
import io
import json
import math
from collections import Counter
from pathlib import Path

import av
import decord
import numpy as np
import pytest
import webdataset as wds
from transformers import AutoTokenizer

from mmpt.data_cli import main
from mmpt.shards import load_index
from mmpt.synth import SYNTH_KINDS
from mmpt.synth.image_text import COLORS, make_noise_bank
from mmpt.synth.video_text import (
    ACTIONS,
    COMBOS,
    MCQ_TYPES,
    NOUNS,
    NUM_COMBOS,
    VERBS,
    ClipSpec,
    actions_for,
    encode_mp4,
    make_video,
    narrations_for,
    pick_codec,
    plan_track,
    plan_videos,
    synth_video_text,
)

CLIP_KEYS = {
    "video_uid", "clip_uid", "clip_start", "clip_end", "narration", "nouns", "verbs",
    "noun_ids", "verb_ids", "fps", "num_frames",
}  # fmt: skip


def _samples(folder: str | Path) -> list[dict]:
    """Every sample of a shard folder, read with a plain webdataset pipeline."""
    folder = Path(folder)
    urls = [str(folder / s.name) for s in load_index(folder).shards]
    return [{**s, "info": json.loads(s["json"])} for s in wds.WebDataset(urls, shardshuffle=False)]


def _decode(mp4: bytes) -> tuple[np.ndarray, float]:
    """(T, H, W, 3) RGB frames and the stream's frame rate, read with PyAV."""
    with av.open(io.BytesIO(mp4)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        return frames, float(stream.average_rate)


def _shape_mask(frames: np.ndarray) -> np.ndarray:
    """Pixels of the (saturated) shape on the grey background: (T, H, W) bool."""
    return frames.max(-1).astype(int) - frames.min(-1) > 80


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("clips")
    return synth_video_text(
        out, train_samples=14, image_size=32, num_frames=8, fps=8, seed=2, val_samples=9,
        mcq_samples=4, samples_per_shard=5,
    )  # fmt: skip


def test_vocabulary_and_combinations() -> None:
    assert NOUNS == ["circle", "square", "triangle", "cross"] and list(ACTIONS) == VERBS
    assert len(VERBS) == 8 and MCQ_TYPES == {1: "inter", 2: "intra"}
    assert not any(a.startswith("spin") for a in actions_for("circle"))
    assert NUM_COMBOS == len(set(COMBOS)) == len(COLORS) * (4 * 8 - 2) == 180
    assert narrations_for("red", "circle", "move right")[0] == (
        "#C C moves the red circle to the right"
    )


def test_plan_videos_balances_combinations() -> None:
    rng = np.random.default_rng(0)
    once = plan_videos(NUM_COMBOS, rng)
    assert sorted(c for v in once for c in v) == sorted(COMBOS)
    for video in once:
        assert 3 <= len(video) <= 6
        assert len({(c, s) for c, s, _ in video}) == 1  # one object per video
        assert len({a for *_, a in video}) == len(video)  # each action once
    counts = Counter(c for v in plan_videos(2 * NUM_COMBOS + 7, rng) for c in v)
    assert sum(counts.values()) == 2 * NUM_COMBOS + 7 and set(counts.values()) <= {2, 3}


def test_no_single_frame_tells_the_direction() -> None:
    """Over a clip's frames, opposite actions give the same positions, sizes and angles."""
    rng = np.random.default_rng(0)

    def frame_states(action: str) -> np.ndarray:
        tracks = [plan_track("square", action, 64, rng) for _ in range(3000)]
        return np.concatenate([np.linspace(a, b, 8) for a, b in tracks])  # (N * 8, 4)

    quantiles = [10, 30, 50, 70, 90]
    for a, b, dim in [
        ("move right", "move left", 0),
        ("move up", "move down", 1),
        ("grow", "shrink", 2),
    ]:
        qa, qb = (np.percentile(frame_states(x)[:, dim], quantiles) for x in (a, b))
        assert np.abs(qa - qb).max() < 0.6, (a, qa, qb)
    first = [plan_track("square", "move right", 64, rng)[0][0] for _ in range(500)]
    last = [plan_track("square", "move right", 64, rng)[1][0] for _ in range(500)]
    assert np.mean(last) - np.mean(first) > 15  # yet each clip does move


@pytest.mark.parametrize("split", ["train", "val"])
def test_clips_decode_with_pyav_and_decord(synth: dict, split: str) -> None:
    for s in _samples(synth[split]):
        info = s["info"]
        frames, fps = _decode(s["mp4"])
        assert frames.shape == (8, 32, 32, 3) and fps == info["fps"] == 8.0
        assert info["num_frames"] == len(frames)
        reader = decord.VideoReader(io.BytesIO(s["mp4"]))
        assert len(reader) == info["num_frames"] and reader.get_avg_fps() == info["fps"]
        batch = reader.get_batch([7, 0, 3]).asnumpy()  # random access, out of order
        assert np.abs(batch.astype(int) - frames[[7, 0, 3]]).mean() < 2


@pytest.mark.parametrize("codec", ["mpeg4", "libx264"])
def test_both_codecs_encode_the_frames_deterministically(codec: str) -> None:
    if codec == "libx264" and pick_codec() != "libx264":
        pytest.skip("this PyAV build has no libx264")
    frames = np.full((6, 32, 32, 3), 90, np.uint8)
    for t in range(6):
        frames[t, 10:20, 2 + 3 * t : 12 + 3 * t] = COLORS["red"]
    mp4 = encode_mp4(frames, fps=6, codec=codec)
    assert mp4 == encode_mp4(frames, fps=6, codec=codec)
    decoded, fps = _decode(mp4)
    assert decoded.shape == frames.shape and fps == 6.0
    assert np.abs(decoded.astype(int) - frames).mean() < 4


def test_motion_is_real_and_the_noun_shows_in_every_frame() -> None:
    rng = np.random.default_rng(5)
    spec = ClipSpec(image_size=64, num_frames=8, fps=8, codec=pick_codec())
    clips = [("cyan", "triangle", a) for a in VERBS]
    video = make_video("v", clips, spec, rng, make_noise_bank(rng, 64, 4))
    for mp4, info in video:
        frames, _ = _decode(mp4)
        mask = _shape_mask(frames)
        area = mask.sum((1, 2))
        assert area.min() > 10
        ys, xs = np.indices(mask.shape[1:])
        cx, cy = (mask * xs).sum((1, 2)) / area, (mask * ys).sum((1, 2)) / area
        dx, dy, growth = cx[-1] - cx[0], cy[-1] - cy[0], area[-1] / area[0]
        for t in range(8):  # the colour is readable from any single frame
            mean = frames[t][mask[t]].mean(0)
            nearest = min(COLORS, key=lambda c: np.abs(np.array(COLORS[c]) - mean).sum())
            assert nearest == info["color"] == "cyan"
        action = info["action"]
        moving = {"move right": dx > 12, "move left": dx < -12, "move up": dy < -12}
        moving["move down"] = dy > 12
        if action in moving:
            assert moving[action], (action, dx, dy)
            steps = np.diff(cx if "right" in action or "left" in action else cy)
            assert np.all(np.sign(steps) == np.sign(steps.sum()))  # monotonic
        else:
            assert abs(dx) < 2 and abs(dy) < 2, action
        if action in ("grow", "shrink"):
            assert growth > 2.5 if action == "grow" else growth < 1 / 2.5
        else:
            assert 0.8 < growth < 1.25, action
        # orientation of a 3-fold symmetric shape: the argument of its third angular moment
        angles = []
        for t in range(8):
            py, px = np.nonzero(mask[t])
            z = (px - cx[t]) + 1j * (py - cy[t])
            angles.append(math.degrees(np.angle((z**3).sum())) / 3)  # period 120 degrees
        turn = sum((b - a + 60) % 120 - 60 for a, b in zip(angles, angles[1:], strict=False))
        expected = {"spin clockwise": 1, "spin counterclockwise": -1}.get(action, 0)
        if expected:  # image y points down: a growing atan2 angle turns clockwise on screen
            assert expected * turn > 35, (action, turn)
        else:
            assert abs(turn) < 20, (action, turn)


def test_clip_json_timeline_and_meta(synth: dict) -> None:
    for split in ("train", "val"):
        index = load_index(synth[split])
        meta = index.meta
        assert meta["kind"] == "video-text" and meta["split"] == split
        assert meta["nouns"] == NOUNS and meta["verbs"] == VERBS
        assert meta["mcq_types"] == {"1": "inter", "2": "intra"}
        assert meta["fps"] == 8.0 and meta["num_frames"] == 8 and meta["clip_seconds"] == 1.0
        assert index.modalities == ["video", "text"]
        samples = _samples(synth[split])
        assert len(samples) == synth[f"{split}_samples"]
        assert len({s["info"]["video_uid"] for s in samples}) == synth[f"{split}_videos"]
        videos: dict[str, list[dict]] = {}
        for s in samples:
            info = s["info"]
            assert set(info) >= CLIP_KEYS and info["key"] == s["__key__"]
            assert s["txt"].decode() == info["narration"]
            assert info["nouns"] == [NOUNS[i] for i in info["noun_ids"]] == [info["shape"]]
            assert info["verbs"] == [VERBS[i] for i in info["verb_ids"]] == [info["action"]]
            narrations = narrations_for(info["color"], info["shape"], info["action"])
            assert info["narration"] in narrations
            if split == "val":
                assert info["narration"] == narrations[0]
            videos.setdefault(info["video_uid"], []).append(info)
        for clips in videos.values():
            assert [c["clip_index"] for c in clips] == list(range(len(clips)))
            assert [c["clip_start"] for c in clips] == [float(k) for k in range(len(clips))]
            assert all(c["clip_end"] - c["clip_start"] == 1.0 for c in clips)
            assert len({(c["color"], c["shape"]) for c in clips}) == 1
            assert len({c["action"] for c in clips}) == len(clips)
    val = _samples(synth["val"])
    assert len({s["info"]["narration"] for s in val}) == len(val) == 9  # chance R@1 = 1/9
    retrieval = load_index(synth["val"]).meta["retrieval"]
    assert retrieval == {"clips": 9, "distinct_combos": 9, "chance_r1": 1 / 9}


def test_mcq_candidates_answer_and_type(synth: dict) -> None:
    meta = load_index(synth["mcq"]).meta
    assert meta["num_candidates"] == 5 and meta["chance_accuracy"] == 0.2
    samples = _samples(synth["mcq"])
    assert [s["info"]["type"] for s in samples] == [1, 2, 1, 2]
    for s in samples:
        info = s["info"]
        assert {k for k in s if not k.startswith("__")} == {
            "json", "txt", "info", *(f"{j}.mp4" for j in range(5))
        }  # fmt: skip
        assert info["type_name"] == meta["mcq_types"][str(info["type"])]
        cands = info["candidates"]
        assert len(cands) == 5 and 0 <= info["answer"] < 5
        assert info["query"] == s["txt"].decode() == cands[info["answer"]]["narration"]
        assert [c["narration"] for c in cands].count(info["query"]) == 1
        assert info["noun_ids"] == cands[info["answer"]]["noun_ids"]
        if info["type_name"] == "intra":  # one video, one object: only the verb tells
            assert len({c["video_uid"] for c in cands}) == 1
            assert len({(c["color"], c["shape"]) for c in cands}) == 1
            assert len({c["action"] for c in cands}) == 5
        else:  # five videos, five objects
            assert len({c["video_uid"] for c in cands}) == 5
            assert len({(c["color"], c["shape"]) for c in cands}) == 5
        frames, fps = _decode(s[f"{info['answer']}.mp4"])
        assert frames.shape == (8, 32, 32, 3) and fps == 8.0


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    kw = dict(train_samples=5, val_samples=3, mcq_samples=2, image_size=32, samples_per_shard=4)
    a = synth_video_text(tmp_path / "a", seed=1, **kw)
    b = synth_video_text(tmp_path / "b", seed=1, **kw)
    c = synth_video_text(tmp_path / "c", seed=2, **kw)
    for split in ("train", "val", "mcq"):
        names = sorted(p.name for p in Path(a[split]).iterdir())
        assert names == sorted(p.name for p in Path(b[split]).iterdir())
        for name in names:
            assert (Path(a[split]) / name).read_bytes() == (Path(b[split]) / name).read_bytes()
    first = Path(a["train"]) / "shard-000000.tar"
    assert first.read_bytes() != (Path(c["train"]) / first.name).read_bytes()


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"image_size": 33}, "--image-size"),
        ({"image_size": 16}, "--image-size"),
        ({"num_frames": 3}, "--num-frames"),
        ({"fps": 0}, "--fps"),
        ({"mcq_samples": 0}, "--mcq-samples"),
    ],
)
def test_bad_parameters_name_the_flag(tmp_path: Path, kwargs: dict, flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        synth_video_text(tmp_path, **kwargs)
    assert not list(tmp_path.iterdir())


def test_cli_writes_video_text_and_rejects_foreign_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert "num_frames" in inspect.signature(SYNTH_KINDS["video-text"]).parameters
    out = tmp_path / "clips"
    argv = ["synth", "--kind", "video-text", "--out", str(out), "--train-samples", "4"]
    small = ["--val-samples", "2", "--mcq-samples", "2", "--image-size", "32"]
    assert main([*argv, *small, "--num-frames", "4", "--fps", "4"]) == 0
    summary = capsys.readouterr().out
    assert "train: 4 samples" in summary and "mcq: 2 samples" in summary
    meta = load_index(out / "train").meta
    assert (meta["num_frames"], meta["fps"], meta["clip_seconds"]) == (4, 4.0, 1.0)
    (out / "val" / "index.json").unlink()  # as if interrupted: a rerun replaces its shards
    assert main([*argv, *small, "--num-frames", "4", "--fps", "4"]) == 0
    assert load_index(out / "val").meta["generator"]["val_samples"] == 2
    assert main([*argv, "--max-images", "3"]) == 2
    assert "--max-images does not apply to --kind video-text" in capsys.readouterr().err


def test_every_narration_tokenizes_without_unk(synth: dict) -> None:
    tok = AutoTokenizer.from_pretrained(synth["tokenizer"], local_files_only=True)
    texts = [n for c in COMBOS for n in narrations_for(*c)] + NOUNS + VERBS
    texts += [
        s["txt"].decode() for split in ("train", "val", "mcq") for s in _samples(synth[split])
    ]
    for text in texts:
        assert tok.unk_token_id not in tok(text)["input_ids"], text

"""Synthetic video captioning set for UniVL: clip features (and optionally mp4 clips) + captions.

Each clip shows one coloured shape doing one action (the shapes, colours, actions and motion
tracks of :mod:`mmpt.synth.video_text`), captioned "a red circle moves left". The feature
variant stands in for frozen S3D features: per frame, a fixed random projection of what a
good extractor sees (colour, shape, position, size, orientation) plus noise, so the verb is
only in the change over frames.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from mmpt.synth.common import check_minimums, split_folders, split_writer
from mmpt.synth.image_text import COLORS, SHAPES
from mmpt.synth.video_render import ClipSpec, pick_codec, plan_track
from mmpt.synth.video_text import COMBOS, NUM_COMBOS, make_video, plan_videos

GENERATOR_NAME = "mmpt.synth.video_caption"
#: Action -> caption phrasings; ``{}`` takes "colour shape". The first is canonical.
CAPTIONS: dict[str, tuple[str, str]] = {
    "move right": ("a {} moves right", "the {} slides to the right"),
    "move left": ("a {} moves left", "the {} slides to the left"),
    "move up": ("a {} moves up", "the {} rises"),
    "move down": ("a {} moves down", "the {} falls"),
    "grow": ("a {} grows", "the {} gets bigger"),
    "shrink": ("a {} shrinks", "the {} gets smaller"),
    "spin clockwise": ("a {} spins clockwise", "the {} turns clockwise"),
    "spin counterclockwise": ("a {} spins counterclockwise", "the {} turns counterclockwise"),
}
SPECIAL_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_RAW_DIM = len(COLORS) + len(SHAPES) + 5  # one-hots, centre x/y, radius, cos/sin of 4 angle
_SPLIT_STREAM = {"train": 31, "val": 32}
_PROJECTION_STREAM = 39
_SCENE_SCALE = 0.3  # per-video nuisance offset (background, camera), as a fraction of signal


def captions_for(color: str, shape: str, action: str) -> list[str]:
    """Both phrasings, e.g. ``["a red circle moves left", "the red circle slides to the left"]``."""
    return [t.format(f"{color} {shape}") for t in CAPTIONS[action]]


def caption_words() -> list[str]:
    """Every word of every caption, sorted, after the BERT special tokens."""
    words = {
        w
        for c in COLORS
        for s in SHAPES
        for a in CAPTIONS
        for text in captions_for(c, s, a)
        for w in text.split()
    }
    return SPECIAL_WORDS + sorted(words)


def frame_states(start: np.ndarray, end: np.ndarray, num_frames: int) -> np.ndarray:
    """(num_frames, 4) centre x, centre y, radius, angle, interpolated as the renderer does."""
    w = np.linspace(0.0, 1.0, num_frames)[:, None]
    return (1 - w) * start[None] + w * end[None]


def clip_features(
    color: str,
    shape: str,
    states: np.ndarray,
    image_size: int,
    projection: np.ndarray,
    scene: np.ndarray,
    noise: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Feature sequence of one clip: (T, D) float32 = (semantics @ projection) + scene + noise.

    The angle enters as cos/sin of 4x the angle (a square looks the same every 90 degrees).
    """
    t = len(states)
    raw = np.zeros((t, _RAW_DIM))
    raw[:, list(COLORS).index(color)] = 1.0
    raw[:, len(COLORS) + SHAPES.index(shape)] = 1.0
    raw[:, -5:-2] = states[:, :3] / image_size * 4.0
    raw[:, -2], raw[:, -1] = np.cos(4 * states[:, 3]), np.sin(4 * states[:, 3])
    out = raw @ projection + scene[None] + noise * rng.standard_normal((t, projection.shape[1]))
    return out.astype(np.float32)


def npy_bytes(arr: np.ndarray) -> bytes:
    """``np.save`` of ``arr`` into bytes (a ``feat.npy`` member)."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def write_text_encoder(path: str | Path, words: list[str], hidden: int = 64, layers: int = 2,
                       heads: int = 4, max_positions: int = 32) -> Path:  # fmt: skip
    """A randomly initialised BERT + word-level ``[CLS] text [SEP]`` tokenizer, saved to ``path``.

    Args:
        path: Output folder (``save_pretrained`` of both).
        words: The vocabulary, starting with :data:`SPECIAL_WORDS`.
        hidden: Hidden size.
        layers: Transformer layers.
        heads: Attention heads.
        max_positions: Position embeddings (the longest tokenized text).

    Returns:
        ``path``; ``HFTextTower(path)`` loads it.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    if words[: len(SPECIAL_WORDS)] != SPECIAL_WORDS:
        raise ValueError(f"words must start with {SPECIAL_WORDS}")
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    specials = {f"{w[1:-1].lower()}_token": w for w in SPECIAL_WORDS}
    path = Path(path)
    PreTrainedTokenizerFast(tokenizer_object=raw, **specials).save_pretrained(str(path))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=len(words), hidden_size=hidden, num_hidden_layers=layers,
            num_attention_heads=heads, intermediate_size=4 * hidden,
            max_position_embeddings=max_positions, pad_token_id=0,
        )  # fmt: skip
        BertModel(config).save_pretrained(str(path))
    return path


def _videos(split: str, count: int, rng: np.random.Generator) -> list[list[tuple[str, str, str]]]:
    """Train: videos of 3-6 clips of one object; val: one clip per video, distinct combos."""
    if split == "train":
        return plan_videos(count, rng)
    order = [COMBOS[i] for i in rng.permutation(NUM_COMBOS)]
    return [[order[i % NUM_COMBOS]] for i in range(count)]


def synth_video_caption(
    out: str | Path,
    train_samples: int = 2000,
    val_samples: int = NUM_COMBOS,
    num_frames: int = 8,
    feature_dim: int = 64,
    noise: float = 0.1,
    raw_clips: bool = False,
    image_size: int = 64,
    fps: int = 8,
    seed: int = 0,
    samples_per_shard: int = 500,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a learnable video captioning set: ``out/{train,val}`` feature shards.

    ``train`` holds whole videos HowTo100M-style (3-6 consecutive clips of one object, each a
    different action): ``feat.npy`` (frames of all clips, ``num_frames`` per clip) and a
    ``json`` with ``segments`` (``start``/``end`` seconds, ``text``) and ``feature_fps``.
    ``val`` holds single clips (``feat.npy``, ``json`` ``captions``: both phrasings) of
    distinct (colour, shape, action) combinations while ``val_samples <= 180`` (chance R@1 =
    1 / val_samples). ``tokenizer/`` gets the word-level tokenizer and a randomly initialised
    tiny BERT over the caption vocabulary. With ``raw_clips`` the same clips are also rendered
    as mp4 into ``out/clips/{train,val}`` (one sample per clip, ``txt`` caption, ``json``
    ``captions``).

    Args:
        out: Output folder.
        train_samples: Training clips (grouped into videos).
        val_samples: Validation clips.
        num_frames: Feature rows (frames) per clip.
        feature_dim: Feature width.
        noise: Standard deviation of the per-frame feature noise.
        raw_clips: Also write the mp4 variant.
        image_size: Frame side of the mp4 clips (even, at least 32).
        fps: Frame rate; ``feature_fps`` of the features.
        seed: Same seed, same features and captions.
        samples_per_shard: Samples per ``.tar`` shard.
        overwrite: Replace shards in the split folders that this generator did not write.

    Returns:
        Dict with the folders (``tokenizer`` too), ``{split}_samples``, ``{split}_shards``
        and ``train_videos``.
    """
    check_minimums({
        "train_samples": (train_samples, 1), "val_samples": (val_samples, 1),
        "num_frames": (num_frames, 2), "feature_dim": (feature_dim, 1), "fps": (fps, 1),
        "image_size": (image_size, 32), "samples_per_shard": (samples_per_shard, 1),
    })  # fmt: skip
    if noise < 0:
        raise ValueError(f"noise must be >= 0 (--noise), got {noise}")
    out = Path(out)
    folders = split_folders(out, _SPLIT_STREAM, overwrite, GENERATOR_NAME)
    clip_folders = (
        split_folders(out / "clips", _SPLIT_STREAM, overwrite, GENERATOR_NAME) if raw_clips else {}
    )
    spec = ClipSpec(image_size, num_frames, fps, pick_codec() if raw_clips else "none")
    projection = np.random.default_rng([seed, _PROJECTION_STREAM]).standard_normal(
        (_RAW_DIM, feature_dim)
    ) / math.sqrt(_RAW_DIM)
    meta = {
        "kind": "video-caption",
        "feature_dim": feature_dim,
        "feature_fps": float(fps),
        "num_frames": num_frames,
        "templates": {a: list(p) for a, p in CAPTIONS.items()},
        "generator": {"name": GENERATOR_NAME, "seed": seed, "noise": noise,
                      "train_samples": train_samples, "val_samples": val_samples},
    }  # fmt: skip
    result: dict[str, Any] = {"out": str(out)}
    for split, folder in folders.items():
        rng = np.random.default_rng([seed, _SPLIT_STREAM[split]])
        videos = _videos(split, train_samples if split == "train" else val_samples, rng)
        extra = {"split": split}
        if split == "val":
            extra["retrieval"] = {"clips": val_samples, "chance_r1": 1 / val_samples}
        count = len(videos) if split == "train" else val_samples
        with split_writer(result, split, folder, count, samples_per_shard,
                          ["video", "text"], meta | extra) as writer:  # fmt: skip
            clips_writer = None
            if raw_clips:
                clips_writer = split_writer(
                    result, f"clips_{split}", clip_folders[split], sum(map(len, videos)),
                    samples_per_shard, ["video", "text"], meta | extra,
                )  # fmt: skip
            with clips_writer or _null() as cw:
                _write_split(writer, cw, split, videos, spec, projection, noise, rng)
        if split == "train":
            result["train_videos"] = len(videos)
    # named tokenizer/ as the other kinds (its presence marks a rendered set)
    result["tokenizer"] = str(write_text_encoder(out / "tokenizer", caption_words()))
    return result


def _null() -> Any:
    import contextlib

    return contextlib.nullcontext(None)


def _write_split(writer, clip_writer, split, videos, spec, projection, noise, rng) -> None:  # noqa: ANN001
    """Features (and mp4 clips when ``clip_writer``) of every video of one split."""
    from mmpt.synth.image_text import make_noise_bank

    bank = make_noise_bank(rng, spec.image_size, 16) if clip_writer is not None else []
    n_clip = 0
    for v, clips in enumerate(videos):
        uid = f"{split}-{v:06d}"
        scene = _SCENE_SCALE * rng.standard_normal(projection.shape[1])
        if clip_writer is not None:
            rendered = make_video(uid, clips, spec, rng, bank, vary_phrasing=False)
            tracks = [
                (np.array([*i["track"]["center"][0], i["track"]["radius"][0],
                           math.radians(i["track"]["angle"][0])]),
                 np.array([*i["track"]["center"][1], i["track"]["radius"][1],
                           math.radians(i["track"]["angle"][1])]))
                for _, i in rendered
            ]  # fmt: skip
        else:
            tracks = [plan_track(s, a, spec.image_size, rng) for _, s, a in clips]
        feats, segments = [], []
        for k, ((color, shape, action), (start, end)) in enumerate(zip(clips, tracks, strict=True)):
            states = frame_states(start, end, spec.num_frames)
            f = clip_features(color, shape, states, spec.image_size, projection, scene, noise, rng)
            captions = captions_for(color, shape, action)
            text = captions[int(rng.integers(len(captions)))] if split == "train" else captions[0]
            feats.append(f)
            segments.append({"start": k * spec.seconds, "end": (k + 1) * spec.seconds,
                             "text": text})  # fmt: skip
            info = {"video_uid": uid, "color": color, "shape": shape, "action": action,
                    "captions": captions, "narration": text}  # fmt: skip
            if clip_writer is not None:
                key = f"{n_clip:09d}"
                clip_writer.write({"__key__": key, "mp4": rendered[k][0], "txt": text,
                                   "json": {"key": key, **info}})  # fmt: skip
            if split != "train":
                key = f"{n_clip:09d}"
                writer.write({"__key__": key, "feat.npy": npy_bytes(f), "json": {"key": key,
                              **info}})  # fmt: skip
            n_clip += 1
        if split == "train":
            writer.write({
                "__key__": f"{v:09d}", "feat.npy": npy_bytes(np.concatenate(feats)),
                "json": {"video_uid": uid, "feature_fps": float(spec.fps), "segments": segments},
            })  # fmt: skip

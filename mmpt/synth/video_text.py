"""Synthetic video-text shards (EgoClip/EgoMCQ-like): a coloured shape doing an action per clip."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmpt.shards.writer import ShardWriter
from mmpt.synth.common import check_minimums, split_folders, split_writer
from mmpt.synth.image_text import (
    _BACKGROUND_GREY,
    _COLOR_JITTER,
    COLORS,
    SHAPES,
    make_noise_bank,
)
from mmpt.synth.video_render import (
    ClipSpec,
    encode_mp4,
    pick_codec,
    plan_track,
    render_clip,
)
from mmpt.synth.vocab import write_synth_tokenizer

GENERATOR_NAME = "mmpt.synth.video_text"
#: Verb (action) -> narration phrasings; ``{}`` takes "colour shape". The first is canonical
#: (val and mcq); train picks either.
ACTIONS: dict[str, tuple[str, str]] = {
    "move right": ("#C C moves the {} to the right", "#C C slides the {} right"),
    "move left": ("#C C moves the {} to the left", "#C C slides the {} left"),
    "move up": ("#C C moves the {} up", "#C C slides the {} upwards"),
    "move down": ("#C C moves the {} down", "#C C slides the {} downwards"),
    "grow": ("#C C makes the {} grow", "#C C enlarges the {}"),
    "shrink": ("#C C makes the {} shrink", "#C C shrinks the {}"),
    "spin clockwise": ("#C C spins the {} clockwise", "#C C turns the {} clockwise"),
    "spin counterclockwise": (
        "#C C spins the {} counterclockwise", "#C C turns the {} anticlockwise"
    ),
}  # fmt: skip
#: EgoNCE tags: nouns are shape names, verbs are action names, so a noun AND verb overlap
#: means the same shape doing the same action (the colour may differ).
NOUNS: list[str] = list(SHAPES)
VERBS: list[str] = list(ACTIONS)
#: EgoMCQ type id -> name, stored explicitly (the reference code swaps the two).
MCQ_TYPES: dict[int, str] = {1: "inter", 2: "intra"}
NUM_CANDIDATES = 5
_SPIN_INVISIBLE = {"circle"}  # a spinning circle looks still


def actions_for(shape: str) -> list[str]:
    """Actions a clip of ``shape`` can show (a circle cannot visibly spin)."""
    return [a for a in ACTIONS if not (shape in _SPIN_INVISIBLE and a.startswith("spin"))]


#: Every (colour, shape, action) a clip can show: 6 x (4 x 8 - 2) = 180; colour slowest.
COMBOS: list[tuple[str, str, str]] = [
    (c, s, a) for c in COLORS for s in SHAPES for a in actions_for(s)
]
NUM_COMBOS = len(COMBOS)
_CLIPS_PER_VIDEO = (3, 6)
_NOISE_TILES = 64
_SPLIT_STREAM = {"train": 21, "val": 22, "mcq": 23}  # apart from the image generators' streams


def narrations_for(color: str, shape: str, action: str) -> list[str]:
    """Both phrasings of a clip's narration, e.g. ``"#C C moves the red circle to the right"``."""
    return [t.format(f"{color} {shape}") for t in ACTIONS[action]]


def plan_videos(num_clips: int, rng: np.random.Generator) -> list[list[tuple[str, str, str]]]:
    """Group clips into videos: one object (colour, shape) each, 3-6 distinct actions.

    Passes over all :data:`COMBOS` are repeated until ``num_clips`` clips, and the last
    video is cut at ``num_clips``; so every combination appears equally often (give or take
    one), and ``num_clips <= NUM_COMBOS`` gives distinct combinations.

    Returns:
        Videos in order, each a list of (colour, shape, action) clips in timeline order.

    """
    lo, hi = _CLIPS_PER_VIDEO
    videos: list[list[tuple[str, str, str]]] = []
    while sum(map(len, videos)) < num_clips:
        one_pass = []
        for color in COLORS:
            for shape in SHAPES:
                actions = list(rng.permutation(actions_for(shape)))
                while actions:  # chunks of lo..hi that leave no remainder below lo
                    n = len(actions)
                    sizes = [k for k in range(lo, min(hi, n) + 1) if n - k == 0 or n - k >= lo]
                    k = int(rng.choice(sizes))
                    one_pass.append([(color, shape, str(a)) for a in actions[:k]])
                    actions = actions[k:]
        videos += [one_pass[i] for i in rng.permutation(len(one_pass))]
    out, left = [], num_clips
    for video in videos:
        if left <= 0:
            break
        out.append(video[:left])
        left -= len(out[-1])
    return out


def make_video(
    video_uid: str,
    clips: list[tuple[str, str, str]],
    spec: ClipSpec,
    rng: np.random.Generator,
    noise_bank: list[Image.Image],
    vary_phrasing: bool = True,
) -> list[tuple[bytes, dict[str, Any]]]:
    """Render one video's consecutive clips: one scene, one object, one action per clip.

    Args:
        video_uid: The video's id; clip ``k`` is ``{video_uid}-{k}``.
        clips: (colour, shape, action) per clip, in timeline order (one colour and shape).
        spec: How clips are rendered and encoded.
        rng: Source of the scene, object colour jitter, tracks, noise and phrasings.
        noise_bank: Tiles from :func:`~mmpt.synth.image_text.make_noise_bank`.
        vary_phrasing: Pick either narration phrasing at random; False takes the first.

    Returns:
        Per clip, the mp4 bytes and its EgoClip-like json (``video_uid``, ``clip_uid``,
        ``clip_start``/``clip_end`` in seconds of the video, ``narration``, ``nouns``,
        ``verbs``, ``noun_ids``, ``verb_ids``, ``fps``, ``num_frames`` ...).

    """
    grey = int(rng.integers(*_BACKGROUND_GREY, endpoint=True))
    color = clips[0][0]
    jitter = rng.integers(-_COLOR_JITTER, _COLOR_JITTER, size=3, endpoint=True)
    fill = tuple(int(v) for v in np.clip(np.array(COLORS[color]) + jitter, 0, 255))
    out = []
    for k, (color, shape, action) in enumerate(clips):
        track = plan_track(shape, action, spec.image_size, rng)
        frames = render_clip(shape, fill, grey, track, spec, rng, noise_bank)
        narrations = narrations_for(color, shape, action)
        narration = (
            narrations[int(rng.integers(len(narrations)))] if vary_phrasing else narrations[0]
        )
        info = {
            "video_uid": video_uid,
            "clip_uid": f"{video_uid}-{k}",
            "clip_index": k,
            "clip_start": round(k * spec.seconds, 6),
            "clip_end": round((k + 1) * spec.seconds, 6),
            "narration": narration,
            "narrations": narrations,
            "nouns": [shape],
            "verbs": [action],
            "noun_ids": [NOUNS.index(shape)],
            "verb_ids": [VERBS.index(action)],
            "color": color,
            "shape": shape,
            "action": action,
            "fps": float(spec.fps),
            "num_frames": spec.num_frames,
            "track": {  # first and last frame, output pixels and degrees
                "center": [[round(float(p[0]), 2), round(float(p[1]), 2)] for p in track],
                "radius": [round(float(p[2]), 2) for p in track],
                "angle": [round(math.degrees(p[3]), 2) for p in track],
            },
        }
        out.append((encode_mp4(frames, spec.fps, spec.codec), info))
    return out


def _write_clips(
    writer: ShardWriter, split: str, count: int, spec: ClipSpec, rng: np.random.Generator
) -> int:
    """Write ``count`` clip samples (``mp4``, ``txt``, ``json``); returns the number of videos."""
    noise_bank = make_noise_bank(rng, spec.image_size, _NOISE_TILES)
    i = 0
    videos = plan_videos(count, rng)
    for v, clips in enumerate(videos):
        for mp4, info in make_video(
            f"{split}-{v:06d}", clips, spec, rng, noise_bank, split == "train"
        ):
            key = f"{i:09d}"
            writer.write(
                {"__key__": key, "mp4": mp4, "txt": info["narration"], "json": {"key": key, **info}}
            )
            i += 1
    return len(videos)


def _write_mcq(writer: ShardWriter, count: int, spec: ClipSpec, rng: np.random.Generator) -> None:
    """Write ``count`` EgoMCQ-like questions, inter (type 1) and intra (type 2) alternating."""
    noise_bank = make_noise_bank(rng, spec.image_size, _NOISE_TILES)
    objects = [(c, s) for c in COLORS for s in SHAPES]
    for q in range(count):
        qtype = 1 if q % 2 == 0 else 2
        uid = f"mcq-{q:06d}"
        if MCQ_TYPES[qtype] == "intra":  # five clips of one video, five different actions
            color, shape = objects[int(rng.integers(len(objects)))]
            actions = rng.choice(actions_for(shape), NUM_CANDIDATES, replace=False)
            clips = make_video(
                uid, [(color, shape, str(a)) for a in actions], spec, rng, noise_bank, False
            )
        else:  # one clip from each of five videos showing five different objects
            clips = []
            for j, o in enumerate(rng.choice(len(objects), NUM_CANDIDATES, replace=False)):
                color, shape = objects[int(o)]
                action = str(rng.choice(actions_for(shape)))
                clips += make_video(
                    f"{uid}-{j}", [(color, shape, action)], spec, rng, noise_bank, False
                )
        answer = int(rng.integers(NUM_CANDIDATES))
        query = clips[answer][1]
        key = f"{q:09d}"
        info = {
            "key": key,
            "query": query["narration"],
            "answer": answer,
            "type": qtype,
            "type_name": MCQ_TYPES[qtype],
            **{
                k: query[k] for k in ("nouns", "verbs", "noun_ids", "verb_ids", "fps", "num_frames")
            },
            "candidates": [info for _, info in clips],
        }
        sample = {"__key__": key, "txt": query["narration"], "json": info}
        writer.write(sample | {f"{j}.mp4": mp4 for j, (mp4, _) in enumerate(clips)})


def synth_video_text(
    out: str | Path,
    train_samples: int = 1200,
    image_size: int = 64,
    num_frames: int = 8,
    fps: int = 8,
    seed: int = 0,
    val_samples: int = NUM_COMBOS,
    mcq_samples: int = 200,
    samples_per_shard: int = 500,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a deterministic, learnable video-text dataset as ``out/{train,val,mcq}``.

    Each clip (``mp4`` + ``txt`` narration + EgoClip-like ``json``) shows one coloured shape
    (image-text colours and shapes) doing one of 8 actions (:data:`ACTIONS`: move right /
    left / up / down, grow, shrink, spin clockwise / counterclockwise; circles do not spin):
    180 (colour, shape, action) combinations. Any frame shows the noun (colour and shape);
    only the change over frames shows the verb. A video holds 3-6 consecutive clips of one
    object in one scene, each a different action. Train draws every combination equally
    often (give or take one) and either phrasing; val holds distinct combinations while
    ``val_samples <= 180`` (default 180: text-to-video chance R@1 = 1/180) in the first
    phrasing. ``mcq`` holds EgoMCQ-like questions (``0.mp4`` ... ``4.mp4``, ``json``
    ``query``/``answer``/``type``), alternating inter-video (type 1: five objects, the noun
    suffices) and intra-video (type 2: five clips of one video, the verb is needed); chance
    is 1/5. ``index.json`` ``meta`` holds ``nouns``, ``verbs`` and ``mcq_types``.

    Clips are yuv420p mp4 (libx264 CRF 23 when PyAV has it, else mpeg4) of
    ``num_frames / fps`` seconds. decord 0.6.0 misreads frames 16, 24, 48 or 72 px wide
    (dmlc/decord#336); PyAV reads every size.

    Args:
        out: Output folder; ``train/``, ``val/``, ``mcq/`` and ``tokenizer/`` (see
            :mod:`mmpt.synth.vocab`) are created inside it.
        train_samples: Number of training clips.
        image_size: Frame side in pixels (even, at least 32).
        num_frames: Frames per clip (at least 4, so spins never alias).
        fps: Frame rate of the clips.
        seed: Same seed (and PyAV build) gives byte-identical shards.
        val_samples: Number of validation clips.
        mcq_samples: Number of multiple-choice questions (five clips each).
        samples_per_shard: Samples per ``.tar`` shard.
        overwrite: Replace shards in the split folders that this generator did not write
            (its own earlier output is always replaced).

    Returns:
        Dict with ``out``, ``train``, ``val``, ``mcq`` and ``tokenizer`` folders,
        ``{split}_samples``, ``{split}_shards``, ``train_videos``, ``val_videos`` and
        ``codec``.

    Raises:
        ValueError: A parameter is out of range, or the output folders hold other shards.

    """
    check_minimums(
        {
            "train_samples": (train_samples, 1),
            "val_samples": (val_samples, 1),
            "mcq_samples": (mcq_samples, 1),
            "image_size": (image_size, 32),
            "num_frames": (num_frames, 4),
            "fps": (fps, 1),
            "samples_per_shard": (samples_per_shard, 1),
        }
    )
    if image_size % 2:
        raise ValueError(f"image_size must be even for yuv420p (--image-size), got {image_size}")
    out = Path(out)
    folders = split_folders(out, _SPLIT_STREAM, overwrite, GENERATOR_NAME)
    spec = ClipSpec(image_size, num_frames, fps, pick_codec())
    counts = {"train": train_samples, "val": val_samples, "mcq": mcq_samples}
    generator = {
        "name": GENERATOR_NAME,
        "seed": seed,
        "codec": spec.codec,
        "samples_per_shard": samples_per_shard,
    }
    meta = {
        "kind": "video-text",
        "nouns": NOUNS,
        "verbs": VERBS,
        "templates": {verb: list(phrasings) for verb, phrasings in ACTIONS.items()},
        "colors": {k: list(v) for k, v in COLORS.items()},
        "mcq_types": {str(k): v for k, v in MCQ_TYPES.items()},
        "num_candidates": NUM_CANDIDATES,
        "image_size": image_size,
        "num_frames": num_frames,
        "fps": float(fps),
        "clip_seconds": spec.seconds,
        "generator": generator | {f"{k}_samples": v for k, v in counts.items()},
    }
    result: dict[str, Any] = {"out": str(out), "codec": spec.codec}
    for split, folder in folders.items():
        rng = np.random.default_rng([seed, _SPLIT_STREAM[split]])
        extra: dict[str, Any] = {"split": split}
        if split == "val":
            distinct = min(val_samples, NUM_COMBOS)
            extra["retrieval"] = {
                "clips": val_samples,
                "distinct_combos": distinct,
                "chance_r1": 1 / val_samples,
            }
        if split == "mcq":
            extra["chance_accuracy"] = 1 / NUM_CANDIDATES
        with split_writer(result, split, folder, counts[split], samples_per_shard,
                          ["video", "text"], meta | extra) as writer:  # fmt: skip
            if split == "mcq":
                _write_mcq(writer, counts[split], spec, rng)
            else:
                result[f"{split}_videos"] = _write_clips(writer, split, counts[split], spec, rng)
    result["tokenizer"] = str(write_synth_tokenizer(out / "tokenizer"))
    return result

"""Synthetic phrase-grounding shards: several shapes per image and referring expressions.

Each image holds ``shapes_per_image`` shapes of distinct colour-shape pairs, two sizes, on a
noisy grey background. Its caption refers to one shape relative to another, e.g. "the small
blue square left of the red circle", with two phrases (character spans): the referent ("the
small blue square") and the anchor ("the red circle"), each naming its box. Learnable from
colour, shape and size words; the relation is always true of the drawn layout.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mmpt.synth.common import check_minimums, split_folders, split_writer
from mmpt.synth.image_text import _shape_points, make_noise_bank
from mmpt.synth.text_encoder import BERT_SPECIALS, write_bert

COLORS = {
    "red": (225, 30, 30),
    "green": (30, 200, 40),
    "blue": (35, 70, 240),
    "yellow": (240, 225, 30),
}
SHAPES = ("circle", "square", "triangle")
#: Radius of each size as a fraction of the image side (before a +-10% jitter).
SIZES = {"small": 0.09, "big": 0.17}
RELATIONS = ("left of", "right of", "above", "below")
WORDS = [*BERT_SPECIALS, "the", *SIZES, *COLORS, *SHAPES, "left", "right", "of", "above", "below"]
GENERATOR_NAME = "mmpt.synth.grounding"
_SUPERSAMPLE = 2


def _relation(target: dict[str, Any], anchor: dict[str, Any]) -> str:
    """Where the target is relative to the anchor, along the larger displacement."""
    dx, dy = target["cx"] - anchor["cx"], target["cy"] - anchor["cy"]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _place(count: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """``count`` non-overlapping shapes with distinct colour-shape pairs (normalised units)."""
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    chosen = rng.choice(len(pairs), size=count, replace=False)
    while True:  # rejection sampling; a few tries at these sizes
        objs = []
        for i in chosen:
            size = list(SIZES)[int(rng.integers(len(SIZES)))]
            r = SIZES[size] * float(rng.uniform(0.9, 1.1))
            cx, cy = (float(v) for v in rng.uniform(r + 0.02, 1 - r - 0.02, size=2))
            objs.append({"color": pairs[i][0], "shape": pairs[i][1], "size": size, "r": r})
            objs[-1] |= {"cx": cx, "cy": cy}
        if all(
            math.dist((a["cx"], a["cy"]), (b["cx"], b["cy"])) > a["r"] + b["r"] + 0.03
            for j, a in enumerate(objs)
            for b in objs[j + 1 :]
        ):
            return objs


def render(
    objs: list[dict[str, Any]], size: int, noise: Image.Image, rng: np.random.Generator
) -> tuple[bytes, list[list[float]]]:
    """Draw the shapes on a noisy background.

    Returns:
        JPEG bytes and each shape's normalised ``[x0, y0, x1, y1]`` box.

    """
    big = size * _SUPERSAMPLE
    grey = int(rng.integers(40, 100))
    canvas = Image.new("RGB", (big, big), (grey, grey, grey))
    draw = ImageDraw.Draw(canvas)
    boxes = []
    for o in objs:
        cx, cy, r = o["cx"] * big, o["cy"] * big, o["r"] * big
        color = COLORS[o["color"]]
        if o["shape"] == "circle":
            pts = [
                (cx + r * math.cos(a), cy + r * math.sin(a))
                for a in np.linspace(0, 2 * math.pi, 32)
            ]
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        else:
            angle = math.radians(float(rng.uniform(-15, 15)))
            pts = [(cx + x, cy + y) for x, y in _shape_points(o["shape"], r, angle)]
            draw.polygon(pts, fill=color)
        xs, ys = [p[0] / big for p in pts], [p[1] / big for p in pts]
        boxes.append([max(min(xs), 0.0), max(min(ys), 0.0), min(max(xs), 1.0), min(max(ys), 1.0)])
    image = canvas.resize((size, size), Image.BILINEAR)
    image = Image.blend(image, noise, 0.15)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=92)
    return buf.getvalue(), [[round(v, 4) for v in b] for b in boxes]


def expression(objs: list[dict[str, Any]], rng: np.random.Generator) -> dict[str, Any]:
    """A referring expression for one shape, with its two phrases as character spans."""
    t, a = (int(i) for i in rng.choice(len(objs), size=2, replace=False))
    target, anchor = objs[t], objs[a]
    head = f"the {target['size']} {target['color']} {target['shape']}"
    tail = f"the {anchor['color']} {anchor['shape']}"
    caption = f"{head} {_relation(target, anchor)} {tail}"
    start = len(caption) - len(tail)
    phrases = [
        {"spans": [[0, len(head)]], "boxes": [t]},
        {"spans": [[start, len(caption)]], "boxes": [a]},
    ]
    return {"caption": caption, "phrases": phrases, "referent": t}


def synth_grounding(
    out: str | Path,
    train_samples: int = 3000,
    val_samples: int = 300,
    image_size: int = 64,
    shapes_per_image: int = 3,
    seed: int = 0,
    samples_per_shard: int = 1000,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``out/train``, ``out/val`` grounding shards and ``out/text_encoder``.

    ``text_encoder`` is a randomly initialised 4-layer BERT (width 64) with a word-level
    tokenizer over the captions' words, so the grounding quickstart runs offline
    (``--model.text.path data/grounding/text_encoder``).

    Args:
        out: Output folder.
        train_samples: Training images.
        val_samples: Held-out images (own random stream).
        image_size: Image side in pixels.
        shapes_per_image: Shapes per image (2 to 12).
        seed: Seed of everything.
        samples_per_shard: Samples per shard.
        overwrite: Replace a previous set in ``out``.

    Returns:
        Folders and counts of each split, and the text encoder's folder.

    """
    check_minimums({"train_samples": (train_samples, 1), "val_samples": (val_samples, 1)})
    check_minimums({"image_size": (image_size, 32), "shapes_per_image": (shapes_per_image, 2)})
    if shapes_per_image > len(COLORS) * len(SHAPES):
        raise ValueError(f"shapes_per_image must be <= {len(COLORS) * len(SHAPES)}")
    out = Path(out)
    folders = split_folders(out, ("train", "val"), overwrite, GENERATOR_NAME)
    generator = {"name": GENERATOR_NAME, "seed": seed, "shapes_per_image": shapes_per_image}
    meta = {"generator": generator, "kind": "grounding", "image_size": image_size}
    result: dict[str, Any] = {}
    for stream, (split, count) in enumerate((("train", train_samples), ("val", val_samples))):
        rng = np.random.default_rng([seed, stream])
        noise = make_noise_bank(rng, image_size, count=16)
        with split_writer(
            result, split, folders[split], count, samples_per_shard, ["image", "text"], meta
        ) as writer:
            for i in range(count):
                objs = _place(shapes_per_image, rng)
                jpg, boxes = render(objs, image_size, noise[i % len(noise)], rng)
                info = expression(objs, rng) | {"boxes": boxes, "key": f"{i:09d}"}
                writer.write(
                    {"__key__": f"{i:09d}", "jpg": jpg, "txt": info["caption"], "json": info}
                )
    encoder = write_bert(
        out / "text_encoder", WORDS, hidden_size=64, layers=4, heads=4, max_positions=32, seed=seed
    )
    return result | {"text_encoder": str(encoder)}

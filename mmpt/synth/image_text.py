"""Synthetic image-text shards: coloured shapes with attribute captions, small and learnable."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from mmpt.shards.writer import ShardWriter
from mmpt.synth.common import check_minimums, split_folders
from mmpt.synth.vocab import write_synth_tokenizer

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 200, 40),
    "blue": (35, 70, 240),
    "yellow": (240, 225, 30),
    "magenta": (225, 40, 225),
    "cyan": (30, 220, 230),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
SIZE_SYNONYMS = {"small": "little", "large": "big"}
TEMPLATES = [
    "a photo of a {}.",
    "a drawing of a {}.",
    "a {} on a plain background.",
    "a rendering of a {}.",
]
CLASSNAMES = [f"{c} {s}" for c in COLORS for s in SHAPES]
GENERATOR_NAME = "mmpt.synth.image_text"
NUM_COMBOS = len(COLORS) * len(SHAPES) * len(SIZES) * len(POSITIONS)

# Shape extent (diameter of the circumscribed circle) as a fraction of the quadrant side,
# before the +-15% jitter: small spans 0.36-0.48, large 0.70-0.94, so they never overlap.
# Per-shape factors bring the areas closer (a triangle covers 41% of its circumscribed
# circle, a square 64%), so that even across shapes every large one covers more pixels than
# any small one.
_SIZE_FRACTION = {"small": 0.42, "large": 0.82}
_SHAPE_SCALE = {"circle": 0.85, "square": 1.0, "triangle": 1.15, "cross": 1.0}
_SIZE_JITTER = 0.15
_MAX_ROTATION_DEG = 15.0
_COLOR_JITTER = 10
_BACKGROUND_GREY = (25, 110)
_NOISE_STD = 4.0
_NOISE_OFFSET = 128
_SUPERSAMPLE = 2
_SPLIT_STREAM = {"train": 1, "val": 2}  # separate random streams: val jitter differs from train
#: Visual domains: "plain" (grey background, true colours); "shifted" (light diagonal stripes,
#: and every colour word drawn in the next colour of the palette: a new domain whose colour
#: grounding conflicts with the plain one, to measure forgetting in continual pretraining).
DOMAINS = ("plain", "shifted")
_STRIPE = (170, 230)  # light stripe tones of the shifted background
_STRIPE_PERIOD = 6  # output pixels


def combo_attributes(combo: int) -> dict[str, Any]:
    """Attributes of one of the 192 colour/shape/size/position combinations.

    Args:
        combo: Combination id in ``[0, 192)``; colour varies slowest, position fastest.

    Returns:
        Dict with ``color``, ``shape``, ``size``, ``position`` and the class ``label``
        (colour * 4 + shape, indexing :data:`CLASSNAMES`).

    """
    if not 0 <= combo < NUM_COMBOS:
        raise ValueError(f"combo must be in [0, {NUM_COMBOS}), got {combo}")
    rest, p = divmod(combo, len(POSITIONS))
    rest, z = divmod(rest, len(SIZES))
    c, s = divmod(rest, len(SHAPES))
    color = list(COLORS)[c]
    return {
        "color": color,
        "shape": SHAPES[s],
        "size": SIZES[z],
        "position": POSITIONS[p],
        "label": c * len(SHAPES) + s,
    }


def captions_for(attrs: dict[str, Any]) -> list[str]:
    """Build the two phrasings of a sample's caption; both name every attribute.

    Example:
        >>> captions_for({"color": "red", "shape": "circle", "size": "large",
        ...               "position": "top left"})
        ['a large red circle in the top left', 'top left: a big red circle']

    """
    color, shape, size, pos = attrs["color"], attrs["shape"], attrs["size"], attrs["position"]
    return [
        f"a {size} {color} {shape} in the {pos}",
        f"{pos}: a {SIZE_SYNONYMS[size]} {color} {shape}",
    ]


def _shape_points(shape: str, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices of ``shape`` inscribed in a circle of radius ``r`` about the origin."""
    if shape == "square":
        local = [(math.cos(a), math.sin(a)) for a in np.deg2rad([45, 135, 225, 315])]
    elif shape == "triangle":
        local = [(math.cos(a), math.sin(a)) for a in np.deg2rad([-90, 30, 150])]
    elif shape == "cross":
        a, b = 0.944, 0.33  # arm half-length and half-width; corners stay inside radius 1
        local = [
            (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a),
            (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b), (-b, -a),
        ]  # fmt: skip
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    cos, sin = math.cos(angle), math.sin(angle)
    return [(r * (x * cos - y * sin), r * (x * sin + y * cos)) for x, y in local]


def make_noise_bank(
    rng: np.random.Generator, image_size: int, count: int = 64
) -> list[Image.Image]:
    """Draw ``count`` light Gaussian noise tiles, reused across samples to keep rendering fast.

    Returns:
        RGB images (image_size, image_size) holding the noise plus 128 (``_NOISE_OFFSET``).

    """
    noise = rng.normal(_NOISE_OFFSET, _NOISE_STD, size=(count, image_size, image_size, 3))
    tiles = np.clip(np.rint(noise), 0, 255).astype(np.uint8)
    return [Image.fromarray(t) for t in tiles]


def _place(lo: float, hi: float, rng: np.random.Generator) -> float:
    """Uniform in [lo, hi]; the middle when the shape is wider than the room it has."""
    return float(rng.uniform(lo, hi)) if hi > lo else (lo + hi) / 2


def render_sample(
    attrs: dict[str, Any],
    image_size: int,
    rng: np.random.Generator,
    noise_bank: list[Image.Image] | None = None,
    domain: str = "plain",
) -> bytes:
    """Draw one jittered shape on a noisy background and encode it as JPEG.

    Args:
        attrs: Output of :func:`combo_attributes`.
        image_size: Output side in pixels (square image).
        rng: Source of all jitter (position, size, rotation, colours, background, noise).
        noise_bank: Noise tiles from :func:`make_noise_bank`; one is picked at random. None
            draws a fresh tile.
        domain: ``plain`` (grey background) or ``shifted`` (striped background, colours drawn
            as the next colour of :data:`COLORS`), see :data:`DOMAINS`.

    Returns:
        JPEG bytes (quality 95) of an RGB image (image_size, image_size).

    """
    big = image_size * _SUPERSAMPLE
    quad = big / 2
    grey = int(rng.integers(*_BACKGROUND_GREY, endpoint=True))
    canvas = Image.new("RGB", (big, big), (grey, grey, grey))
    color = attrs["color"]
    if domain == "shifted":
        canvas = _stripes(big, int(rng.integers(2)))
        names = list(COLORS)
        color = names[(names.index(color) + 1) % len(names)]
    scale = _SIZE_FRACTION[attrs["size"]] * rng.uniform(1 - _SIZE_JITTER, 1 + _SIZE_JITTER)
    shape = attrs["shape"]
    r = scale * quad / 2 * _SHAPE_SCALE[shape]
    if shape == "circle":
        points = [(-r, -r), (r, r)]  # the bounding box is all placement needs
    else:
        angle = math.radians(rng.uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG))
        points = _shape_points(shape, r, angle)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    row, col = divmod(POSITIONS.index(attrs["position"]), 2)
    margin = _SUPERSAMPLE  # one output pixel between the shape and the quadrant's edges
    cx = _place(col * quad + margin - min(xs), (col + 1) * quad - margin - max(xs), rng)
    cy = _place(row * quad + margin - min(ys), (row + 1) * quad - margin - max(ys), rng)
    jitter = rng.integers(-_COLOR_JITTER, _COLOR_JITTER, size=3, endpoint=True).tolist()
    fill = tuple(min(255, max(0, c + j)) for c, j in zip(COLORS[color], jitter, strict=True))
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx + x, cy + y) for x, y in points], fill=fill)
    if noise_bank is None:
        noise_bank = make_noise_bank(rng, image_size, count=1)
    noise = noise_bank[int(rng.integers(len(noise_bank)))]
    image = ImageChops.add(canvas.reduce(_SUPERSAMPLE), noise, offset=-_NOISE_OFFSET)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _stripes(size: int, flip: int) -> Image.Image:
    """Light diagonal stripes (the ``shifted`` domain's background), (size, size) RGB."""
    yy, xx = np.mgrid[:size, :size]
    diagonal = (xx - yy) if flip else (xx + yy)
    band = (diagonal // (_STRIPE_PERIOD * _SUPERSAMPLE)) % 2
    tone = np.where(band == 0, _STRIPE[0], _STRIPE[1]).astype(np.uint8)
    return Image.fromarray(np.repeat(tone[..., None], 3, axis=2))


def _write_split(
    folder: Path,
    split: str,
    combos: np.ndarray,
    image_size: int,
    rng: np.random.Generator,
    samples_per_shard: int,
    meta: dict[str, Any],
    domain: str = "plain",
) -> int:
    meta = {**meta, "split": split}
    noise_bank = make_noise_bank(rng, image_size)
    writer = ShardWriter(
        folder, samples_per_shard=samples_per_shard, modalities=["image", "text"], meta=meta
    )
    with writer:
        for i, combo in enumerate(combos):
            attrs = combo_attributes(int(combo))
            captions = captions_for(attrs)
            caption = captions[int(rng.integers(2))] if split == "train" else captions[0]
            jpg = render_sample(attrs, image_size, rng, noise_bank, domain)
            key = f"{i:09d}"
            info = {"key": key, "caption": caption, "captions": captions, **attrs}
            writer.write({"__key__": key, "jpg": jpg, "txt": caption, "json": info})
    return len(writer.index.shards)


def synth_image_text(
    out: str | Path,
    train_samples: int = 6000,
    image_size: int = 64,
    seed: int = 0,
    samples_per_shard: int = 1000,
    overwrite: bool = False,
    domain: str = "plain",
) -> dict[str, Any]:
    """Write a deterministic, learnable image-text dataset as ``out/train`` and ``out/val``.

    Each sample is one coloured shape (6 colours x 4 shapes x 2 sizes x 4 positions = 192
    combinations) on a noisy grey background, with two caption phrasings that name every
    attribute. Train draws combinations evenly (each appears ``train_samples / 192`` times,
    give or take one) in a seeded random order and picks one phrasing per sample; val holds
    each combination exactly once (retrieval chance R@1 = 1/192) with its own jitter. The
    class label is colour + shape (24 classes); class names and prompt templates for
    zero-shot classification are stored in both splits' ``index.json`` ``meta``.

    Args:
        out: Output folder; ``train/``, ``val/`` and ``tokenizer/`` (a word-level tokenizer
            covering every caption and prompt word, see :mod:`mmpt.synth.vocab`) are created
            inside it.
        train_samples: Number of training samples.
        image_size: Side of the square images in pixels (at least 16).
        seed: Same seed gives byte-identical shards.
        samples_per_shard: Samples per ``.tar`` shard.
        overwrite: Replace shards in ``out/train`` / ``out/val`` that this generator did not
            write (its own earlier output is always replaced).
        domain: Visual domain (:data:`DOMAINS`): ``plain``, or ``shifted`` (striped
            backgrounds, each colour word drawn in the next palette colour; the same captions).

    Returns:
        Dict with ``out``, ``train``, ``val`` and ``tokenizer`` folders, ``train_samples``,
        ``val_samples``, ``train_shards``, ``val_shards`` and ``num_classes``.

    Raises:
        ValueError: A parameter is out of range, or the output folders hold other shards.

    """
    check_minimums(
        {
            "train_samples": (train_samples, 1),
            "image_size": (image_size, 16),
            "samples_per_shard": (samples_per_shard, 1),
        }
    )
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    out = Path(out)
    folders = split_folders(out, ("train", "val"), overwrite, GENERATOR_NAME)
    generator = {
        "name": GENERATOR_NAME,
        "domain": domain,
        "seed": seed,
        "image_size": image_size,
        "train_samples": train_samples,
        "val_samples": NUM_COMBOS,
        "samples_per_shard": samples_per_shard,
        "colors": {k: list(v) for k, v in COLORS.items()},
        "shapes": list(SHAPES),
        "sizes": list(SIZES),
        "positions": list(POSITIONS),
    }
    meta = {
        "kind": "image-text",
        "zeroshot": {"classnames": list(CLASSNAMES), "templates": list(TEMPLATES)},
        "generator": generator,
    }
    counts = {"train": train_samples, "val": NUM_COMBOS}
    shards = {}
    for split, folder in folders.items():
        rng = np.random.default_rng([seed, _SPLIT_STREAM[split]])
        combos = np.arange(counts[split]) % NUM_COMBOS
        if split == "train":
            combos = rng.permutation(combos)
        shards[split] = _write_split(
            folder, split, combos, image_size, rng, samples_per_shard, meta, domain
        )
    return {
        "out": str(out),
        "train": str(folders["train"]),
        "val": str(folders["val"]),
        "train_samples": counts["train"],
        "val_samples": counts["val"],
        "train_shards": shards["train"],
        "val_shards": shards["val"],
        "num_classes": len(CLASSNAMES),
        "tokenizer": str(write_synth_tokenizer(out / "tokenizer")),
    }


def synth_image_text_shifted(
    out: str | Path,
    train_samples: int = 6000,
    image_size: int = 64,
    seed: int = 0,
    samples_per_shard: int = 1000,
    overwrite: bool = False,
) -> dict[str, Any]:
    """:func:`synth_image_text` in the ``shifted`` domain (``--kind image-text-shifted``).

    The same captions and classes, striped backgrounds, and each colour word drawn in the
    next palette colour. Same arguments and return value.
    """
    return synth_image_text(
        out, train_samples, image_size, seed, samples_per_shard, overwrite, domain="shifted"
    )

"""Synthetic interleaved image-text documents (OBELICS/MMC4-like): shapes, each then its caption."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmpt.shards.writer import ShardWriter
from mmpt.synth.common import check_minimums, split_folders
from mmpt.synth.image_text import (
    NUM_COMBOS,
    captions_for,
    combo_attributes,
    make_noise_bank,
    render_sample,
)
from mmpt.synth.vocab import write_synth_tokenizer

if TYPE_CHECKING:
    from PIL import Image

GENERATOR_NAME = "mmpt.synth.interleaved"
#: First text segment of every document.
INTRO_SENTENCES = (
    "here are some shapes.",
    "a page of pictures.",
    "look at these shapes.",
    "some shapes on a grey background.",
)
#: Optional text segments between one image's caption and the next image.
FILLER_SENTENCES = (
    "next picture.",
    "here is another one.",
    "and one more.",
    "the next shape follows.",
)
_FILLER_PROB = 0.5
_SPLIT_STREAM = {"train": 11, "val": 12}  # apart from image-text's streams; val differs from train


def make_document(
    key: str,
    combos: np.ndarray,
    image_size: int,
    rng: np.random.Generator,
    noise_bank: list[Image.Image] | None = None,
    vary_phrasing: bool = True,
) -> dict[str, Any]:
    """Render one document: an intro, then per image the image and its caption, fillers between.

    Args:
        key: Sample key (``__key__``, also stored in the json).
        combos: (N,) combination ids of the N images, in document order.
        image_size: Side of the square images in pixels.
        rng: Source of the sentences, phrasings and all rendering jitter.
        noise_bank: Noise tiles from :func:`~mmpt.synth.image_text.make_noise_bank`.
        vary_phrasing: Pick either caption phrasing at random; False always takes the first.

    Returns:
        Shard sample: ``__key__``, members ``"0.jpg"`` ... ``"{N-1}.jpg"`` (JPEG bytes) and
        ``json`` = ``{"texts", "images", "key", "objects"}``, where ``texts`` and ``images``
        are parallel lists with exactly one non-null entry per position.

    """
    texts: list[str | None] = [INTRO_SENTENCES[int(rng.integers(len(INTRO_SENTENCES)))]]
    images: list[str | None] = [None]
    objects = []
    sample: dict[str, Any] = {"__key__": key}
    for i, combo in enumerate(combos):
        if i > 0 and rng.random() < _FILLER_PROB:
            texts.append(FILLER_SENTENCES[int(rng.integers(len(FILLER_SENTENCES)))])
            images.append(None)
        attrs = combo_attributes(int(combo))
        captions = captions_for(attrs)
        caption = captions[int(rng.integers(len(captions)))] if vary_phrasing else captions[0]
        member = f"{i}.jpg"
        sample[member] = render_sample(attrs, image_size, rng, noise_bank)
        texts += [None, caption]
        images += [member, None]
        objects.append(attrs)
    sample["json"] = {"texts": texts, "images": images, "key": key, "objects": objects}
    return sample


def text_only(doc: dict[str, Any]) -> dict[str, Any]:
    """The document without its images: ``txt`` = its text segments joined by spaces."""
    text = " ".join(t for t in doc["json"]["texts"] if t)
    return {"__key__": doc["__key__"], "txt": text, "json": {"text": text, "key": doc["__key__"]}}


def _write_split(
    folder: Path,
    split: str,
    num_docs: int,
    options: dict[str, Any],
    rng: np.random.Generator,
    meta: dict[str, Any],
) -> tuple[int, int]:
    """Write one split's documents; returns (shards, images)."""
    noise_bank = make_noise_bank(rng, options["image_size"])
    counts = rng.integers(
        options["min_images"], options["max_images"], size=num_docs, endpoint=True
    )
    # every combination appears equally often (give or take one) over the split's images
    combos = rng.permutation(np.arange(int(counts.sum())) % NUM_COMBOS)
    starts = np.concatenate([[0], np.cumsum(counts)])
    writer = ShardWriter(
        folder,
        samples_per_shard=options["samples_per_shard"],
        modalities=["text"] if options.get("text_only") else ["image", "text"],
        meta={**meta, "split": split},
    )
    with writer:
        for i in range(num_docs):
            doc_combos = combos[starts[i] : starts[i + 1]]
            doc = make_document(
                f"{i:09d}",
                doc_combos,
                options["image_size"],
                rng,
                noise_bank,
                vary_phrasing=split == "train",
            )
            writer.write(text_only(doc) if options.get("text_only") else doc)
    return len(writer.index.shards), int(counts.sum())


def synth_interleaved(
    out: str | Path,
    train_samples: int = 2000,
    image_size: int = 64,
    seed: int = 0,
    samples_per_shard: int = 500,
    min_images: int = 1,
    max_images: int = 4,
    val_samples: int = 192,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write deterministic interleaved documents as ``out/train``, ``out/val``, ``out/tokenizer``.

    A document opens with an intro sentence, then holds ``min_images`` to ``max_images``
    shape images (see :mod:`mmpt.synth.image_text`), each directly followed by one of its
    captions, with an optional filler sentence before each image after the first. Captions
    name colour, shape, size and position, which only the image preceding them shows, so
    predicting them needs the images. Over a split, every one of the 192 combinations
    appears equally often (give or take one). Train picks either caption phrasing; val
    (its own random stream) always the first. ``out/tokenizer`` covers every word.

    Args:
        out: Output folder; ``train/``, ``val/`` and ``tokenizer/`` are created inside it.
        train_samples: Number of training documents.
        image_size: Side of the square images in pixels (at least 16).
        seed: Same seed gives byte-identical shards.
        samples_per_shard: Documents per ``.tar`` shard.
        min_images: Fewest images in a document (at least 1).
        max_images: Most images in a document (at least ``min_images``).
        val_samples: Number of validation documents.
        overwrite: Replace shards in ``out/train`` / ``out/val`` that this generator did not
            write (its own earlier output is always replaced).

    Returns:
        Dict with ``out``, ``train``, ``val`` and ``tokenizer`` folders, ``train_samples``,
        ``val_samples``, ``train_shards``, ``val_shards``, ``train_images`` and
        ``val_images``.

    Raises:
        ValueError: A parameter is out of range, or the output folders hold other shards.

    """
    return _synth(
        out,
        train_samples,
        image_size,
        seed,
        samples_per_shard,
        min_images,
        max_images,
        val_samples,
        overwrite,
    )


def _synth(
    out: str | Path,
    train_samples: int,
    image_size: int,
    seed: int,
    samples_per_shard: int,
    min_images: int,
    max_images: int,
    val_samples: int,
    overwrite: bool,
    text_only: bool = False,
) -> dict[str, Any]:
    checks = {
        "train_samples": (train_samples, 1),
        "val_samples": (val_samples, 1),
        "image_size": (image_size, 16),
        "samples_per_shard": (samples_per_shard, 1),
        "min_images": (min_images, 1),
        "max_images": (max_images, min_images),
    }
    check_minimums(checks)
    out = Path(out)
    folders = split_folders(out, ("train", "val"), overwrite, GENERATOR_NAME)
    options = {
        "seed": seed,
        "image_size": image_size,
        "train_samples": train_samples,
        "val_samples": val_samples,
        "samples_per_shard": samples_per_shard,
        "min_images": min_images,
        "max_images": max_images,
        "text_only": text_only,
    }
    kind = "text" if text_only else "interleaved"
    meta = {"kind": kind, "generator": {"name": GENERATOR_NAME, **options}}
    counts = {"train": train_samples, "val": val_samples}
    result: dict[str, Any] = {"out": str(out), **{k: str(v) for k, v in folders.items()}}
    for split, folder in folders.items():
        rng = np.random.default_rng([seed, _SPLIT_STREAM[split]])
        shards, images = _write_split(folder, split, counts[split], options, rng, meta)
        result |= {
            f"{split}_samples": counts[split],
            f"{split}_shards": shards,
            f"{split}_images": images,
        }
    result["tokenizer"] = str(write_synth_tokenizer(out / "tokenizer"))
    return result


def synth_text(
    out: str | Path,
    train_samples: int = 2000,
    seed: int = 0,
    samples_per_shard: int = 500,
    val_samples: int = 192,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Text-only documents (the interleaved documents without their images) for re-blending.

    VILA's stage 3 mixes text-only data into SFT so the LLM keeps its language skills. Each
    sample has ``txt`` (and ``json`` ``{"text", "key"}``); the captions name shapes that no
    image shows, so this data teaches the language, not the grounding.

    Args:
        out: Output folder; ``train/``, ``val/`` and ``tokenizer/`` are created inside it.
        train_samples: Number of training documents.
        seed: Same seed gives byte-identical shards.
        samples_per_shard: Documents per ``.tar`` shard.
        val_samples: Number of validation documents.
        overwrite: As for :func:`synth_interleaved`.

    Returns:
        As :func:`synth_interleaved` (image counts are of the dropped images).
    """
    return _synth(
        out,
        train_samples,
        16,
        seed,
        samples_per_shard,
        1,
        4,
        val_samples,
        overwrite,
        text_only=True,
    )

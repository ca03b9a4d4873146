"""Synthetic image-text shards: determinism, coverage, captions, legibility at 32 px."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from mmpt.shards import load_index
from mmpt.synth.image_text import (
    CLASSNAMES,
    COLORS,
    NUM_COMBOS,
    POSITIONS,
    SHAPES,
    SIZES,
    synth_image_text,
)

CAPTION_1 = re.compile(
    r"a (small|large) (\w+) (\w+) in the (top left|top right|bottom left|bottom right)"
)
CAPTION_2 = re.compile(r"(top left|top right|bottom left|bottom right): a (little|big) (\w+) (\w+)")


def _samples(folder: Path) -> list[dict]:
    """Every sample of a shard folder, read with a plain webdataset pipeline."""
    urls = [str(folder / s.name) for s in load_index(folder).shards]
    out = []
    for s in wds.WebDataset(urls, shardshuffle=False):
        info = json.loads(s["json"])
        out.append({"tar_key": s["__key__"], "jpg": s["jpg"], "txt": s["txt"].decode(), **info})
    return out


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("shapes")
    return synth_image_text(out, train_samples=50, image_size=64, seed=3, samples_per_shard=20)


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    a = synth_image_text(tmp_path / "a", train_samples=30, samples_per_shard=16, seed=7)
    b = synth_image_text(tmp_path / "b", train_samples=30, samples_per_shard=16, seed=7)
    c = synth_image_text(tmp_path / "c", train_samples=30, samples_per_shard=16, seed=8)
    for split in ("train", "val"):
        names = sorted(p.name for p in Path(a[split]).iterdir())
        assert names == sorted(p.name for p in Path(b[split]).iterdir())
        assert len([n for n in names if n.endswith(".tar")]) == (2 if split == "train" else 12)
        for name in names:
            assert (Path(a[split]) / name).read_bytes() == (Path(b[split]) / name).read_bytes()
    tars = sorted(Path(a["train"]).glob("*.tar"))
    assert tars[0].read_bytes() != (Path(c["train"]) / tars[0].name).read_bytes()


def test_counts_and_index_meta(synth: dict) -> None:
    assert synth["train_samples"] == 50 and synth["val_samples"] == NUM_COMBOS == 192
    assert synth["train_shards"] == 3 and synth["num_classes"] == 24
    for split in ("train", "val"):
        index = load_index(synth[split])
        assert index.num_samples == synth[f"{split}_samples"]
        assert index.modalities == ["image", "text"]
        assert index.keys == ["jpg", "json", "txt"]
        assert index.meta["kind"] == "image-text"
        zs = index.meta["zeroshot"]
        assert zs["classnames"] == CLASSNAMES and len(zs["classnames"]) == 24
        assert len(zs["templates"]) == 4 and all("{}" in t for t in zs["templates"])
        assert index.meta["generator"]["seed"] == 3


def test_val_holds_every_combination_exactly_once(synth: dict) -> None:
    samples = _samples(Path(synth["val"]))
    combos = {(s["color"], s["shape"], s["size"], s["position"]) for s in samples}
    assert len(samples) == len(combos) == 192
    assert [s["key"] for s in samples] == [f"{i:09d}" for i in range(192)]


def test_round_trip_and_captions_match_attributes(synth: dict) -> None:
    samples = _samples(Path(synth["train"])) + _samples(Path(synth["val"]))
    assert len(samples) == 50 + 192
    for s in samples:
        assert re.fullmatch(r"\d{9}", s["key"]) and s["key"] == s["tar_key"]
        image = Image.open(io.BytesIO(s["jpg"]))
        assert image.format == "JPEG" and image.size == (64, 64) and image.mode == "RGB"
        assert s["txt"] == s["caption"] and s["txt"] in s["captions"] and len(s["captions"]) == 2
        size, color, shape, pos = CAPTION_1.fullmatch(s["captions"][0]).groups()
        assert (size, color, shape, pos) == (s["size"], s["color"], s["shape"], s["position"])
        pos2, size2, color2, shape2 = CAPTION_2.fullmatch(s["captions"][1]).groups()
        assert (pos2, color2, shape2) == (pos, color, shape)
        assert {"little": "small", "big": "large"}[size2] == size
        assert CLASSNAMES[s["label"]] == f"{color} {shape}"
    train_txt = {s["txt"] == s["captions"][1] for s in samples[:50]}
    assert train_txt == {True, False}  # train picks either phrasing


def _foreground(image: Image.Image) -> np.ndarray:
    """Mask of saturated (non-grey) pixels."""
    px = np.asarray(image.convert("RGB"), dtype=np.int16)
    return (px.max(axis=2) - px.min(axis=2)) > 60


def test_attributes_are_legible_at_32px(synth: dict) -> None:
    areas: dict[str, list[int]] = {s: [] for s in SIZES}
    for s in _samples(Path(synth["val"])):
        small = Image.open(io.BytesIO(s["jpg"])).convert("RGB").resize((32, 32), Image.BICUBIC)
        mask = _foreground(small)
        areas[s["size"]].append(int(mask.sum()))
        mean = np.asarray(small, dtype=np.float32)[mask].mean(axis=0)
        nearest = min(COLORS, key=lambda c: float(np.sum((np.array(COLORS[c]) - mean) ** 2)))
        assert nearest == s["color"], s["caption"]
        ys, xs = np.nonzero(mask)
        row, col = divmod(POSITIONS.index(s["position"]), 2)
        assert (ys.mean() >= 16) == bool(row) and (xs.mean() >= 16) == bool(col), s["caption"]
    assert max(areas["small"]) < min(areas["large"])


def test_shapes_cover_all_four(synth: dict) -> None:
    seen = {s["shape"] for s in _samples(Path(synth["train"]))}
    assert seen == set(SHAPES)


def test_rerun_replaces_own_output_but_not_foreign_shards(tmp_path: Path) -> None:
    synth_image_text(tmp_path, train_samples=20, samples_per_shard=5)
    result = synth_image_text(tmp_path, train_samples=10, samples_per_shard=5)
    assert len(list(Path(result["train"]).glob("*.tar"))) == 2  # old shards 3-4 are gone
    foreign = tmp_path / "other"
    (foreign / "train").mkdir(parents=True)
    (foreign / "train" / "mine.tar").write_bytes(b"x")
    with pytest.raises(ValueError, match="overwrite"):
        synth_image_text(foreign, train_samples=10)
    assert (foreign / "train" / "mine.tar").exists()


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [({"train_samples": 0}, "--train-samples"), ({"image_size": 8}, "--image-size")],
)
def test_bad_parameters_name_the_flag(tmp_path: Path, kwargs: dict, flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        synth_image_text(tmp_path, **kwargs)


def test_tokenizer_written_deterministically_and_covers_captions(
    synth: dict, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    from mmpt.synth.vocab import write_synth_tokenizer

    folder = Path(synth["tokenizer"])
    assert folder == Path(synth["out"]) / "tokenizer"
    again = write_synth_tokenizer(tmp_path / "tok")
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(p.name for p in again.iterdir()) and "tokenizer.json" in names
    assert all((folder / n).read_bytes() == (again / n).read_bytes() for n in names)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    for s in _samples(Path(synth["val"]))[:20]:
        ids = tok(s["txt"])["input_ids"]
        assert tok.unk_token_id not in ids and len(ids) == len(s["txt"].replace(":", " :").split())


def test_shifted_domain_redraws_colours_on_stripes(tmp_path):
    import io

    import numpy as np
    from PIL import Image

    from mmpt.synth import make_synthetic
    from mmpt.synth.image_text import COLORS, combo_attributes, render_sample

    attrs = {**combo_attributes(0), "size": "large", "position": "top left"}
    rng = lambda: np.random.default_rng(0)  # noqa: E731
    plain = np.asarray(Image.open(io.BytesIO(render_sample(attrs, 64, rng()))), dtype=float)
    shifted = np.asarray(
        Image.open(io.BytesIO(render_sample(attrs, 64, rng(), domain="shifted"))), dtype=float
    )
    names = list(COLORS)
    drawn = np.array(COLORS[names[(names.index(attrs["color"]) + 1) % len(names)]])
    true = np.array(COLORS[attrs["color"]])

    def share(image, rgb):  # fraction of top-left-quadrant pixels near the colour
        quad = image[:32, :32].reshape(-1, 3)
        return float((np.abs(quad - rgb).max(1) < 40).mean())

    assert share(shifted, drawn) > 0.2 and share(shifted, true) < 0.02
    assert share(plain, true) > 0.2 and share(plain, drawn) < 0.02
    corner = shifted[40:, 40:].mean()  # bottom right: background only, light stripes
    assert corner > 150 and shifted[40:, 40:].std() > 10
    info = make_synthetic("image-text-shifted", tmp_path, train_samples=8, image_size=16)
    assert info["val_samples"] == 192
    with pytest.raises(ValueError, match="domain"):
        make_synthetic("image-text", tmp_path / "x", train_samples=8, domain="night")

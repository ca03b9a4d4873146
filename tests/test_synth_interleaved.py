"""Synthetic interleaved documents and the synthetic word-level tokenizer."""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image
from transformers import AutoTokenizer

from mmpt.data_cli import main
from mmpt.shards import load_index
from mmpt.synth import make_synthetic
from mmpt.synth.image_text import (
    CLASSNAMES,
    NUM_COMBOS,
    TEMPLATES,
    captions_for,
    combo_attributes,
)
from mmpt.synth.interleaved import FILLER_SENTENCES, INTRO_SENTENCES, synth_interleaved
from mmpt.synth.vocab import SPECIAL_TOKENS, synth_vocabulary, write_word_tokenizer


def _docs(folder: str | Path) -> list[dict]:
    """Every sample of a shard folder, read with a plain webdataset pipeline."""
    folder = Path(folder)
    urls = [str(folder / s.name) for s in load_index(folder).shards]
    return list(wds.WebDataset(urls, shardshuffle=False))


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("docs")
    return synth_interleaved(
        out, train_samples=20, image_size=32, seed=1, samples_per_shard=8, val_samples=12
    )


@pytest.fixture(scope="module")
def tok(synth: dict):
    return AutoTokenizer.from_pretrained(synth["tokenizer"], local_files_only=True)


def test_webdataset_groups_numbered_images_and_json_into_one_sample(synth: dict) -> None:
    docs = _docs(synth["train"])
    assert [d["__key__"] for d in docs] == [f"{i:09d}" for i in range(20)]
    for d in docs:
        info = json.loads(d["json"])
        members = [m for m in info["images"] if m is not None]
        assert members == [f"{k}.jpg" for k in range(len(members))]
        assert {k for k in d if not k.startswith("__")} == {"json", *members}
        assert info["key"] == d["__key__"]


def _layout(texts: list[str | None], images: list[str | None]) -> str:
    """One letter per position: I intro, M image, C text right after an image, F other text."""
    letters = []
    for i, (text, image) in enumerate(zip(texts, images, strict=True)):
        assert (text is None) != (image is None), (i, text, image)
        if image is not None:
            letters.append("M")
        else:
            letters.append("I" if i == 0 else "C" if images[i - 1] is not None else "F")
    return "".join(letters)


@pytest.mark.parametrize("split", ["train", "val"])
def test_documents_alternate_image_then_its_caption(synth: dict, split: str) -> None:
    phrasings, layouts = set(), set()
    for d in _docs(synth[split]):
        info = json.loads(d["json"])
        assert list(info) == ["texts", "images", "key", "objects"]
        texts, images, objects = info["texts"], info["images"], info["objects"]
        layout = _layout(texts, images)
        assert re.fullmatch(r"IMC(F?MC)*", layout), layout
        assert 1 <= layout.count("M") == len(objects) <= 4
        layouts.add(layout)
        assert texts[0] in INTRO_SENTENCES
        assert all(t in FILLER_SENTENCES for t, c in zip(texts, layout, strict=True) if c == "F")
        members = [(i, m) for i, m in enumerate(images) if m is not None]
        for k, ((i, member), attrs) in enumerate(zip(members, objects, strict=True)):
            assert member == f"{k}.jpg"
            captions = captions_for(attrs)
            assert texts[i + 1] in captions  # the text right after an image is its caption
            phrasings.add(captions.index(texts[i + 1]))
            image = Image.open(io.BytesIO(d[member]))
            assert image.format == "JPEG" and image.size == (32, 32) and image.mode == "RGB"
    assert phrasings == ({0, 1} if split == "train" else {0})
    if split == "train":
        assert any("F" in x for x in layouts) and any(re.search("CMC", x) for x in layouts)
        assert {x.count("M") for x in layouts} == {1, 2, 3, 4}


def test_counts_meta_and_balanced_combinations(synth: dict) -> None:
    assert synth["train_samples"] == 20 and synth["val_samples"] == 12
    assert synth["train_shards"] == 3 and synth["val_shards"] == 2
    for split in ("train", "val"):
        index = load_index(synth[split])
        assert index.num_samples == synth[f"{split}_samples"]
        assert index.modalities == ["image", "text"] and "json" in index.keys
        assert index.meta["kind"] == "interleaved" and index.meta["split"] == split
        gen = index.meta["generator"]
        assert gen["name"] == "mmpt.synth.interleaved" and gen["seed"] == 1
        assert (gen["min_images"], gen["max_images"], gen["image_size"]) == (1, 4, 32)
        objects = [o for d in _docs(synth[split]) for o in json.loads(d["json"])["objects"]]
        assert len(objects) == synth[f"{split}_images"]
        combos = Counter((o["color"], o["shape"], o["size"], o["position"]) for o in objects)
        assert max(combos.values()) == 1  # fewer images than combinations: all distinct
    train = {json.loads(d["json"])["texts"][2] for d in _docs(synth["train"])}
    val = {json.loads(d["json"])["texts"][2] for d in _docs(synth["val"])}
    assert train != val  # separate random streams


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    kw = {"train_samples": 6, "val_samples": 3, "image_size": 32, "samples_per_shard": 4}
    a = synth_interleaved(tmp_path / "a", seed=5, **kw)
    b = synth_interleaved(tmp_path / "b", seed=5, **kw)
    c = synth_interleaved(tmp_path / "c", seed=6, **kw)
    for part in ("train", "val", "tokenizer"):
        names = sorted(p.name for p in Path(a[part]).iterdir())
        assert names == sorted(p.name for p in Path(b[part]).iterdir()) and names
        for name in names:
            assert (Path(a[part]) / name).read_bytes() == (Path(b[part]) / name).read_bytes()
    tar = Path(a["train"]) / "shard-000000.tar"
    assert tar.read_bytes() != (Path(c["train"]) / tar.name).read_bytes()


def test_image_count_bounds_and_rerun(tmp_path: Path) -> None:
    kw = {"image_size": 16, "samples_per_shard": 2, "val_samples": 2}
    synth_interleaved(tmp_path, train_samples=6, **kw)
    result = make_synthetic(
        "interleaved", tmp_path, train_samples=3, min_images=2, max_images=2, **kw
    )
    assert len(list(Path(result["train"]).glob("*.tar"))) == 2  # the third old shard is gone
    assert result["train_images"] == 6 and result["val_images"] == 4
    for d in _docs(result["train"]):
        assert len(json.loads(d["json"])["objects"]) == 2
    foreign = tmp_path / "other" / "train"
    foreign.mkdir(parents=True)
    (foreign / "mine.tar").write_bytes(b"x")
    with pytest.raises(ValueError, match="overwrite"):
        synth_interleaved(foreign.parent, train_samples=2, **kw)
    assert (foreign / "mine.tar").exists()


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"train_samples": 0}, "--train-samples"),
        ({"val_samples": 0}, "--val-samples"),
        ({"image_size": 8}, "--image-size"),
        ({"min_images": 0}, "--min-images"),
        ({"min_images": 3, "max_images": 2}, "--max-images"),
    ],
)
def test_bad_parameters_name_the_flag(tmp_path: Path, kwargs: dict, flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        synth_interleaved(tmp_path, **kwargs)
    assert not list(tmp_path.iterdir())


def test_vocabulary_is_sorted_and_derived_from_generators() -> None:
    words = synth_vocabulary()
    assert words == sorted(set(words)) and not set(words) & set(SPECIAL_TOKENS)
    prompt = {"Describe", "the", "image", ".", "user", "assistant", "system", "USER", "ASSISTANT"}
    assert prompt | {":", *"0123456789"} <= set(words)
    assert {"little", "big", "magenta", "cross", "rendering", "next"} <= set(words)
    assert all(" " not in w for w in words)


def test_every_word_and_special_token_is_one_id(tok) -> None:
    words = synth_vocabulary()
    assert len(tok) == len(SPECIAL_TOKENS) + len(words)
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(7))
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    for word in [*words, *SPECIAL_TOKENS]:
        ids = tok(word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and (ids[0] != tok.unk_token_id or word == "<unk>"), word
    start, end, image = (
        tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<image>")
    )
    user, circle = tok.convert_tokens_to_ids("user"), tok.convert_tokens_to_ids("circle")
    assert tok("<|im_start|>user\n")["input_ids"] == [start, user]  # glued; no bos/eos added
    assert tok("<image>circle<|im_end|>")["input_ids"] == [image, circle, end]
    assert tok("zebra")["input_ids"] == [tok.unk_token_id]


def test_all_generated_text_encodes_without_unk(synth: dict, tok) -> None:
    texts = [t for d in _docs(synth["train"]) for t in json.loads(d["json"])["texts"] if t]
    texts += [c for k in range(NUM_COMBOS) for c in captions_for(combo_attributes(k))]
    texts += [t.format(c) for t in TEMPLATES for c in CLASSNAMES]
    texts += ["USER: <image>\nDescribe the image . ASSISTANT: a big red circle"]
    for text in texts:
        assert tok.unk_token_id not in tok(text)["input_ids"], text


def test_write_word_tokenizer_keeps_word_order_and_needs_unk(tmp_path: Path) -> None:
    path = write_word_tokenizer(
        tmp_path / "t", ["<pad>", "<unk>", "b", "a", "b"], ["<pad>", "<unk>"]
    )
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert tok.get_vocab() == {"<pad>": 0, "<unk>": 1, "b": 2, "a": 3}
    assert tok.bos_token is None and tok.eos_token is None and tok.pad_token == "<pad>"
    with pytest.raises(ValueError, match="<unk>"):
        write_word_tokenizer(tmp_path / "u", ["a"], ["<pad>"])


def test_cli_writes_interleaved_and_rejects_foreign_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "docs"
    argv = ["synth", "--kind", "interleaved", "--out", str(out), "--train-samples", "5"]
    argv += ["--val-samples", "2", "--image-size", "16", "--max-images", "2", "--seed", "2"]
    assert main(argv) == 0
    summary = capsys.readouterr().out
    assert "train: 5 samples in 1 shard(s)" in summary and "val: 2 samples" in summary
    assert f"tokenizer: {out / 'tokenizer'}" in summary
    gen = load_index(out / "train").meta["generator"]
    assert (gen["max_images"], gen["seed"], gen["val_samples"]) == (2, 2, 2)
    assert (out / "tokenizer" / "tokenizer.json").is_file()

    argv = ["synth", "--kind", "image-text", "--out", str(tmp_path / "x"), "--max-images", "2"]
    assert main(argv) == 2
    assert "--max-images does not apply to --kind image-text" in capsys.readouterr().err

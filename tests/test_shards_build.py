"""Building img2dataset-style shards from CSV, JSONL and folders of image + caption pairs."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from mmpt.shards import load_index
from mmpt.shards.build import build_image_text_shards


def _image(path: Path, size: tuple[int, int] = (24, 16), seed: int = 0, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _read(out: Path) -> list[dict]:
    """Samples of a built folder through a plain webdataset pipeline."""
    urls = [str(out / s.name) for s in load_index(out).shards]
    return [
        {
            "__key__": s["__key__"],
            "jpg": s["jpg"],
            "txt": s["txt"].decode(),
            **json.loads(s["json"]),
        }
        for s in wds.WebDataset(urls, shardshuffle=False)
    ]


def test_build_from_csv(tmp_path: Path) -> None:
    jpg = _image(tmp_path / "imgs" / "a.jpg", seed=1)
    _image(tmp_path / "imgs" / "b.png", size=(10, 30), seed=2)
    _image(tmp_path / "imgs" / "c.jpg", seed=3)
    csv = tmp_path / "pairs.csv"
    csv.write_text(
        'filepath,caption,extra\nimgs/a.jpg,a cat,1\nimgs/b.png,"a dog, small",2\n'
        f"{tmp_path / 'imgs' / 'c.jpg'},a cow,3\n"
    )
    report = build_image_text_shards(csv, tmp_path / "out", samples_per_shard=2, progress=False)
    assert report.written == 3 and report.skipped == {}
    assert [Path(s).name for s in report.shards] == ["shard-000000.tar", "shard-000001.tar"]
    samples = _read(tmp_path / "out")
    assert [s["__key__"] for s in samples] == ["000000000", "000000001", "000000002"]
    assert [s["key"] for s in samples] == [s["__key__"] for s in samples]
    assert [s["txt"] for s in samples] == ["a cat", "a dog, small", "a cow"]
    assert samples[0]["jpg"] == jpg.read_bytes()  # JPEG copied byte for byte
    png = Image.open(io.BytesIO(samples[1]["jpg"]))
    assert png.format == "JPEG" and png.mode == "RGB" and png.size == (10, 30)
    assert samples[1]["url"] == str(tmp_path / "imgs" / "b.png")
    assert (samples[1]["width"], samples[1]["height"]) == (10, 30)
    assert (samples[1]["original_width"], samples[1]["original_height"]) == (10, 30)
    assert {s["status"] for s in samples} == {"success"}
    index = load_index(tmp_path / "out")
    assert index.num_samples == 3 and index.modalities == ["image", "text"]
    assert index.meta["source"] == str(csv.resolve())
    build = index.meta["build"]
    assert build["image_column"] == "filepath" and build["caption_column"] == "caption"
    assert build["samples_per_shard"] == 2 and build["jpeg_quality"] == 95


def test_build_from_jsonl_with_images_root(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    _image(root / "x.jpg", size=(80, 40))
    _image(root / "y.webp", size=(30, 60))
    jsonl = tmp_path / "meta" / "pairs.jsonl"
    jsonl.parent.mkdir()
    rows = [{"image": "x.jpg", "text": "first"}, {"image": "y.webp", "text": "second"}]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n\n")
    report = build_image_text_shards(
        jsonl, tmp_path / "out", images_root=root, resize_short_side=20, progress=False
    )
    assert report.written == 2 and report.skipped == {"bad_row": 1}
    assert report.skipped_examples[0]["source"] == f"{jsonl}:3"
    samples = _read(tmp_path / "out")
    sizes = [(s["width"], s["height"], s["original_width"], s["original_height"]) for s in samples]
    assert sizes == [(40, 20, 80, 40), (20, 40, 30, 60)]
    for s in samples:
        assert Image.open(io.BytesIO(s["jpg"])).size == (s["width"], s["height"])
    assert [s["txt"] for s in samples] == ["first", "second"]


def test_build_from_folder_of_pairs(tmp_path: Path) -> None:
    src = tmp_path / "pairs"
    _image(src / "a.jpg")
    (src / "a.txt").write_text("apple\n")
    _image(src / "sub" / "b.png", mode="RGBA")
    (src / "sub" / "b.txt").write_text("banana")
    _image(src / "c.jpg")  # no caption file
    report = build_image_text_shards(src, tmp_path / "out", progress=False)
    assert report.written == 2 and report.skipped == {"missing_caption": 1}
    assert [s["txt"] for s in _read(tmp_path / "out")] == ["apple", "banana"]


def test_bad_items_are_skipped_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = _image(tmp_path / "good.jpg")
    (tmp_path / "corrupt.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    csv = tmp_path / "pairs.csv"
    csv.write_text(
        "path,caption\ngood.jpg,fine\ncorrupt.jpg,broken\ngarbage.png,junk\n"
        "missing.jpg,gone\ngood.jpg,   \ngood.jpg,again\n"
    )
    with caplog.at_level(logging.WARNING, logger="mmpt.shards.build"):
        report = build_image_text_shards(csv, tmp_path / "out", progress=False)
    assert report.written == 2
    assert report.skipped == {"corrupt_image": 2, "missing_image": 1, "empty_caption": 1}
    assert report.total_skipped == 4
    reasons = {Path(e["source"]).name: e["reason"] for e in report.skipped_examples}
    assert reasons["corrupt.jpg"] == "corrupt_image" and reasons["missing.jpg"] == "missing_image"
    assert "missing.jpg" in caplog.text and "skipped 4 of 6" in caplog.text
    assert [s["txt"] for s in _read(tmp_path / "out")] == ["fine", "again"]
    assert load_index(tmp_path / "out").meta["skipped"] == report.skipped


def test_missing_caption_column_names_columns_and_flag(tmp_path: Path) -> None:
    csv = tmp_path / "pairs.csv"
    csv.write_text("path,label\na.jpg,3\n")
    with pytest.raises(ValueError, match="--caption-column") as err:
        build_image_text_shards(csv, tmp_path / "out", progress=False)
    assert "'path'" in str(err.value) and "'label'" in str(err.value)
    with pytest.raises(ValueError, match="--image-column"):
        build_image_text_shards(csv, tmp_path / "out", image_column="img", progress=False)


def test_explicit_columns(tmp_path: Path) -> None:
    _image(tmp_path / "a.jpg")
    csv = tmp_path / "pairs.tsv"
    csv.write_text("url_local\tdescription\na.jpg\tan apple\n")
    report = build_image_text_shards(
        csv, tmp_path / "out", image_column="url_local", caption_column="description",
        progress=False,
    )  # fmt: skip
    assert report.written == 1 and _read(tmp_path / "out")[0]["txt"] == "an apple"


def _tar_contents(out: Path) -> list[tuple[str, bytes]]:
    items = []
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as tf:
            items += [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    return items


def test_workers_give_the_same_shards(tmp_path: Path) -> None:
    lines = ["path,caption"]
    for i in range(12):
        _image(tmp_path / f"{i}.png", seed=i)
        lines.append(f"{i}.png,caption {i}")
    lines.append("nope.png,missing")
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    one = build_image_text_shards(tmp_path / "pairs.csv", tmp_path / "one", progress=False)
    two = build_image_text_shards(
        tmp_path / "pairs.csv", tmp_path / "two", workers=2, samples_per_shard=5, progress=False
    )
    assert one.written == two.written == 12 and one.skipped == two.skipped == {"missing_image": 1}
    assert _tar_contents(tmp_path / "one") == _tar_contents(tmp_path / "two")


def test_refuses_to_mix_with_existing_shards(tmp_path: Path) -> None:
    _image(tmp_path / "a.jpg")
    (tmp_path / "p.csv").write_text("path,caption\na.jpg,x\n")
    build_image_text_shards(tmp_path / "p.csv", tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="--overwrite"):
        build_image_text_shards(tmp_path / "p.csv", tmp_path / "out", progress=False)
    report = build_image_text_shards(
        tmp_path / "p.csv", tmp_path / "out", overwrite=True, progress=True
    )
    assert report.written == 1


def test_bad_sources_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.csv does not exist"):
        build_image_text_shards(tmp_path / "nope.csv", tmp_path / "out")
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match="unsupported source type '.parquet'"):
        build_image_text_shards(tmp_path / "data.parquet", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        build_image_text_shards(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "p.csv").write_text("path,caption\n")
    with pytest.raises(ValueError, match="--workers"):
        build_image_text_shards(tmp_path / "p.csv", tmp_path / "out", workers=0)

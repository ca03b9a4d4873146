"""Inspecting shard folders: counts, extensions, missing/corrupt samples, index drift."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from mmpt.shards import ShardWriter
from mmpt.shards.inspect import classify_sample, inspect_shards, print_report
from mmpt.synth import make_synthetic


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (12, 12, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def _write(out: Path, n: int = 10, per_shard: int = 4, broken: dict | None = None) -> Path:
    """``n`` samples in shards of ``per_shard``; ``broken`` maps sample index -> what to break."""
    broken = broken or {}
    with ShardWriter(out, samples_per_shard=per_shard, modalities=["image", "text"]) as w:
        for i in range(n):
            sample = {
                "__key__": f"{i:09d}",
                "jpg": _jpeg(i),
                "txt": f"caption {i}",
                "json": {"i": i},
            }
            what = broken.get(i)
            if what == "no_image":
                del sample["jpg"]
            elif what == "no_text":
                del sample["txt"]
            elif what == "empty_text":
                sample["txt"] = "  "
            elif what == "corrupt_image":
                sample["jpg"] = sample["jpg"][:40]
            elif what == "corrupt_json":
                sample["json"] = b"{not json"
            w.write(sample)
    return out


def test_counts_and_extensions_of_a_clean_folder(tmp_path: Path) -> None:
    report = inspect_shards(_write(tmp_path / "s"), check=True)
    assert report.ok and report.index_found and report.checked
    assert report.total_samples == 10
    assert [(s.name, s.samples, s.expected) for s in report.shards] == [
        ("shard-000000.tar", 4, 4),
        ("shard-000001.tar", 4, 4),
        ("shard-000002.tar", 2, 2),
    ]
    assert report.extensions == {"jpg": 10, "json": 10, "txt": 10}
    assert report.shapes == {"pair": 10} and report.images == 10
    assert report.images_per_sample == {1: 10} and not report.text_only
    assert report.mismatches == [] and report.errors == []
    d = report.to_dict()
    assert json.loads(json.dumps(d))["total_samples"] == 10 and d["ok"] is True


def test_missing_image_and_caption(tmp_path: Path) -> None:
    out = _write(tmp_path / "s", broken={1: "no_image", 5: "no_text", 6: "empty_text"})
    report = inspect_shards(out)
    assert report.missing_image == 1 and report.missing_text == 2 and not report.ok
    assert report.extensions == {"jpg": 9, "json": 10, "txt": 9}
    problems = {(e["key"], e["problem"]) for e in report.examples}
    assert problems == {
        ("000000001", "no image"),
        ("000000005", "no text"),
        ("000000006", "empty text"),
    }


def test_check_detects_corrupt_image_and_json(tmp_path: Path) -> None:
    out = _write(tmp_path / "s", broken={2: "corrupt_image", 7: "corrupt_json"})
    quick = inspect_shards(out)
    assert quick.corrupt_images == 0 and quick.ok  # nothing decoded without check
    report = inspect_shards(out, check=True, workers=2)
    assert report.corrupt_images == 1 and report.corrupt_json == 1 and not report.ok
    corrupt = {e["key"]: e for e in report.examples}
    assert corrupt["000000002"]["shard"] == "shard-000000.tar"
    assert corrupt["000000002"]["problem"].startswith("corrupt jpg")
    assert corrupt["000000007"]["problem"].startswith("corrupt json")


def test_mismatches_against_index(tmp_path: Path) -> None:
    out = _write(tmp_path / "s")
    index = json.loads((out / "index.json").read_text())
    index["shards"][0]["samples"] = 5
    index["shards"].append({"name": "shard-000009.tar", "samples": 3})
    index["keys"] = ["jpg", "txt"]
    (out / "index.json").write_text(json.dumps(index))
    (out / "shard-000002.tar").rename(out / "extra.tar")
    report = inspect_shards(out)
    assert not report.ok
    text = "\n".join(report.mismatches)
    assert "shard-000000.tar: index.json says 5 samples, found 4" in text
    assert "shard-000009.tar is listed in index.json but the file is missing" in text
    assert "shard-000002.tar is listed in index.json but the file is missing" in text
    assert "extra.tar is not listed in index.json" in text
    assert "lists keys ['jpg', 'txt']" in text
    assert report.total_samples == 10  # extra.tar is still read


def test_truncated_tar_is_reported_not_raised(tmp_path: Path) -> None:
    out = _write(tmp_path / "s", n=8, per_shard=8)
    tar = out / "shard-000000.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    report = inspect_shards(out, check=True)
    assert len(report.errors) == 1 and "truncated" in report.errors[0]
    assert 0 < report.total_samples < 8
    assert any("says 8 samples" in m for m in report.mismatches)


def test_single_tar_and_folder_without_index(tmp_path: Path) -> None:
    out = _write(tmp_path / "s")
    single = inspect_shards(out / "shard-000001.tar")
    assert single.total_samples == 4 and single.shards[0].expected == 4 and single.ok
    (out / "index.json").unlink()
    report = inspect_shards(out)
    assert not report.index_found and report.total_samples == 10 and report.ok
    assert [s.name for s in report.shards] == [f"shard-00000{i}.tar" for i in range(3)]


def test_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        inspect_shards(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .tar shards"):
        inspect_shards(tmp_path / "empty")


def test_print_report_renders_tables(tmp_path: Path) -> None:
    report = inspect_shards(_write(tmp_path / "s", broken={3: "no_text"}))
    console = Console(record=True, width=120)
    print_report(report, console=console)
    text = console.export_text()
    assert "shard-000002.tar" in text and "missing_text" in text and "problems found" in text


def _interleaved(out: Path, docs: list[dict], modalities: list[str] | None = None) -> Path:
    """One shard of interleaved samples: each doc gives ``names`` (json) and ``members``."""
    with ShardWriter(out, modalities=modalities or ["image", "text"]) as w:
        for i, doc in enumerate(docs):
            names = doc.get("names", ["0.jpg", "1.jpg"])
            texts = doc.get("texts", ["intro"] + ["a shape" if n is None else None for n in names])
            sample = {
                "__key__": f"doc{i:03d}",
                "json": {"texts": texts, "images": [None, *names]},
            }
            for member in doc.get("members", [n for n in names if n]):
                sample[member] = doc.get("bytes", {}).get(member, _jpeg(i))
            w.write(sample)
    return out


def test_interleaved_synthetic_set_is_clean(tmp_path: Path) -> None:
    info = make_synthetic(
        "interleaved", tmp_path / "il", train_samples=10, val_samples=2, image_size=32
    )
    report = inspect_shards(info["train"], check=True)
    assert report.ok and report.examples == [] and report.total_samples == 10
    assert report.shapes == {"interleaved": 10} and report.images == info["train_images"]
    assert sum(report.images_per_sample.values()) == 10
    assert set(report.images_per_sample) <= {1, 2, 3, 4}
    assert report.extensions["json"] == report.extensions["0.jpg"] == 10
    console = Console(record=True, width=120)
    print_report(report, console=console)
    text = console.export_text()
    assert "interleaved 10" in text and f"{info['train_images']} (per sample: " in text


def test_text_synthetic_set_is_clean(tmp_path: Path) -> None:
    info = make_synthetic("text", tmp_path / "tx", train_samples=10, val_samples=2)
    report = inspect_shards(info["train"], check=True)
    assert report.ok and report.examples == [] and report.total_samples == 10
    assert report.text_only and report.shapes == {"text": 10}
    assert report.images == 0 and report.images_per_sample == {0: 10}
    single = inspect_shards(Path(info["train"]) / "shard-000000.tar")  # the folder's index
    assert single.ok and single.text_only


def test_text_only_needs_the_index_to_say_so(tmp_path: Path) -> None:
    for name, modalities in (("text", ["text"]), ("pairs", ["image", "text"])):
        with ShardWriter(tmp_path / name, modalities=modalities) as w:
            w.write({"__key__": "a", "txt": "only words"})
            w.write({"__key__": "b", "json": {"text": "words in json"}})
    assert inspect_shards(tmp_path / "text").ok
    pairs = inspect_shards(tmp_path / "pairs")
    assert pairs.missing_image == 2 and pairs.missing_text == 0 and not pairs.text_only
    problems = {(e["key"], e["problem"]) for e in pairs.examples}
    assert problems == {("a", "no image"), ("b", "no image")}
    (tmp_path / "pairs" / "index.json").unlink()  # no index: an image is still expected
    assert inspect_shards(tmp_path / "pairs").missing_image == 2


def test_interleaved_member_named_in_json_but_missing(tmp_path: Path) -> None:
    docs = [
        {},
        {"names": ["0.jpg", "1.jpg", "2.jpg"], "members": ["0.jpg", "1.jpg"]},
        {"texts": [None, None, None]},
    ]
    report = inspect_shards(_interleaved(tmp_path / "s", docs))
    assert report.missing_member == 1 and report.missing_text == 1 and not report.ok
    assert report.missing_image == 0 and report.shapes == {"interleaved": 3}
    problems = {(e["key"], e["kind"], e["problem"]) for e in report.examples}
    assert problems == {
        ("doc001", "missing_member", "image member '2.jpg' named in json is missing"),
        ("doc002", "missing_text", "empty text"),
    }
    assert report.images_per_sample == {2: 3}
    console = Console(record=True, width=120)
    print_report(report, console=console)
    assert "missing_member" in console.export_text()


def test_check_reports_corrupt_numbered_image(tmp_path: Path) -> None:
    docs = [{}, {"bytes": {"1.jpg": _jpeg(1)[:40]}}]
    out = _interleaved(tmp_path / "s", docs)
    assert inspect_shards(out).ok  # images are not decoded without check
    report = inspect_shards(out, check=True)
    assert report.corrupt_images == 1 and report.corrupt_json == 0 and not report.ok
    (example,) = report.examples
    assert example["key"] == "doc001" and example["problem"].startswith("corrupt 1.jpg")


def test_interleaved_lists_of_different_length(tmp_path: Path) -> None:
    out = _interleaved(tmp_path / "s", [{"texts": ["intro", "a shape"]}])
    report = inspect_shards(out)
    assert report.corrupt_json == 1
    assert report.examples[0]["problem"] == "interleaved json: 2 texts for 3 images"


def test_conversation_shapes() -> None:
    jpg = _jpeg(0)
    llava = {"conversations": [{"from": "human", "value": "what?"}, {"from": "gpt", "value": "a"}]}
    shape, images, problems = classify_sample({"jpg": jpg, "json": json.dumps(llava).encode()})
    assert (shape, images, problems) == ("conversation", ["jpg"], [])
    chat = {
        "messages": [{"role": "user", "content": "<image><image> same?"}],
        "images": ["0.png", "1.png"],
    }
    shape, images, problems = classify_sample({"0.png": jpg, "json": json.dumps(chat).encode()})
    assert shape == "conversation" and images == ["0.png"]
    assert problems == [("image member '1.png' named in json is missing", "missing_member")]
    empty = {"messages": [{"role": "user", "content": " "}]}
    assert classify_sample({"json": json.dumps(empty).encode()})[2] == [
        ("empty text", "missing_text")
    ]
    text_chat = {"messages": [{"role": "user", "content": "hi"}]}  # no image: fine
    assert classify_sample({"json": json.dumps(text_chat).encode()}) == ("conversation", [], [])


def test_json_lists_every_bad_key_and_text_the_first_few(tmp_path: Path) -> None:
    from mmpt.data_cli import main as data_main

    folder = _write(
        tmp_path / "s", n=30, per_shard=8, broken={i: "corrupt_image" for i in range(25)}
    )
    report = inspect_shards(folder, check=True)
    bad = {e["key"] for e in report.to_dict()["examples"] if e["kind"] == "corrupt_images"}
    assert bad == {f"{i:09d}" for i in range(25)}

    console = Console(file=io.StringIO(), width=200)
    print_report(report, console)
    text = console.file.getvalue()
    assert "+15 more corrupt_images" in text
    assert "000000009" in text and "000000010" not in text  # the first 10 by name

    out = io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(out):
        assert data_main(["inspect", str(folder), "--check", "--json"]) == 1
    listed = json.loads(out.getvalue())["examples"]
    assert len([e for e in listed if e["kind"] == "corrupt_images"]) == 25

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
from mmpt.shards.inspect import inspect_shards, print_report


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

"""``mmpt data``: synth / build / inspect from the command line, and its error handling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmpt.data_cli import main
from mmpt.shards import load_index


@pytest.mark.parametrize(
    "argv", [["--help"], ["synth", "--help"], ["build", "-h"], ["inspect", "-h"]]
)
def test_help(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mmpt data")
    if argv[0] == "--help":
        assert "synth" in out and "build" in out and "inspect" in out
    if argv[0] == "build":
        assert "--from SOURCE" in out and "--caption-column" in out


def test_missing_path_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope does not exist" in err and "Traceback" not in err
    assert main(["build", "--from", str(tmp_path / "x.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "x.csv does not exist" in capsys.readouterr().err


def test_unknown_kind_lists_known_ones(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["synth", "--kind", "smell-text", "--out", str(tmp_path)]) == 2
    assert "unknown --kind 'smell-text'" in (err := capsys.readouterr().err)
    assert "image-text" in err
    assert main(["build", "--kind", "nope", "--from", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "known kinds: image-text" in capsys.readouterr().err


def test_usage_error_returns_2(capsys: pytest.CaptureFixture) -> None:
    assert main(["synth", "--out", "x"]) == 2
    assert "--kind" in capsys.readouterr().err


def test_synth_then_inspect_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "shapes"
    argv = ["synth", "--kind", "image-text", "--out", str(out), "--train-samples", "30"]
    assert main([*argv, "--samples-per-shard", "16", "--seed", "1", "--image-size", "32"]) == 0
    summary = capsys.readouterr().out
    assert str(out) in summary and "train: 30 samples in 2 shard(s)" in summary
    assert "val: 192 samples" in summary
    assert load_index(out / "train").meta["generator"]["image_size"] == 32

    assert main(["inspect", str(out / "train"), "--check", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total_samples"] == 30 and report["ok"] is True
    assert report["extensions"] == {"jpg": 30, "json": 30, "txt": 30}

    assert main(["inspect", str(out / "val")]) == 0
    assert "samples" in capsys.readouterr().out


def test_build_summary_and_inspect_problems(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    (tmp_path / "p.csv").write_text("image,title\na.png,black square\nb.png,missing\n")
    out = tmp_path / "out"
    argv = ["build", "--from", str(tmp_path / "p.csv"), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    summary = capsys.readouterr().out
    assert f"wrote 1 samples in 1 shard(s) to {out}" in summary
    assert "skipped 1: missing_image=1" in summary and "b.png" in summary

    index = json.loads((out / "index.json").read_text())
    index["shards"][0]["samples"] = 2
    (out / "index.json").write_text(json.dumps(index))
    assert main(["inspect", str(out)]) == 1  # problems found -> exit code 1
    assert "says 2 samples, found 1" in capsys.readouterr().out.replace("\n", " ")


def test_build_flag_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "p.csv").write_text("path,label\na.png,1\n")
    argv = ["build", "--from", str(tmp_path / "p.csv"), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--caption-column" in err and "Traceback" not in err

"""Smoke test of scripts/bench_video.py: both backends, one tiny configuration, JSON rows."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("av")
pytest.importorskip("decord")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_video.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_video", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_video_tiny(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bench = load_script()
    out = tmp_path / "bench.json"
    argv = ["--small-clips", "3", "--real-clips", "2", "--num-frames", "2", "--workers", "0"]
    result = bench.main([*argv, "--repeat", "1", "--eval", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    rows = result["rows"]
    assert [(r["set"], r["backend"]) for r in rows] == [
        ("synth-64", "decord"), ("synth-64", "pyav"), ("ego-256", "decord"), ("ego-256", "pyav"),
    ]  # fmt: skip
    for r in rows:
        assert (r["num_frames"], r["workers"], r["mode"]) == (2, 0, "eval")
        assert r["clips"] == (3 if r["set"] == "synth-64" else 2)
        assert r["clips_per_s"] > 0 and r["ms_per_clip_median"] > 0
        assert r["clips_per_s_min"] <= r["clips_per_s"] <= r["clips_per_s_max"]
    assert all(c["same_indices"] for c in result["sanity"].values())
    assert result["machine"]["decord"] and result["machine"]["av"]
    assert "ego-256" in result["sets"] and "456x256" in result["sets"]["ego-256"]
    printed = capsys.readouterr().out
    assert printed.startswith("python scripts/bench_video.py --small-clips 3")
    assert "clips/s" in printed

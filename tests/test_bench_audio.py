"""scripts/bench_audio.py at a tiny size: every pipeline runs, the check passes, JSON fields."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_audio.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_audio", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_bench_audio_tiny(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bench = load_bench()
    out = tmp_path / "bench.json"
    argv = ["--clips", "12", "--durations", "0.5", "1.0", "--shards", "2", "--workers", "1"]
    argv += ["--batch-size", "4", "--bucket-batches", "2", "--repeats", "1", "--threads", "1"]
    result = bench.main([*argv, "--json", str(out)])
    assert json.loads(out.read_text()) == result

    check = result["check"]
    assert check["passed"] is True and check["max_abs_diff"] <= check["tolerance"] == 1e-4
    # 4 clips through the cached loop and AudioReader, a batch of 4 from the stream
    assert check["compared"] == 12
    assert sum(k.startswith("cached:") for k in check["per_clip"]) == 4
    assert sum(k.startswith("stream:") for k in check["per_clip"]) == 4

    rows = {r["pipeline"]: r for r in result["pipelines"]}
    assert set(rows) == {
        "plain_loop",
        "cached_loop",
        "mmpt_reader",
        "dataloader_files",
        "mmpt_stream",
    }
    assert rows["plain_loop"]["clips"] == rows["mmpt_reader"]["clips"] == 12
    assert rows["cached_loop"]["clips"] == 12
    assert rows["dataloader_files"]["clips"] == 12  # last short batch kept (3 full here anyway)
    assert rows["mmpt_stream"]["clips"] == 12  # 2 shards of 6 -> 1 worker, 3 full batches
    for r in rows.values():
        assert r["clips_per_s"] > 0 and r["audio_s_per_s"] > 0
        assert r["clips_per_s_min"] <= r["clips_per_s"] <= r["clips_per_s_max"]
        assert len(r["seconds"]) == 1
    assert rows["plain_loop"]["padding_fraction"] is rows["mmpt_reader"]["padding_fraction"] is None
    assert rows["cached_loop"]["padding_fraction"] is None
    assert rows["plain_loop"]["speedup"] is None and rows["mmpt_reader"]["speedup"] > 0
    for name in ("dataloader_files", "mmpt_stream"):
        assert 0 <= rows[name]["padding_fraction"] < 1
    assert rows["mmpt_reader"]["baseline"] == "cached_loop"
    assert rows["cached_loop"]["baseline"] == "plain_loop"
    r = rows["mmpt_reader"]
    assert r["speedup_min"] <= r["speedup_max"] and r["speedup_min"] > 0
    assert rows["mmpt_stream"]["baseline"] == "dataloader_files"
    assert rows["mmpt_stream"]["speedup"] > 0 and rows["dataloader_files"]["speedup"] is None
    assert result["config"]["clips"] == 12 and result["config"]["format"] == "flac"
    # all clips 0.5-1 s: the audio seconds per clip are in that range
    assert 6 <= result["audio_seconds"] <= 12

    printed = capsys.readouterr().out
    assert "command: python scripts/bench_audio.py --clips 12" in printed
    assert "[ok]" in printed and "speedup" in printed


def test_check_failure_exits_nonzero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench = load_bench()
    monkeypatch.setattr(bench, "TOLERANCE", -1.0)  # nothing can pass
    argv = ["--clips", "4", "--durations", "0.3", "0.4", "--shards", "1", "--workers", "0"]
    argv += ["--batch-size", "2", "--repeats", "1", "--json", str(tmp_path / "b.json")]
    with pytest.raises(SystemExit, match="correctness check FAILED"):
        bench.main(argv)
    written = json.loads((tmp_path / "b.json").read_text())
    assert written["check"]["passed"] is False and written["pipelines"] == []

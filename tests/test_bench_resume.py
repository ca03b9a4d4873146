"""scripts/bench_resume.py at tiny sizes: every row, and each resumed epoch gives all keys once."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.filterwarnings("ignore:.*`IterableDataset` has `__len__` defined")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_resume.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_resume", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_bench_resume_quick(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bench = load_script()
    result = bench.main(["--quick", "--data", str(tmp_path)])
    out = capsys.readouterr().out

    assert result["checks_passed"] is True and "CHECK FAILED" not in out
    assert result["command"] == f"python scripts/bench_resume.py --quick --data {tmp_path}"
    assert f"command: {result['command']}" in out
    assert "usable cores" in out and "torch " in out

    rows = result["rows"]
    assert [r["fraction"] for r in rows] == [0.0, 0.25, 0.5, 0.9]
    assert rows[0]["point"].startswith("epoch start") and rows[0]["trained"] == 0
    # quick: 320 samples in 8 shards, 2 workers x 20 batches of 8: every key in the epoch
    assert result["batches"] == 40
    assert [r["trained"] for r in rows[1:]] == [80, 160, 288]
    for r in rows:
        assert r["check"].startswith("yes") and "each once" in r["check"]
        assert len(r["first_s"]) == 1 and r["first_s"][0] > 0
    for r in rows[1:]:
        assert f"{r['trained']} + {320 - r['trained']} = 320 keys, each once" in r["check"]
        assert r["skipped"] == pytest.approx(r["trained"] / 2, abs=8)  # per worker

    # the markdown tables: a header, a separator and one line per row
    lines = [ln for ln in out.splitlines() if ln.startswith("|")]
    assert sum(ln.startswith("| resume at ") for ln in lines) == 3
    assert sum(ln.startswith("| epoch start") for ln in lines) == 1
    assert any(ln.startswith("| normal iteration: decode + collate") for ln in lines)
    assert any(ln.startswith("| fast-forward, per worker") for ln in lines)
    assert result["decode_rate"] > 0 and result["raw_read_rate"] > 0

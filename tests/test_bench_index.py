"""scripts/bench_index.py at tiny sizes: every row's count equals the truth."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_index.py"


def test_bench_index_quick(tmp_path: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("bench_index", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    argv = ["--shards", "8", "--per-shard", "3", "--data", str(tmp_path)]
    result = bench.main(argv)
    out = capsys.readouterr().out
    assert result["checks_passed"] and "all counts equal the truth" in out
    assert result["command"] == f"python scripts/bench_index.py {' '.join(argv)}"
    rows = result["rows"]
    assert {r["shards"] for r in rows} == {2, 4, 8}
    assert all(r["count"] == r["truth"] == 3 * r["shards"] for r in rows)
    methods = {r["method"] for r in rows}
    assert "baseline: iterate wds.WebDataset" in methods
    assert "mmpt data index, *_stats.json" in methods

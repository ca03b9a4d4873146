"""scripts/bench_attention.py on the CPU at the tiniest sizes: rows, checks and JSON, no timings."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_attention.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_attention", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_attention_cpu_smoke(tmp_path, capsys):
    bench = load_bench()
    out_path = tmp_path / "bench.json"
    args = ["--device", "cpu", "--tiny", "--max-seq-len", "64", "--rows", "2", "--steps", "1"]
    args += ["--warmup", "0", "--threads", "1", "--with-flash", "--json", str(out_path)]
    returned = bench.main(args)
    data = json.loads(out_path.read_text())
    assert data["checks_passed"] is True and returned["checks_passed"] is True
    assert data["checks"] and all(c["passed"] for c in data["checks"])
    assert {c["level"] for c in data["checks"]} == {"op", "model"}
    assert all(c["max_abs_diff"] <= c["bound"] for c in data["checks"])

    packed, mask, causal = bench.PACKED, bench.PAD_MASK, bench.PAD_CAUSAL
    rows = {(r["level"], r["pass"], r["method"]): r for r in data["results"]}
    assert set(rows) == {
        ("op", "fwd", packed),
        ("op", "fwd", mask),
        ("op", "fwd", causal),
        ("op", "fwd+bwd", packed),
        ("op", "fwd+bwd", mask),
        ("op", "fwd+bwd", causal),
        ("model", "fwd+bwd", packed),
        ("model", "fwd+bwd", mask),
    }
    for r in rows.values():
        assert r["steps_timed"] == 1 and not r["oom"]
        assert r["ms"] > 0 and r["tokens_per_s"] > 0 and r["speedup"] > 0
        assert r["peak_mib"] is None  # CPU: no CUDA memory stats
    assert rows[("op", "fwd", mask)]["speedup"] == 1.0
    # no CUDA: the packed rows ran (and say they ran) the SDPA fallback
    assert rows[("op", "fwd", packed)]["backend"] == "sdpa + dense block-diagonal mask"
    assert rows[("model", "fwd+bwd", packed)]["backend"] == "sdpa + dense block-diagonal mask"
    # flash was asked for but cannot run on the CPU: skipped with a reason, at both levels
    assert {s["level"] for s in data["skipped"]} == {"op", "model"}
    assert all("CUDA" in s["reason"] for s in data["skipped"])

    b = data["batch"]
    assert b["rows"] <= 2 and b["max_seq_len"] == 64 and b["samples"] == len(b["lengths"])
    assert b["real_tokens"] == sum(b["lengths"]) == rows[("op", "fwd", packed)]["real_tokens"]
    assert b["packed_slots"] == b["rows"] * 64 < b["padded_slots"]
    assert data["model"]["config"]["model_type"] == "qwen2"
    assert "NUMERICAL CHECK FAILED" not in capsys.readouterr().out

"""scripts/bench_attention.py on the CPU at the tiniest sizes: rows, checks and JSON, no timings."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_attention_cpu_smoke(tmp_path, capsys):
    bench = load("bench_attention")
    out_path = tmp_path / "bench.json"
    args = ["--device", "cpu", "--tiny", "--max-seq-len", "64", "--rows", "2", "--steps", "1"]
    args += ["--warmup", "0", "--threads", "1", "--with-flash", "--json", str(out_path)]
    returned = bench.main(args)
    data = json.loads(out_path.read_text())
    assert data["checks_passed"] is True and returned["checks_passed"] is True
    assert data["checks"] and all(c["passed"] for c in data["checks"]) and not data["errors"]
    assert {c["level"] for c in data["checks"]} == {"op", "model"}

    sdpa = bench.packed_name("sdpa")
    mask, causal, pad = bench.PAD_MASK, bench.PAD_CAUSAL, bench.PAD
    hf_pos = "hf sdpa (position_ids packing)"
    rows = {(r["level"], r["pass"], r["method"]): r for r in data["results"]}
    assert set(rows) == {
        *(("op", p, m) for p in ("fwd", "fwd+bwd") for m in (sdpa, mask, causal)),
        *(("model", "fwd+bwd", m) for m in (sdpa, hf_pos, pad)),
    }
    for r in rows.values():
        assert r["steps_timed"] == 1 and not r["oom"] and r["error"] is None
        assert r["ms"] > 0 and r["tokens_per_s"] > 0 and r["speedup"] > 0
        assert r["peak_mib"] is None  # CPU: no CUDA memory stats
    assert rows[("op", "fwd", mask)]["speedup"] == 1.0
    assert rows[("op", "fwd", sdpa)]["backend"] == "sdpa + dense block-diagonal mask"
    assert rows[("model", "fwd+bwd", sdpa)]["backend"] == "sdpa + dense block-diagonal mask"
    # no CUDA: xformers and flex (no fused CPU kernels) and flash skipped with their reasons
    skipped = {(s["level"], s["method"]): s["reason"] for s in data["skipped"]}
    for level in ("op", "model"):
        assert "cpu kernels" in skipped[(level, bench.packed_name("xformers"))]
        assert "fused cpu kernels" in skipped[(level, bench.packed_name("flex"))]
    assert "CUDA" in skipped[("op", "flash-attn 2 varlen (packed)")]
    assert "CUDA" in skipped[("model", "hf flash_attention_2 (position_ids packing)")]

    b = data["batch"]
    assert b["rows"] <= 2 and b["max_seq_len"] == 64 and b["samples"] == len(b["lengths"])
    assert b["real_tokens"] == sum(b["lengths"]) == rows[("op", "fwd", sdpa)]["real_tokens"]
    assert b["packed_slots"] == b["rows"] * 64 < b["padded_slots"]
    assert data["model"]["config"]["model_type"] == "qwen2"
    assert "NUMERICAL CHECK FAILED" not in capsys.readouterr().out


def test_harness_records_every_exception_and_writes_as_it_goes(tmp_path):
    harness = load("bench_harness")
    path = tmp_path / "out.json"
    log = harness.ResultLog(str(path), command="x")
    assert json.loads(path.read_text())["results"] == []  # written before anything ran

    def broken():
        raise ValueError("kernel refused these inputs")

    timings = harness.time_methods(
        {"ok": lambda: torch.ones(2).sum(), "broken": broken}, 2, 1, torch.device("cpu")
    )
    assert timings["broken"].error == "ValueError: kernel refused these inputs"
    assert len(timings["ok"].times) == 2 and not timings["broken"].times
    log.results(
        harness.result_rows("op", "fwd", timings, {"ok": "", "broken": ""}, 10, "ok", False)
    )
    on_disk = {r["method"]: r for r in json.loads(path.read_text())["results"]}
    assert on_disk["broken"]["error"].startswith("ValueError") and on_disk["ok"]["ms"] > 0
    log.check(harness.compare("op", "x", torch.ones(3), torch.zeros(3), (0.1, 0.0)))
    assert json.loads(path.read_text())["checks_passed"] is False
    assert "error: ValueError" in harness.markdown_table(log.data["results"], "ok")
